"""`unified data inspect`: what token shards hold, samples as readable tokens, and the packing efficiency."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unified.data.shards import TokenShards


def inspect_shards(
    shards: Path, *, seq_len: int = 1024, batch_size: int = 8, dump: int = 1, max_samples: int = 4000,
    image_weight: float = 0.04,
) -> dict:
    """Print sample counts, the packing efficiency (non-pad fraction) at `seq_len`, and `dump` samples per task
    as readable tokens."""
    from unified.packing import pack
    from unified.sequences import build
    from unified.sequences import dump as render

    store = TokenShards(shards)
    rng = np.random.default_rng(0)
    tasks = list(store.meta["tasks"])
    if store.meta["operators"] and "text" not in tasks:
        tasks.append("text")
    counts = {task: len(store.index(task)) for task in tasks}
    held = {task: len(store.index(task, "held_out")) for task in tasks}
    print(f"{shards}: training samples " + ", ".join(f"{t} {n}" for t, n in counts.items())
          + f"; held out ({store.meta.get('held_out', 'no rule')}, never trained on): "
          + ", ".join(f"{t} {n}" for t, n in held.items()))
    text = None
    tokenizer_dir = Path(store.meta["tokenizer"])
    if (tokenizer_dir / "text").is_dir():
        from unified.tokenizers.text import TextTokenizer

        text = TextTokenizer.from_pretrained(tokenizer_dir / "text").decode
    chosen = []
    for task, n in counts.items():
        rows = rng.choice(store.index(task), size=min(n, max_samples // len(counts)), replace=False) if n else []
        built = [build(store.sample(task, int(r)), store.layout, image_weight) for r in rows]
        for b in built[:dump]:
            print(render(b, store.layout, text))
        chosen += built
    order = rng.permutation(len(chosen))
    batches = list(pack([chosen[i] for i in order], seq_len, batch_size, store.layout))
    real = sum(int((b.task_ids >= 0).sum()) for b in batches)
    total = sum(b.task_ids.size for b in batches)
    efficiency = real / max(total, 1)
    lengths = {t: float(np.mean([len(b) for b in chosen if b.task == t])) for t in counts if counts[t]}
    print("mean sample length: " + ", ".join(f"{t} {v:.0f}" for t, v in lengths.items()))
    print(f"packing efficiency at seq_len {seq_len}: {efficiency:.1%} non-pad over {len(batches)} batches "
          f"of {batch_size} ({len(chosen)} samples)")
    return {"samples": counts, "held_out_samples": held, "packing_efficiency": efficiency, "mean_length": lengths}
