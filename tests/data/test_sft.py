"""Simulator fine-tuning: data, loss mask, the trainer end to end, and the labelling script."""

import json
import os
import shutil

import chat_tokenizer
import numpy as np
import pytest

from zsjax.data import sft_data
from zsjax.tools.make_sft_data import label_rows

ROWS = [
    {"query": "capital of Zorland", "question": "What is the capital of Zorland?",
     "golden_answers": ["Vex"], "documents": "Doc 1: Vex is the capital city of Zorland.",
     "label": "useful"},
    {"query": "capital of Zorland", "question": "What is the capital of Zorland?",
     "golden_answers": ["Vex"], "documents": "Doc 1: Zorland is famous for its blue goats.",
     "label": "noisy"},
    {"query": "Mira Tal birthplace", "question": "Where was Mira Tal born?",
     "golden_answers": ["Oskel"], "documents": "Doc 1: Mira Tal was born in Oskel in 1902.",
     "label": "useful"},
    {"query": "river of Oskel", "question": "Which river runs through Oskel?",
     "golden_answers": ["Dunra"], "documents": "Doc 1: The Dunra river runs through Oskel.",
     "label": "useful"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE chat tokenizer built offline (tests/chat_tokenizer.py)."""
    return chat_tokenizer.build()


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_loss_mask_covers_exactly_the_documents(tokenizer, tmp_path):
    rows = sft_data.read_rows(_write(tmp_path / "d.jsonl", ROWS))
    for row in rows:
        for chat in (True, False):
            ex = sft_data.build_example(row, tokenizer, use_chat_template=chat)
            mask = np.array(ex.loss_mask, bool)
            trained = [t for t, m in zip(ex.tokens, mask) if m]
            assert trained[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(trained[:-1]) == row["documents"]
            assert mask[np.argmax(mask):].all()  # one contiguous block at the end
            prompt = tokenizer.decode([t for t, m in zip(ex.tokens, mask) if not m])
            assert ("Noisy Output:" in prompt) == (row["label"] == "noisy")
            assert row["question"] in prompt
    short = sft_data.build_example(rows[0], tokenizer, use_chat_template=False, max_length=110)
    assert len(short.tokens) <= 110


def test_trajectory_rows_match_the_rollout_prompt_and_mask(tokenizer, tmp_path):
    """A policy warm-start row: the prompt is the rollout's own (`prompt_ids`), the loss covers
    the policy's segments only, and a bad row is refused."""
    from zsjax.search import prompts as P
    from zsjax.search.rollout import prompt_ids
    row = {"question": "Where was Mira Tal born?", "segments": [
        {"text": "<search> Mira Tal </search>", "loss": 1},
        {"text": P.information_block("Doc 1: Mira Tal was born in Oskel."), "loss": 0},
        {"text": "<answer> Oskel </answer>", "loss": 1}]}
    rows = sft_data.read_rows(_write(tmp_path / "t.jsonl", [row]))
    ex = sft_data.build_example(rows[0], tokenizer)
    head = prompt_ids(tokenizer, row["question"])
    assert ex.tokens[:len(head)] == head and not any(ex.loss_mask[:len(head)])
    trained = tokenizer.decode([t for t, m in zip(ex.tokens, ex.loss_mask) if m])
    assert trained == "<search> Mira Tal </search><answer> Oskel </answer>"
    with pytest.raises(ValueError, match=r"t\.jsonl:1: 'segments' must be"):
        sft_data.read_rows(_write(tmp_path / "t.jsonl", [{"question": "q", "segments": [
            {"text": "x", "loss": 2}]}]))


def test_bad_rows(tmp_path):
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field\(s\) \['label'\]"):
        sft_data.read_rows(_write(tmp_path / "d.jsonl", [ROWS[0], {
            k: v for k, v in ROWS[1].items() if k != "label"}]))
    with pytest.raises(ValueError, match="label must be 'useful' or 'noisy'"):
        sft_data.read_rows(_write(tmp_path / "d.jsonl", [dict(ROWS[0], label="good")]))
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not valid JSON"):
        sft_data.read_rows(str(tmp_path / "bad.jsonl"))


def test_batches_are_deterministic_and_resumable():
    examples = [sft_data.Example([i + 1] * (i + 2), [0, 1] + [1] * i) for i in range(10)]
    stream = sft_data.batches(examples, 3, seed=5)
    first = [next(stream) for _ in range(7)]
    resumed = sft_data.batches(examples, 3, seed=5, start=4)
    for a, b in zip(first[4:], [next(resumed) for _ in range(3)]):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)
    # each epoch (3 batches of 3 from 10 examples) draws distinct examples
    epoch = np.concatenate([f[1][:, 0] for f in first[:3]])
    assert len(set(epoch.tolist())) == 9


def test_tiny_simulator_memorises_its_documents_and_resumes(tmp_path):
    from configs import sft_simulator
    from zsjax import sft
    from zsjax.models.tokenizer import load_tokenizer
    from zsjax.models import load_hf
    from zsjax.search import SearchRequest
    from zsjax.search.simulator import InProcessSimulator, postprocess_documents

    model_dir = chat_tokenizer.save_tiny_model(tmp_path / "tiny")
    config = sft_simulator.get_config(model_dir)
    config.data.path = _write(tmp_path / "pairs.jsonl", ROWS)
    config.data.use_chat_template = "no"
    config.data.max_length = 128
    config.train.update(steps=60, batch_size=4, lr=3e-3, weight_decay=0.0, log_every=20,
                        checkpoint_every=30)
    config.mesh.update(data=1)
    workdir = str(tmp_path / "run")
    sft.run(config, workdir)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == list(range(1, 61))
    assert lines[-1]["loss"] < 0.1 * lines[0]["loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-2:] == ["30", "60"]

    # the exported simulator reproduces each document greedily, from its own prompt
    sim_config, sim_params = load_hf(os.path.join(workdir, "simulator_hf"))
    sim = InProcessSimulator(sim_config, sim_params, load_tokenizer(model_dir), temperature=0.0,
                             max_new_tokens=40, use_chat_template=False)
    reqs = [SearchRequest(r["query"], r["question"], tuple(r["golden_answers"]),
                          noisy=r["label"] == "noisy") for r in ROWS]
    assert sim.search(reqs) == [postprocess_documents(r["documents"]) for r in ROWS]

    # resuming continues from the last checkpoint with the data stream where it stopped
    config.train.steps = 70
    sft.run(config, workdir)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == list(range(1, 71))
    # killed after step 70's metrics, before its checkpoint: the rerun resumes at step 60 and
    # logs steps 61-70 once, with the same losses (the same data, from the same state)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "70"))
    sft.run(config, workdir)
    again = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in again] == list(range(1, 71))
    assert [x["loss"] for x in again[60:]] == pytest.approx([x["loss"] for x in lines[60:]],
                                                            rel=1e-4)


def test_sigterm_checkpoints_the_step_and_stops(tmp_path, monkeypatch):
    """SIGTERM during step 3 (sent by the step itself): sft finishes the step, checkpoints it
    (checkpoint_every is 50), restores the previous SIGTERM handler and raises Stopped; a rerun
    resumes from step 3."""
    import signal

    from configs import sft_simulator
    from zsjax import sft
    from zsjax.cli import Stopped
    from zsjax.rl import update as U

    config = sft_simulator.get_config(chat_tokenizer.save_tiny_model(tmp_path / "tiny"))
    config.data.path = _write(tmp_path / "pairs.jsonl", ROWS)
    config.data.use_chat_template = "no"
    config.train.update(steps=6, batch_size=2, checkpoint_every=50, log_every=50)
    config.mesh.update(data=1)
    calls, real = [], U.run_step

    def run_step(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(U, "run_step", run_step)
    before = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path / "run")
    with pytest.raises(Stopped, match="checkpointed step 3 of 6"):
        sft.run(config, workdir)
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    assert not os.path.exists(os.path.join(workdir, "simulator_hf"))
    calls.append(1)  # no more signals
    sft.run(config, workdir)
    steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(1, 7)) and len(calls) == 3 + 1 + 3


