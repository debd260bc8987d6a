"""`unified eval operators`: accuracy on the multi-hop comparison questions by number of hops, so that a model
trained on few hops can be tested on more (length generalisation), with whatever scratchpad it was trained on.

The model reads `<bos> premises + question <reason>`, writes its scratchpad (possibly empty) up to `</reason>`,
then its answer up to `<eos>`; the answer counts when it is exactly the stored one (yes or no).
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unified.errors import UnifiedError

SCRATCHPAD_TOKENS_PER_HOP = 40  # generation budget for the scratchpad: a 'full' step is about 30 tokens


def read_examples(data: Path, hops: list[int] | None, n: int) -> dict[int, list[dict]]:
    """The first `n` examples of each hop file of an operator data set (`unified data operators --out DATA`)."""
    from unified.data.operators import read_info

    info = read_info(data, "--data ")
    available = [int(h) for h in info["hops"]]
    wanted = available if hops is None else hops
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise UnifiedError(f"{data}: no examples with {missing} hops (the set has {available})")
    examples = {}
    for h in wanted:
        path = Path(data) / f"hops_{h}.jsonl"
        lines = path.read_text().splitlines()[:n]
        try:
            examples[h] = [jsonlib.loads(line) for line in lines]
        except ValueError as e:
            raise UnifiedError(f"{path}: not JSON lines ({e})") from None
    return examples


def answer(model, tokenizers, prompt: str, hops: int) -> tuple[str, str, int]:
    """Greedy scratchpad and answer for one question -> (scratchpad, answer, tokens generated); in the inductive
    form when the model was trained so (`model.inductive_scratchpad`)."""
    from unified.generation import Decoder

    layout = model.layout
    text = layout.to_global("text", tokenizers.text.encode([prompt])[0])
    decoder = Decoder(model)
    prefix = [layout.special("<bos>"), *text.tolist(), layout.special("<reason>")]
    decoder.feed(prefix)
    decode = tokenizers.text.decode
    if model.config.inductive_scratchpad:
        steps, reply = generate_inductive(decoder, len(prefix), max_steps=hops + 2,
                                          max_step_tokens=SCRATCHPAD_TOKENS_PER_HOP)
        scratchpad = " ".join(decode([layout.to_local("text", step)])[0] for step in steps if step)
        return scratchpad, (decode([layout.to_local("text", reply)])[0] if reply else ""), decoder.generated
    steps = decoder.generate(layout.mask("text"), stop=layout.special("</reason>"),
                             max_tokens=SCRATCHPAD_TOKENS_PER_HOP * hops)
    reply = decoder.generate(layout.mask("text"), stop=layout.special("<eos>"), max_tokens=4)
    scratchpad = decode([layout.to_local("text", steps)])[0] if steps else ""
    return scratchpad, (decode([layout.to_local("text", reply)])[0] if reply else ""), decoder.generated


def answer_batch(model, tokenizers, prompts: list[str], hops: int) -> list[tuple[str, str, int]]:
    """`answer` for many questions at once (`generation.generate_batch`: left-padded, each question decoded as it
    would be alone; tested against `answer`). The inductive scratchpad is written step by step: step k's prompt is
    the question and step k - 1 at the positions right after it, exactly what `generate_inductive` leaves in its
    cache, so the batch needs no cropping."""
    from unified.generation import generate_batch

    layout = model.layout
    step, close, eos = layout.special("<step>"), layout.special("</reason>"), layout.special("<eos>")
    text_ids = [layout.to_global("text", ids).tolist() for ids in tokenizers.text.encode(prompts)]
    prefixes = [[layout.special("<bos>"), *t, layout.special("<reason>")] for t in text_ids]
    text = layout.mask("text")
    decode = tokenizers.text.decode
    steps: list[list[list[int]]] = [[] for _ in prompts]
    if model.config.inductive_scratchpad:
        allowed = text.copy()
        allowed[[step, close]] = True
        active = list(range(len(prompts)))
        generated = [0] * len(prompts)
        ends: list[list[int]] = [[] for _ in prompts]  # the step's closing tokens, as `generate_inductive` feeds them
        for k in range(hops + 2):
            if not active:
                break
            asks = [prefixes[q] + ([*steps[q][-1], step] if k else []) for q in active]
            outs = generate_batch(model, asks, allowed, [step, close], SCRATCHPAD_TOKENS_PER_HOP, keep_stop=True)
            still = []
            for q, out in zip(active, outs):
                generated[q] += len(out)
                ended = out[-1] if out and out[-1] in (step, close) else None
                steps[q].append(out[:-1] if ended is not None else out)
                # out of budget: closed; asked for another step after the last one allowed: <step> then closed
                ends[q] = [close] if ended != step else [step, close]
                if ended == step:
                    still.append(q)
            active = still
        # The answer follows in the last step's group: the step before it (if any), the last step and its end.
        answer_prompts = [prefixes[q] + ([*steps[q][-2], step] if len(steps[q]) > 1 else []) + steps[q][-1] + ends[q]
                          for q in range(len(prompts))]
    else:
        budget = SCRATCHPAD_TOKENS_PER_HOP * hops
        outs = generate_batch(model, prefixes, text, close, budget)
        steps = [[out] for out in outs]
        answer_prompts = [prefixes[q] + outs[q] + [close] for q in range(len(prompts))]
        generated = [len(out) + (len(out) < budget) for out in outs]  # the stop counts when the model chose it
    replies = generate_batch(model, answer_prompts, text, eos, 4)
    results = []
    for q, reply in enumerate(replies):
        pad = " ".join(decode([layout.to_local("text", s)])[0] for s in steps[q] if s)
        said = decode([layout.to_local("text", reply)])[0] if reply else ""
        results.append((pad, said, generated[q] + len(reply) + (len(reply) < 4)))
    return results


def generate_inductive(decoder, prefix: int, max_steps: int, max_step_tokens: int,
                       max_answer_tokens: int = 4) -> tuple[list[list[int]], list[int]]:
    """The inductive scratchpad written greedily after the first `prefix` tokens fed to `decoder` (the question
    and `<reason>`): before each step after the first, the cache is cropped back to the question and the previous
    step fed again at the positions right after it, so a step sees what it saw in training
    (`sequences.build_text`). A step ends at `<step>` (another follows) or `</reason>` (the answer follows, until
    `<eos>`); a step out of budget, or a scratchpad out of steps, is closed with `</reason>` as training closes
    it. -> (the steps' text ids, the answer's text ids)."""
    layout = decoder.model.layout
    step, close = layout.special("<step>"), layout.special("</reason>")
    allowed = layout.mask("text").copy()
    allowed[[step, close]] = True
    steps: list[list[int]] = []
    for k in range(max_steps):
        if k:
            decoder.crop(prefix)
            decoder.feed([*steps[-1], step])
        tokens, ended = [], None
        for _ in range(max_step_tokens):
            token = decoder._choose(decoder.last_logits, allowed, True, 1.0)
            decoder.generated += 1
            decoder.feed([token])
            if token in (step, close):
                ended = token
                break
            tokens.append(token)
        steps.append(tokens)
        if ended != step:
            if ended is None:
                decoder.feed([close])
            break
    else:
        decoder.feed([close])  # the last step asked for another: the scratchpad ends here
    reply = decoder.generate(layout.mask("text"), stop=layout.special("<eos>"), max_tokens=max_answer_tokens)
    return steps, reply


def steps_right(written: str, expected: str) -> float:
    """The fraction of the steps of the scratchpad `expected` that `written` has right, in order, before its first
    step that differs (1.0: every step, though `written` may go on after them)."""
    from unified.data.tokenize import split_steps

    want, got = split_steps(expected), split_steps(written)
    right = 0
    for a, b in zip(got, want):
        if a != b:
            break
        right += 1
    return right / len(want)


def operators_eval(*, model: Path, data: Path, hops: str | None = None, n: int = 100, batch: int = 100,
                   json: Path | None = None, progress: bool = True) -> dict:
    """Answer the first `n` questions of each hop count in `hops` (default: every file of `data`) with `model`,
    `batch` questions at a time (`answer_batch`), and report the accuracy per hop count. When the data holds
    scratchpads (made with `--scratchpad full` or `inductive`), also how much of each the model wrote right: the
    fraction of questions whose scratchpad is exactly the data's, the mean fraction of the data's steps
    written right before the first wrong one (where a walk goes astray) and the fraction whose first step is right
    (in the walk form, also on the questions whose first step needs the premise of the question's first name,
    `shortcut_first_step`); and the accuracy on the questions whose answer is yes and on those whose answer is no,
    apart."""
    import torch

    from unified.data.operators import as_words, parse_hops, read_info, shortcut_first_step
    from unified.data.tokenize import split_steps
    from unified.model_dir import load_model
    from unified.outputs import check_file, write_report

    if n < 1:
        raise UnifiedError(f"--n must be at least 1, got {n}")
    if json is not None:
        check_file(json, "operators", [model, data])
    examples = read_examples(data, parse_hops(hops) if hops else None, n)
    form = read_info(data)["steps"]  # the questions are encoded as training encoded them
    loaded, tokenizers, _ = load_model(model)
    accuracy, tokens, shown, exact, leading, first, looked_up, by_answer = {}, {}, [], {}, {}, {}, {}, {}
    with torch.inference_mode():
        for h, rows in examples.items():
            correct = []
            bar = tqdm(total=len(rows), desc=f"{h} hops", unit="q", disable=not progress)
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                for example, (scratchpad, reply, generated) in zip(
                        chunk, answer_batch(loaded, tokenizers, [as_words(e["prompt"], form) for e in chunk], h)):
                    correct.append(reply.strip() == example["answer"])
                    by_answer.setdefault(h, {}).setdefault(example["answer"], []).append(correct[-1])
                    if example.get("scratchpad"):
                        right = steps_right(scratchpad, example["scratchpad"])
                        exact.setdefault(h, []).append(" ".join(scratchpad.split()) == example["scratchpad"])
                        leading.setdefault(h, []).append(right)
                        # the first step right (in the walk form, the lookup every question starts with)
                        first.setdefault(h, []).append(right > 0)
                        if form == "walk" and (shortcut_first_step(example)
                                               != split_steps(example["scratchpad"])[0]):
                            # ... on the questions where it cannot be written without that lookup
                            looked_up.setdefault(h, []).append(right > 0)
                    tokens.setdefault(h, []).append(generated)
                    if sum(s["hops"] == h for s in shown) < 2:
                        shown.append({"hops": h, "prompt": example["prompt"], "expected": example["target"],
                                      "generated": " ".join(f"{scratchpad} {reply}".split())})
                bar.update(len(chunk))
            bar.close()
            accuracy[h] = float(np.mean(correct))
            pad = (f"; scratchpad exact {np.mean(exact[h]):.1%}, steps right before the first wrong one "
                   f"{np.mean(leading[h]):.1%}, first step right {np.mean(first[h]):.1%}" if h in exact else "")
            if h in exact and form == "walk":
                pad += (f" ({np.mean(looked_up[h]):.1%} of the {len(looked_up[h])} questions needing the lookup)"
                        if h in looked_up else " (no question needs the lookup: at 2 hops none does)")
            pad += "; " + ", ".join(f"answer {a}: {np.mean(v):.1%} of {len(v)}"
                                    for a, v in sorted(by_answer[h].items()))
            print(f"{h} hops: accuracy {accuracy[h]:.1%} over {len(rows)} questions{pad}", flush=True)
    report = {"model": str(model), "data": str(data), "questions_per_hop": n,
              "accuracy_by_hops": {str(h): a for h, a in accuracy.items()},
              "tokens_by_hops": {str(h): float(np.mean(t)) for h, t in tokens.items()},
              "accuracy_by_answer_by_hops": {str(h): {a: float(np.mean(v)) for a, v in sorted(d.items())}
                                             for h, d in by_answer.items()},
              "examples": shown}
    if exact:
        report["scratchpad_exact_by_hops"] = {str(h): float(np.mean(v)) for h, v in exact.items()}
        report["steps_right_by_hops"] = {str(h): float(np.mean(v)) for h, v in leading.items()}
        report["first_step_right_by_hops"] = {str(h): float(np.mean(v)) for h, v in first.items()}
    if exact and form == "walk":
        # the walk's first step on the questions where `shortcut_first_step` is wrong (none at 2 hops)
        report["questions_needing_lookup_by_hops"] = {str(h): len(looked_up.get(h, [])) for h in exact}
        report["first_step_right_needing_lookup_by_hops"] = {str(h): float(np.mean(v))
                                                             for h, v in looked_up.items()}
    if json is not None:
        write_report(Path(json), report, "operators")
    return report


def plot_operators(reports: list[Path], *, out: Path, labels: list[str] = ()) -> str:
    """Accuracy against hops, one line per `eval operators --json` report; prints (and returns) a Markdown table."""
    from unified.eval.training_plot import save_figure, subplots

    from unified.outputs import check_file

    check_file(out, None, reports, what="--out")
    loaded = []
    for path in reports:
        try:
            loaded.append(jsonlib.loads(Path(path).read_text())["accuracy_by_hops"])
        except (OSError, ValueError, KeyError) as e:
            raise UnifiedError(f"{path}: not a report of `unified eval operators --json` ({e})") from None
    names = list(labels) or [Path(p).stem for p in reports]
    if len(names) != len(loaded):
        raise UnifiedError(f"--labels: {len(names)} labels for {len(loaded)} reports")
    hops = sorted({int(h) for r in loaded for h in r})
    fig, ax = subplots(figsize=(6, 4))
    for name, r in zip(names, loaded):
        xs = [h for h in hops if str(h) in r]
        ax.plot(xs, [r[str(h)] for h in xs], marker="o", label=name)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("hops")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out)
    table = ["| model | " + " | ".join(f"{h} hops" for h in hops) + " |", "|---|" + "---|" * len(hops)]
    for name, r in zip(names, loaded):
        table.append(f"| {name} | " + " | ".join(f"{r[str(h)]:.2f}" if str(h) in r else "-" for h in hops) + " |")
    text = "\n".join(table)
    print(text + f"\nwrote {out}", flush=True)
    return text


SCRATCHPADS = ("none", "full", "inductive")
LABELS = {"none": "no scratchpad", "full": "full scratchpad", "inductive": "inductive scratchpad"}


def summarize_operators(*, runs: Path, trained: str = "2-4") -> dict:
    """Gather `runs/{none,full,inductive}/seed*.json` (`eval operators --json` reports, one per training seed)
    into `runs/summary.json`, beside the reports: {scratchpad: {hops: {"mean", "seeds", "interval",
    "questions"}}}, the interval a 95% Wilson interval over every seed's questions pooled; a plot of the mean
    accuracy against hops with that interval as a band, each seed's as a faint line, the trained hop counts shaded
    (`accuracy_by_hops.png`); and the table in Markdown (`summary.md`, also printed; a column says how many seeds
    each scratchpad has, so that a summary of a run still under way says what it holds)."""
    from unified.eval.stats import wilson_interval
    from unified.eval.training_plot import save_figure, subplots

    from unified.data.operators import parse_hops
    from unified.outputs import check_file, write_text_atomic

    runs = Path(runs)
    for name in ("summary.json", "summary.md"):
        _check_summary_file(runs / name)
    check_file(runs / "accuracy_by_hops.png", None, what="plot")
    summary: dict[str, dict] = {}
    for pad in SCRATCHPADS:
        reports = sorted((runs / pad).glob("seed*.json"))
        if not reports:
            continue
        by_hops: dict[str, list[tuple[float, int]]] = {}
        for path in reports:
            try:
                report = jsonlib.loads(path.read_text())
                n = int(report["questions_per_hop"])
                for h, a in report["accuracy_by_hops"].items():
                    by_hops.setdefault(h, []).append((float(a), n))
            except (OSError, ValueError, KeyError) as e:
                raise UnifiedError(f"{path}: not a report of `unified eval operators --json` ({e})") from None
        summary[pad] = {}
        for h in sorted(by_hops, key=int):
            accuracies = [a for a, _ in by_hops[h]]
            correct = sum(round(a * n) for a, n in by_hops[h])
            questions = sum(n for _, n in by_hops[h])
            summary[pad][h] = {"mean": float(np.mean(accuracies)), "seeds": accuracies,
                               "interval": list(wilson_interval(correct, questions)), "questions": questions}
    if not summary:
        raise UnifiedError(f"{runs}: no reports (expected {runs}/none/seed0.json and the like, from "
                           "`unified eval operators --json`)")
    hops = sorted({int(h) for table in summary.values() for h in table})
    fig, ax = subplots(figsize=(6.5, 4))
    trained_hops = parse_hops(trained)
    ax.axvspan(min(trained_hops) - 0.5, max(trained_hops) + 0.5, color="gray", alpha=0.12,
               label=f"trained ({trained} hops)")
    for k, (pad, table) in enumerate(summary.items()):
        xs = [h for h in hops if str(h) in table]
        color = f"C{k}"
        seeds = len(table[str(xs[0])]["seeds"])
        for s in range(seeds):
            ax.plot(xs, [table[str(h)]["seeds"][s] if s < len(table[str(h)]["seeds"]) else np.nan for h in xs],
                    color=color, alpha=0.25, linewidth=1)
        ax.fill_between(xs, [table[str(h)]["interval"][0] for h in xs], [table[str(h)]["interval"][1] for h in xs],
                        color=color, alpha=0.12, linewidth=0)
        ax.plot(xs, [table[str(h)]["mean"] for h in xs], color=color, marker="o",
                label=f"{LABELS[pad]} ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("hops")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(hops)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, runs / "accuracy_by_hops.png")
    lines = ["| scratchpad | seeds | " + " | ".join(f"{h}" for h in hops) + " |", "|---|---|" + "---|" * len(hops)]
    for pad, table in summary.items():
        cells = [str(max(len(cell["seeds"]) for cell in table.values()))]
        for h in hops:
            cell = table.get(str(h))
            cells.append("-" if cell is None else f"{cell['mean']:.2f} [{cell['interval'][0]:.2f}, "
                         f"{cell['interval'][1]:.2f}]")
        lines.append(f"| {LABELS[pad]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    write_text_atomic(runs / "summary.json", jsonlib.dumps(summary, indent=2) + "\n")
    write_text_atomic(runs / "summary.md", text + "\n")
    print(text + f"\nwrote {runs / 'summary.json'} and {runs / 'accuracy_by_hops.png'}", flush=True)
    return summary


def _check_summary_file(path: Path) -> None:
    """An existing summary file is replaced only if it is one this command wrote."""
    if not path.exists():
        return
    ours = False
    try:
        if path.suffix == ".json":
            data = jsonlib.loads(path.read_text())
            ours = isinstance(data, dict) and set(data) <= set(SCRATCHPADS)
        else:
            ours = path.read_text().startswith("| scratchpad |")
    except (OSError, ValueError):
        pass
    if not ours:
        raise UnifiedError(f"{path}: exists and is not an operator summary written by unified; move it away and "
                           "rerun (nothing was changed)")
