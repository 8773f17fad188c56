"""Metrics writers: JSONL, TensorBoard and Weights & Biases behind one interface.

W&B runs in offline mode (no network): each run writes a transaction log, RUN/run-ID.wandb,
which the official client's protobuf messages (`wandb.proto.wandb_internal_pb2.Record`) are
read back from. wandb 0.31 has no Python reader of that log any more (it moved into the
client's Go core), so the framing is read here: LevelDB's published log format (32 KiB blocks
of records, each with a 7-byte header: CRC, length, type; FULL / FIRST / MIDDLE / LAST), after
a 7-byte W&B file header.
"""

import glob
import json
import os
import struct

import numpy as np
import pytest

from zsjax.errors import InputError
from zsjax.loop import TrainingLoop
from zsjax.metrics import WANDB_STATE, WandbSettings, numbers

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _log_records(path):
    """The payloads of a LevelDB-format log with W&B's 7-byte file header."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, out, parts = 7, [], []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end
            break
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            out.append(b"".join(parts + [payload]))
    return out


def _wandb_runs(workdir):
    """[(run id, config {key: value}, history {step: {key: value}})] of every offline run
    folder under WORKDIR/wandb, oldest first."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))):
        run_id, config, history = None, {}, {}
        for payload in _log_records(glob.glob(os.path.join(folder, "run-*.wandb"))[0]):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
                config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                               for u in rec.run.config.update})
            elif kind == "config":
                config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                               for u in rec.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}
                history[rec.history.step.num] = {k: v for k, v in row.items()
                                                 if not k.startswith("_")}
        runs.append((run_id, config, history))
    return runs


def _loop(workdir, steps, **kw):
    return TrainingLoop(str(workdir), steps=steps, checkpoint_every=2, keep=3, resume=True,
                        wandb=WandbSettings(project="zsjax-tests", name="unit", mode="offline"),
                        run_config={"rl": {"algorithm": "grpo", "lr": 1e-6}, "seed": 3}, **kw)


def _record(step):
    return {"step": step, "loss": 1.0 / step, "reward_mean": 0.25 * step, "kl": None,
            "algorithm": "grpo", "nonfinite": False}


def test_wandb_gets_every_number_at_its_step_and_a_resume_continues_the_run(tmp_path):
    state = {"w": np.zeros(3, np.float32)}
    loop = _loop(tmp_path, 4)
    loop.restore(state)
    with loop:
        for step in range(loop.start, 3):  # killed after step 3's metrics, before a checkpoint
            loop.log(_record(step + 1))
            loop.end_step(step, state, {"data_position": step})
    assert json.load(open(tmp_path / WANDB_STATE))["logged_through"] == 3
    loop = _loop(tmp_path, 4)
    _, meta = loop.restore(state)
    assert loop.start == 2  # the checkpoint of step 2: step 3 is computed and logged again
    with loop:
        for step in range(loop.start, loop.steps):
            loop.log(_record(step + 1))
            loop.end_step(step, state, {"data_position": step})

    runs = _wandb_runs(tmp_path)
    assert len(runs) == 2 and runs[0][0] == runs[1][0]  # one W&B run, continued
    assert runs[0][0] == json.load(open(tmp_path / WANDB_STATE))["id"]
    config = runs[0][1]
    assert config["rl"] == {"algorithm": "grpo", "lr": 1e-6} and config["seed"] == 3
    assert sorted(runs[0][2]) == [1, 2, 3] and sorted(runs[1][2]) == [4]  # step 3 not twice
    history = {**runs[0][2], **runs[1][2]}
    jsonl = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    for r in jsonl:
        assert history[r["step"]] == pytest.approx(numbers(r))
        assert set(history[r["step"]]) == {"loss", "reward_mean"}  # no None, str or bool


def test_wandb_off_writes_nothing_and_bad_settings_are_refused(tmp_path):
    loop = TrainingLoop(str(tmp_path), steps=1, checkpoint_every=0, keep=1, resume=False,
                        wandb=WandbSettings())
    loop.restore({"w": np.zeros(1)})
    with loop:
        loop.log(_record(1))
        loop.end_step(0, {"w": np.zeros(1)}, {})
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / WANDB_STATE)
    with pytest.raises(ValueError, match=r"train.wandb.mode='cloud'; expected one of"):
        WandbSettings(project="p", mode="cloud").check("train.wandb")


def test_train_and_sft_refuse_a_bad_wandb_mode_before_anything_runs(tmp_path):
    from configs import sft_simulator, tiny
    from zsjax import sft, train
    config = tiny.get_config()
    config.train.wandb.update(project="p", mode="cloud")
    with pytest.raises(InputError, match="train.wandb.mode='cloud'"):
        train.run(config, str(tmp_path / "train"))
    assert not os.path.exists(tmp_path / "train" / "fixture")
    config = sft_simulator.get_config("/no/such/model")
    config.data.path = "pairs.jsonl"
    config.train.wandb.update(project="p", mode="cloud")
    with pytest.raises(InputError, match="train.wandb.mode='cloud'"):
        sft.run(config, str(tmp_path / "sft"))


@pytest.mark.slow
def test_a_tiny_training_run_logs_to_wandb(tmp_path, monkeypatch):
    """configs/tiny.py for 2 steps with train.wandb.project set and WANDB_MODE=offline: the W&B
    run has metrics.jsonl's numbers at each step and the effective config."""
    from configs import tiny
    from zsjax import train
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tiny.get_config()
    config.train.steps = 2
    config.train.wandb.project = "zsjax-tests"
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    (run_id, run_config, history), = _wandb_runs(workdir)
    assert run_config["rl"]["algorithm"] == config.rl.algorithm
    assert run_config["train"]["wandb"]["project"] == "zsjax-tests"
    jsonl = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert sorted(history) == [1, 2]
    for r in jsonl:
        assert history[r["step"]] == pytest.approx(numbers(r))