def test_sft_cli_help():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "zsjax.sft", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--workdir" in proc.stdout
    # bad input is a one-line error with status 2, as in zsjax.train
    proc = subprocess.run([sys.executable, "-m", "zsjax.sft", "--config",
                           "configs/sft_simulator.py:/no/such/model", "--workdir", "/tmp/x",
                           "--config.data.path=pairs.jsonl"], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "/no/such/model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("key,value,match", [
    ("checkpoint_every", -1, "checkpoint_every must be an integer >= 0"),
    ("log_every", -2, "log_every must be"), ("batch_size", 0, "batch_size must be"),
    ("micro_batches", 3, "batch_size=32 does not split into train.micro_batches=3"),
    ("lr_decay", "linear", r"train.lr_decay='linear'; expected one of \('constant', 'cosine'\)"),
    ("warmup_steps", 1000, r"lr_decay='cosine' needs train.steps \(1000\) > train.warmup_steps"),
])
def test_sft_bad_train_values(tmp_path, key, value, match):
    from configs import sft_simulator
    from zsjax import sft
    from zsjax.cli import InputError
    config = sft_simulator.get_config("/no/such/model")
    config.data.path = "pairs.jsonl"
    config.train[key] = value
    if key == "warmup_steps":
        config.train.lr_decay = "cosine"
    with pytest.raises(InputError, match=match):
        sft.run(config, str(tmp_path / "run"))


