"""`unified bench train`: the training pipeline's throughput against a bare `transformers` loop, in one process.

Two copies of the recipe's model, from the same initial weights, train on the same packed batches, one step of
each in turn (the order alternating), so that a noisy machine slows both alike:

- bare: the Llama backbone alone, `labels=input_ids` (causal mask only, SDPA's fused path), `torch.optim.AdamW`;
  its batches are built before the clock starts.
- pipeline: what `unified.train` runs: the batch drawn from the task mixture and packed, the block-diagonal and
  action-chunk mask, the weighted loss, the DeepSpeed engine at the recipe's ZeRO stage (one rank here).

Tokens/s counts the rows' positions (batch x seq_len) for both. MFU divides the model FLOPs per token (6 x the
parameters that multiply, i.e. all but the input embedding table, + 12 x layers x hidden x seq_len for attention)
by a peak: on a GPU the card's dense bf16
specification, on a CPU the documented vector peak of the cores used (see `cpu_peak_flops`).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from unified.errors import UnifiedError

PHASES = ("data", "forward", "backward", "optimizer")

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), matched on the CUDA device name.
GPU_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                 ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12)]


def cpu_peak_flops(threads: int, dtype: torch.dtype, cpuinfo: str | None = None,
                   max_mhz: float | None = None) -> tuple[float, str]:
    """The vector peak of `threads` cores: cores x clock x FLOP per cycle per core, from the ISA the CPU reports.

    FP32 FLOP per cycle per core: 64 with AVX-512 (two 512-bit FMA units, as Zen 5 and Xeon Scalable gold and
    platinum parts have; parts with one unit reach half), 32 with AVX2 and FMA, 8 otherwise. bf16 doubles it with
    AVX512_BF16 and is 1024 with AMX. The clock is the maximum the kernel reports (lscpu's max MHz), else the
    current one of /proc/cpuinfo: an upper bound, as peaks are. `cpuinfo` and `max_mhz` replace what this machine
    reports."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.findall(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = set(found[0].split()) if found else set()
    current = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    mhz = (_max_mhz() if max_mhz is None else max_mhz) or max(current, default=0.0)
    if not mhz:
        raise UnifiedError("no CPU clock in /proc/cpuinfo or lscpu: give the peak with --peak-flops-per-s")
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512"
    elif {"avx2", "fma"} <= flags:
        per_cycle, isa = 32, "AVX2+FMA"
    else:
        per_cycle, isa = 8, "SSE"
    if dtype == torch.bfloat16:
        if "amx_bf16" in flags:
            per_cycle, isa = 1024, "AMX-BF16"
        elif "avx512_bf16" in flags:
            per_cycle, isa = 2 * per_cycle, "AVX512_BF16"
    peak = threads * mhz * 1e6 * per_cycle
    return peak, f"{threads} core(s) x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def _max_mhz() -> float:
    import shutil
    import subprocess

    if not shutil.which("lscpu"):
        return 0.0
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    found = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.M)
    return float(found.group(1)) if found else 0.0


def peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK:
            if key in name:
                scale = 1.0 if dtype == torch.bfloat16 else 0.5  # tf32 tensor cores: half the bf16 rate
                return peak * scale, f"{name}: {peak * scale / 1e12:.0f} TFLOP/s dense ({dtype}) by its data sheet"
        raise UnifiedError(f"no data-sheet peak known for {name!r}: give it with --peak-flops-per-s")
    return cpu_peak_flops(threads, dtype)


