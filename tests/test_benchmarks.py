"""The benchmark suite's plumbing (`benchmarks/run.py`): one small benchmark end to end and its
report files (slow: it runs PyTorch and JAX steps), and the rollout benchmark's bound."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_suite_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only",
                           "update_small", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    assert report["quick"] and report["ceilings"]["matmul_gflop_s"] > 0
    result = report["results"]["update_small"]["result"]
    assert result["zsjax_step_s"] > 0 and result["torch_step_s"] > 0
    # the two implementations compute the same loss on the same batch
    assert result["policy_loss_zsjax"] == pytest.approx(result["policy_loss_torch"], abs=1e-4)
    md = open(out / "report.md").read()
    assert "## update_small" in md and "MFU" in md


def test_rollout_bound_by_hand():
    spec = importlib.util.spec_from_file_location("rollout_bench",
                                                  os.path.join(ROOT, "benchmarks", "rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = SimpleNamespace(num_params=lambda: 1000, n_layers=2, n_kv_heads=1, head_dim=4)
    bound = bench.Bound(config, flops_s=1e6, bytes_s=1e5)
    # two rows: 3 and 5 new tokens on contexts of 10 and 20; they generate 2 and 1 tokens
    bound.add([3, 5], [10, 20], [2, 1])
    kv = 2 * 2 * 1 * 4 * 4  # bytes per cached token: k and v, layers, heads, head_dim, fp32
    prefill = 2 * 1000 * 8 / 1e6
    step0 = max(2 * 1000 * 2 / 1e6, (4000 + kv * (10 + 20)) / 1e5)
    step1 = max(2 * 1000 * 1 / 1e6, (4000 + kv * 11) / 1e5)  # only the first row is left
    assert bound.seconds == pytest.approx(prefill + step0 + step1)
