"""`unified bench train`: the pipeline against a bare transformers loop, in one process, on the tiny recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unified.errors import UnifiedError
from unified.train_bench import PHASES, cpu_peak_flops

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_cpu_peak_from_the_isa_and_clock():
    avx512 = "processor : 0\ncpu MHz : 2000.0\nflags : fpu sse avx2 fma avx512f avx512_bf16\n"
    peak, note = cpu_peak_flops(2, torch.float32, avx512, max_mhz=2600.0)
    assert peak == 2 * 2600e6 * 64 and "AVX-512" in note
    assert cpu_peak_flops(2, torch.bfloat16, avx512, max_mhz=2600.0)[0] == 2 * 2600e6 * 128
    assert cpu_peak_flops(1, torch.float32, avx512, max_mhz=0.0)[0] == 2000e6 * 64  # no max clock: the current one
    assert cpu_peak_flops(4, torch.float32, "cpu MHz : 3000\nflags : sse avx2 fma\n", max_mhz=0.0)[0] == 4 * 3e9 * 32
    with pytest.raises(UnifiedError, match="--peak-flops"):
        cpu_peak_flops(1, torch.float32, "flags : sse\n", max_mhz=0.0)


@pytest.mark.slow
def test_bench_train_times_both_loops_on_the_same_batches(model_data, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(BIN / "unified"), "bench", "train", "--recipe", str(ROOT / "recipes" / "debug.yaml"),
         f"data={model_data / 'shards'}", "model.horizon=4", "data.seq_len=256", "--steps", "2", "--warmup", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ratio"] == pytest.approx(r["pipeline_tokens_per_s"] / r["bare_tokens_per_s"])
    assert r["batch"] == [2, 256] and r["steps"] == 2 and r["zero_stage"] == 2
    for loop in ("bare", "pipeline"):
        assert set(r[f"{loop}_split_s"]) == set(PHASES) and all(v >= 0 for v in r[f"{loop}_split_s"].values())
        assert r[f"{loop}_split_s"]["forward"] > 0 and r[f"{loop}_split_s"]["backward"] > 0
        assert r[f"{loop}_mfu"] == pytest.approx(r["flops_per_token"] * r[f"{loop}_tokens_per_s"] / r["peak_flops"])
    assert 0 < r["pipeline_data_share"] < 1
    assert "pipeline / bare:" in result.stdout and "| bare |" in result.stdout
