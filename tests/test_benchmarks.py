"""The benchmark suite's plumbing (`benchmarks/run.py`): one small benchmark end to end, its
report files, and a failing benchmark reported as such. Slow: it runs PyTorch and JAX steps."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


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