def _single_process_group(gpu: bool) -> None:
    """A one-rank process group (the DeepSpeed engine needs one) without the launcher."""
    import deepspeed

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_SIZE="1")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_train(overrides: list[str] = (), *, recipe: Path, steps: int = 10, warmup: int = 2,
                threads: int | None = None, peak_flops_per_s: float | None = None, json: Path | None = None,
                progress: bool = True) -> dict:
    """Train the recipe's model `warmup` + `steps` steps two ways, interleaved (see the module's doc): a bare
    `transformers` loop and the `unified` pipeline through the DeepSpeed engine; print tokens/s of each, their
    ratio, the time per step split into data / forward / backward / optimizer, and MFU. `data=` must be token
    shards, or an episode store with `tokenizer=`. `--threads` sets torch's threads (default: all cores);
    `--peak-flops-per-s` replaces the documented peak."""
    import deepspeed

    from unified.data.shards import TokenShards
    from unified.model import UnifiedModel
    from unified.outputs import check_file, write_report
    from unified.train import check_shards, deepspeed_dir, mixture, prepare_data
    from unified.train_config import deepspeed_config, load_recipe, uses_bf16, uses_flex

    if not Path(recipe).is_file():
        raise UnifiedError(f"--recipe {recipe}: no such file")
    config = load_recipe(recipe, list(overrides))
    if json is not None:  # a bad path fails now, not after the benchmark
        check_file(json, "bench-train", [recipe, config.data.path or None, config.data.tokenizer or None])
    if config.distill.teacher or config.lora.enabled or config.model.action_head:
        raise UnifiedError("bench train measures the backbone's training path: use a recipe without a distillation "
                           "teacher, LoRA or a continuous head (e.g. recipes/joint.yaml)")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if threads:
        torch.set_num_threads(threads)
    bf16 = uses_bf16(config, gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    _single_process_group(gpu)
    with tempfile.TemporaryDirectory(prefix="unified-bench-") as scratch:
        shards = TokenShards(prepare_data(config, Path(scratch), progress=progress))
        check_shards(config, shards)
        torch.manual_seed(config.seed)
        model = UnifiedModel(config.model, shards.layout, state_dim=shards.meta["state_dim"])
        bare = copy.deepcopy(model.backbone).to(device=device, dtype=dtype).train()
        o = config.optim
        optimizer = torch.optim.AdamW(bare.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                      eps=1e-8)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               config=deepspeed_config(config, 1, bf16, deepspeed_dir(recipe), gpu))
        batches = mixture(config, shards, gpu=gpu)
        total = warmup + steps
        bare_ids = [batches.batch(step).to_torch(device)["input_ids"] for step in range(total)]
        b, t = bare_ids[0].shape
        times = {"bare": {p: [] for p in PHASES}, "pipeline": {p: [] for p in PHASES}}

        def bare_step(step: int) -> dict:
            start = _sync(device)
            ids = bare_ids[step]
            data = _sync(device)
            loss = bare(input_ids=ids, labels=ids).loss
            forward = _sync(device)
            loss.backward()
            backward = _sync(device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = _sync(device)
            return dict(zip(PHASES, (data - start, forward - data, backward - forward, end - backward)))

        def pipeline_step(step: int) -> dict:
            start = _sync(device)
            tensors = batches.batch(step).to_torch(device)
            data = _sync(device)
            loss, _ = engine(tensors)
            forward = _sync(device)
            engine.backward(loss)
            backward = _sync(device)
            engine.step()
            end = _sync(device)
            return dict(zip(PHASES, (data - start, forward - data, backward - forward, end - backward)))

        for step in tqdm(range(total), desc="bench train", unit="step", disable=not progress):
            order = [("bare", bare_step), ("pipeline", pipeline_step)]
            for name, run in order if step % 2 == 0 else order[::-1]:
                split = run(step)
                if step >= warmup:
                    for phase, seconds in split.items():
                        times[name][phase].append(seconds)

    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token = model_flops_per_token(model, t)
    peak, peak_note = (peak_flops_per_s, "given with --peak-flops-per-s") if peak_flops_per_s else \
        peak_flops(device, dtype, torch.get_num_threads())
    result: dict = {"recipe": str(recipe), "overrides": list(overrides), "device": _device_name(device),
                    "threads": torch.get_num_threads(), "precision": str(dtype).removeprefix("torch."),
                    "zero_stage": config.zero_stage, "batch": [b, t],
                    "attention": "flex" if uses_flex(config, gpu) else "sdpa", "steps": steps, "warmup": warmup,
                    "parameters": parameters, "flops_per_token": flops_per_token, "peak_flops": peak,
                    "peak": peak_note}
    for name in ("bare", "pipeline"):
        per_step = [sum(phases) for phases in zip(*times[name].values())]
        seconds = sum(per_step)
        tokens_per_s = b * t * steps / seconds
        result[f"{name}_tokens_per_s"] = tokens_per_s
        result[f"{name}_mfu"] = flops_per_token * tokens_per_s / peak
        result[f"{name}_split_s"] = {p: statistics.median(v) for p, v in times[name].items()}
        result[f"{name}_step_s"] = statistics.median(per_step)
    result["ratio"] = result["pipeline_tokens_per_s"] / result["bare_tokens_per_s"]
    split = result["pipeline_split_s"]
    result["pipeline_data_share"] = split["data"] / sum(split.values())
    print(report(result))
    if json:
        write_report(Path(json), result, "bench-train")
        print(f"wrote {json}")
    return result


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the parameters that take part in matrix products (all but the input embedding
    table, a lookup) + 12 x layers x hidden x seq_len for the attention scores and their use (PaLM's count)."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - partitioned under ZeRO-3
    embedding = numel(model.backbone.get_input_embeddings().weight)
    matmul = sum(numel(p) for p in model.parameters()) - embedding
    config = model.backbone.config
    return 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def report(r: dict) -> str:
    lines = [f"bench train: {r['recipe']} {' '.join(r['overrides'])}".rstrip(),
             f"{r['device']}, {r['threads']} thread(s), {r['precision']}, ZeRO-{r['zero_stage']} (one rank), "
             f"{r['attention']} attention in the pipeline, "
             f"{r['parameters'] / 1e6:.2f} M parameters, batch {r['batch'][0]} x {r['batch'][1]}, "
             f"{r['steps']} steps each after {r['warmup']} warm-up, interleaved",
             f"peak {r['peak_flops'] / 1e9:.0f} GFLOP/s: {r['peak']}", "",
             "| loop | tokens/s | MFU | step ms | data ms | forward ms | backward ms | optimizer ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("bare", "pipeline"):
        s = r[f"{name}_split_s"]
        lines.append(f"| {name} | {r[f'{name}_tokens_per_s']:.0f} | {r[f'{name}_mfu']:.1%} | "
                     f"{r[f'{name}_step_s'] * 1e3:.0f} | " + " | ".join(f"{s[p] * 1e3:.1f}" for p in PHASES) + " |")
    lines += ["", f"pipeline / bare: {r['ratio']:.2f}x the tokens/s; data preparation {r['pipeline_data_share']:.1%} "
                  "of the pipeline's step (medians)"]
    return "\n".join(lines)
