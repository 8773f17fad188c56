"""`python -m zsjax.infer` end to end on SmolLM2 (policy and prompt-only simulator)."""

import json
import subprocess
import sys


def test_infer_cli_json(tmp_path):
    """The CLI end to end on the tiny generated policy and simulator (the agent loop itself is
    tested on SmolLM2 in tests/search)."""
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))
    proc = subprocess.run(
        [sys.executable, "-m", "zsjax.infer", "--policy", fx["policy"], "--simulator",
         fx["simulator"], "--question", "Who wrote Hamlet?", "--answer", "Shakespeare",
         "--max-turns", "1", "--max-response-tokens", "24", "--simulator-max-new-tokens", "24",
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["turns"] >= 1 and out["segments"][0]["kind"] == "policy"
    assert out["policy_tokens"] <= out["response_tokens"]


def test_infer_cli_needs_exactly_one_backend(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zsjax.infer", "--policy", str(tmp_path),
                           "--question", "q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "one of the arguments" in proc.stderr


def test_infer_cli_bad_corpus_is_one_line_before_any_model_loads(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "text": "a"}\n["not", "a", "passage"]\n')
    proc = subprocess.run([sys.executable, "-m", "zsjax.infer", "--policy",
                           str(tmp_path / "no_model"), "--corpus", str(corpus), "--question",
                           "q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "corpus.jsonl:2: a passage is an object" in proc.stderr
    empty = subprocess.run([sys.executable, "-m", "zsjax.infer", "--policy", str(tmp_path),
                            "--corpus", str(corpus), "--question", " "], capture_output=True,
                           text=True, timeout=300)
    assert empty.returncode == 2 and "--question is empty" in empty.stderr
