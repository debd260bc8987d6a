"""`unified bench latency`: decision latency of policies on the same observations, measured interleaved in one
process so that the ratios between them hold on a noisy machine.

Each round asks every (model, mode) once for the same held-out observation, in a shuffled order; a model's
figure is the median (and p95) over the rounds, and each ratio is taken against the first model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm
from unified.eval.modes import MODES, mode_flags

from unified.errors import UnifiedError


def parse_entry(entry: str) -> tuple[str, str]:
    """'DIR:MODE' -> (DIR, MODE); a bare DIR means `direct`."""
    path, sep, mode = entry.rpartition(":")
    if not sep or mode not in MODES:
        path, mode = entry, "direct"
    if not (Path(path) / "unified.json").is_file():
        raise UnifiedError(f"--models {entry}: {path} is not an exported model directory (no unified.json)")
    return path, mode


def observations(data: Path, count: int, history: int,
                 min_speed: float | None = None) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """`count` (frames, instruction, state) observations spread over the held-out episodes of a store (round robin
    over its scenarios); with `min_speed`, only steps where the car moves at least that fast (m/s)."""
    from unified.data.store import EpisodeStore

    store = EpisodeStore(data)
    indices = store.held_out_indices(stratified=True)
    if not indices:
        raise UnifiedError(f"{data}: the store holds no held-out episodes ({store.rule.description})")
    out: list[tuple[np.ndarray, str, np.ndarray]] = []
    per_episode = max(1, -(-count // len(indices)))
    for index in indices:
        episode = store.read_episode(index)
        steps = np.arange(len(episode.actions)) if min_speed is None else \
            np.flatnonzero(episode.states[:, 0] >= min_speed)
        if not len(steps):
            continue
        for t in steps[np.linspace(0, len(steps) - 1, per_episode).astype(int)]:
            out.append((episode.frames[max(0, t - history + 1):t + 1], episode.instruction, episode.states[t]))
        if len(out) >= count:
            break
    return out[:count]


def latency(*, models: list[str], data: Path, decisions: int = 40, threads: int = 1, json: Path | None = None,
            device: Literal["auto", "cpu", "cuda"] = "auto", progress: bool = True) -> dict:
    """Time `decisions` decisions of every `DIR:MODE` in `models` (mode reason, direct, continuous or
    reason_continuous) on the same observations from `data`, interleaved, with `threads` torch threads, on `device`
    (auto: cuda when a GPU is present); print medians, p95 and the ratios."""
    import torch

    from unified.model_dir import resolve_device
    from unified.outputs import check_file, write_report
    from unified.policy import Policy

    if decisions < 1 or threads < 1:
        raise UnifiedError(f"--decisions and --threads must be at least 1, got {decisions} and {threads}")
    entries = [parse_entry(e) for e in models]
    if json is not None:
        check_file(json, "latency", [*(p for p, _ in entries), data])
    torch.set_num_threads(threads)
    device = resolve_device(device)
    policies = {path: Policy.from_pretrained(path, device=device) for path in dict.fromkeys(p for p, _ in entries)}
    history = max(p.config.history for p in policies.values())
    seen = observations(data, decisions, history)
    times: dict[int, list[float]] = {k: [] for k in range(len(entries))}
    tokens: dict[int, list[int]] = {k: [] for k in range(len(entries))}
    def act(path: str, mode: str, frames, instruction: str, state):
        return policies[path].act(frames, instruction, state=state, **mode_flags(mode))

    for path, mode in entries:  # one untimed decision each: first-call allocations
        act(path, mode, *seen[0])
    rng = np.random.default_rng(0)
    for observation in tqdm(seen, desc="latency", unit="round", disable=not progress):
        for k in rng.permutation(len(entries)):
            start = time.perf_counter()
            result = act(*entries[k], *observation)
            times[k].append(1000 * (time.perf_counter() - start))
            tokens[k].append(result.tokens_generated)
    rows = []
    for k, (path, mode) in enumerate(entries):
        rows.append({"model": path, "mode": mode, "median_ms": float(np.median(times[k])),
                     "p95_ms": float(np.percentile(times[k], 95)), "tokens_per_decision": float(np.mean(tokens[k]))})
    for row in rows:
        row["speedup_vs_first"] = rows[0]["median_ms"] / row["median_ms"]
    report = {"data": str(data), "decisions": len(seen), "threads": threads, "models": rows}
    print(f"decision latency over {len(seen)} observations, interleaved, {threads} thread(s)")
    for row in rows:
        print(f"  {Path(row['model']).name} ({row['mode']}): median {row['median_ms']:.1f} ms, p95 "
              f"{row['p95_ms']:.1f} ms, {row['tokens_per_decision']:.1f} tokens, "
              f"{row['speedup_vs_first']:.2f}x the first")
    if json is not None:
        write_report(Path(json), report, "latency")
    return report


def serve_overhead(*, model: Path, data: Path, decisions: int = 40, mode: Literal["reason", "direct"] = "direct",
                   threads: int = 1, json: Path | None = None, progress: bool = True) -> dict:
    """What the policy server costs per decision: the same model asked for `decisions` held-out observations of
    `data` in process and through `unified serve`'s HTTP endpoint on the loopback interface (a server in a thread
    of this process), in turn, on the CPU with `threads` torch threads. Prints both medians and the overhead."""
    import threading

    import torch

    from unified.outputs import check_file, write_report
    from unified.policy import Policy
    from unified.serve import PolicyClient, PolicyServer

    if decisions < 1 or threads < 1:
        raise UnifiedError(f"--decisions and --threads must be at least 1, got {decisions} and {threads}")
    path, _ = parse_entry(str(model))
    if json is not None:
        check_file(json, "serve-latency", [path, data])
    torch.set_num_threads(threads)
    policy = Policy.from_pretrained(path)
    server = PolicyServer(policy, ("127.0.0.1", 0), model=Path(path).name)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = PolicyClient(server.url)
    try:
        seen = observations(data, decisions, policy.config.history)
        ways = {"in process": policy, "server": client}
        for way in ways.values():  # one untimed decision each: first-call allocations, the connection
            way.act(*seen[0][:2], state=seen[0][2], reason=mode == "reason")
        client.server_ms.clear()
        times: dict[str, list[float]] = {name: [] for name in ways}
        rng = np.random.default_rng(0)
        for frames, instruction, state in tqdm(seen, desc="serve latency", unit="round", disable=not progress):
            for name in rng.permutation(list(ways)):
                start = time.perf_counter()
                ways[name].act(frames, instruction, state=state, reason=mode == "reason")
                times[name].append(1000 * (time.perf_counter() - start))
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    overhead = np.asarray(times["server"]) - np.asarray(client.server_ms)  # the round trip beyond the model's own time
    report = {"model": path, "mode": mode, "data": str(data), "decisions": len(seen), "threads": threads,
              "in_process_median_ms": float(np.median(times["in process"])),
              "server_median_ms": float(np.median(times["server"])),
              "server_p95_ms": float(np.percentile(times["server"], 95)),
              "overhead_median_ms": float(np.median(overhead)), "overhead_p95_ms": float(np.percentile(overhead, 95))}
    print(f"{Path(path).name} ({mode}), {len(seen)} decisions in turn, {threads} thread(s): in process median "
          f"{report['in_process_median_ms']:.1f} ms; through the server {report['server_median_ms']:.1f} ms "
          f"(p95 {report['server_p95_ms']:.1f}); the server's overhead beyond the model's own time: median "
          f"{report['overhead_median_ms']:.2f} ms, p95 {report['overhead_p95_ms']:.2f} ms", flush=True)
    if json is not None:
        write_report(Path(json), report, "serve-latency")
    return report
