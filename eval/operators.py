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
    info_path = Path(data) / "meta" / "info.json"
    if not info_path.is_file():
        raise UnifiedError(f"{data}: not an operator data set (no meta/info.json); make one with "
                           "`unified data operators`")
    info = jsonlib.loads(info_path.read_text())
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


def operators_eval(*, model: Path, data: Path, hops: str | None = None, n: int = 100, json: Path | None = None,
                   progress: bool = True) -> dict:
    """Answer the first `n` questions of each hop count in `hops` (default: every file of `data`) with `model`
    and report the accuracy per hop count."""
    import torch

    from unified.data.operators import parse_hops
    from unified.model_dir import load_model
    from unified.outputs import check_file, write_report

    if n < 1:
        raise UnifiedError(f"--n must be at least 1, got {n}")
    if json is not None:
        check_file(json, "operators", [model, data])
    examples = read_examples(data, parse_hops(hops) if hops else None, n)
    loaded, tokenizers, _ = load_model(model)
    accuracy, tokens, shown = {}, {}, []
    with torch.inference_mode():
        for h, rows in examples.items():
            correct = []
            for example in tqdm(rows, desc=f"{h} hops", unit="q", disable=not progress):
                scratchpad, reply, generated = answer(loaded, tokenizers, example["prompt"], h)
                correct.append(reply.strip() == example["answer"])
                tokens.setdefault(h, []).append(generated)
                if sum(s["hops"] == h for s in shown) < 2:
                    shown.append({"hops": h, "prompt": example["prompt"], "expected": example["target"],
                                  "generated": (scratchpad + " " + reply).strip()})
            accuracy[h] = float(np.mean(correct))
            print(f"{h} hops: accuracy {accuracy[h]:.1%} over {len(rows)} questions", flush=True)
    report = {"model": str(model), "data": str(data), "questions_per_hop": n,
              "accuracy_by_hops": {str(h): a for h, a in accuracy.items()},
              "tokens_by_hops": {str(h): float(np.mean(t)) for h, t in tokens.items()}, "examples": shown}
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
