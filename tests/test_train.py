"""`zsjax.train` on configs/tiny.py: metrics, the curriculum's realised noise, resume, export."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from zsjax import train
from zsjax.sampling import GenerateResult


class ScriptedGenerator:
    """Stands in for ModelTurnGenerator: searches on the first turn, then answers correctly
    for Zorland and wrongly otherwise (so rewards differ within a group)."""

    def __init__(self, config, params, tokenizer, settings, **kwargs):
        self.tok = tokenizer

    def __call__(self, inputs):
        out = GenerateResult([], [], [], [])
        for ctx in inputs.contexts:
            text = self.tok.decode(ctx)
            question = text.rsplit("Question: ", 1)[1].split("?")[0]
            if inputs.turn == 0:
                reply = f"<search> {question} </search>"
            else:
                reply = "<answer> Vex </answer>" if "Zorland" in question else "<answer> x </answer>"
            ids = self.tok.encode(reply, add_special_tokens=False)
            out.tokens.append(ids)
            out.logprobs.append(np.full(len(ids), -1.0))
            out.model_logprobs.append(np.full(len(ids), -1.0))
            out.finish_reasons.append("stop")
        return out


def _lines(path):
    return [json.loads(x) for x in open(path)]


def test_tiny_run_logs_metrics_resumes_and_exports(tmp_path):
    config = tiny.get_config()
    config.train.steps = 2
    workdir = str(tmp_path / "run")
    history = train.run(config, workdir)
    assert [h["step"] for h in history] == [1, 2]
    required = {"step", "reward_mean", "f1_mean", "noise_prob", "kl", "entropy",
                "response_tokens_mean", "searches_mean", "tokens_per_s", "noisy_fraction"}
    for rec in _lines(os.path.join(workdir, "metrics.jsonl")):
        assert required <= set(rec)
        assert np.isfinite(rec["entropy"]) and rec["tokens_per_s"] > 0
    assert os.path.exists(os.path.join(workdir, "policy_hf", "config.json"))
    config.train.steps = 3  # a rerun resumes from the step-2 checkpoint
    history = train.run(config, workdir)
    assert [h["step"] for h in history] == [3]
    assert [r["step"] for r in _lines(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "reinforce_pp"])
def test_noise_fraction_and_rewards_logged_per_step(tmp_path, monkeypatch, algorithm):
    import zsjax.search
    monkeypatch.setattr(zsjax.search, "ModelTurnGenerator", ScriptedGenerator)
    config = tiny.get_config()
    config.train.steps = 4
    config.rl.algorithm = algorithm
    config.rl.questions_per_step = 8
    config.curriculum.update(start=0.5, end=0.5)  # constant p: a binomial check per step
    workdir = str(tmp_path / algorithm)
    train.run(config, workdir)
    metrics = _lines(os.path.join(workdir, "metrics.jsonl"))
    trajs = _lines(os.path.join(workdir, "trajectories.jsonl"))
    for rec in metrics:
        flags = [s["noisy"] for t in trajs if t["step"] == rec["step"] for s in t["searches"]]
        assert len(flags) == 16 and rec["searches_mean"] == 1.0
        assert rec["noisy_fraction"] == pytest.approx(np.mean(flags))
        assert rec["noise_prob"] == 0.5
        # exactly the Zorland rollouts answer right
        assert rec["reward_mean"] == pytest.approx(2 / 16)
    assert 0.2 < np.mean([r["noisy_fraction"] for r in metrics]) < 0.8
    assert (metrics[-1]["value_loss"] is not None) == (algorithm == "ppo")


def test_unknown_algorithm(tmp_path):
    config = tiny.get_config()
    config.rl.algorithm = "dpo"
    with pytest.raises(ValueError, match="config.rl.algorithm='dpo' is not available"):
        train.run(config, str(tmp_path))