def test_make_sft_data_labels_by_answer_correctness():
    records = [
        {"question": "Q1?", "golden_answers": ["Vex"], "answer": "vex",
         "searches": [{"query": "a", "documents": "Doc 1: A"},
                      {"query": "b", "documents": "Doc 1: B"}]},
        {"question": "Q2?", "golden_answers": ["Oskel"], "answer": "Paris",
         "searches": [{"query": "c", "documents": "Doc 1: C"}]},
        {"question": "Q3?", "golden_answers": ["Dunra"], "answer": None, "searches": []},
    ]
    rows = label_rows(records)
    assert [(r["query"], r["label"]) for r in rows] == [("a", "useful"), ("b", "useful"),
                                                       ("c", "noisy")]
    assert rows[2]["golden_answers"] == ["Oskel"] and rows[2]["question"] == "Q2?"
    balanced = label_rows(records, balance=True)
    assert sorted(r["label"] for r in balanced) == ["noisy", "useful"]


def test_sft_refuses_a_used_workdir_without_resume(tmp_path):
    """resume=False over existing checkpoints is an error (orbax would skip every save at or
    below the latest step without a word, and a later resume would continue the old run);
    such a skipped save raises."""
    import numpy as np

    from configs import sft_simulator
    from zsjax import sft
    from zsjax.checkpointing import Checkpointer
    from zsjax.cli import InputError
    from zsjax.data import tiny_fixture
    fx = tiny_fixture.make(str(tmp_path / "fx"))
    workdir = tmp_path / "run"
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(5, {"x": np.zeros(2)}, {"step": 5, "data_position": 0})
    with pytest.raises(RuntimeError, match="step 3 was not saved: .* already holds step 5"):
        ckpt.save(3, {"x": np.zeros(2)}, {"step": 3, "data_position": 0})
    ckpt.close()
    config = sft_simulator.get_config(fx["simulator"])
    config.data.path = _write(tmp_path / "pairs.jsonl", ROWS)
    config.resume = False
    with pytest.raises(InputError, match=r"already holds checkpoints \(up to step 5\)"):
        sft.run(config, str(workdir))
