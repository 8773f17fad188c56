"""The recipe configs: every recipe builds, is locked, carries the reference's
hyper-parameters, and the sweeps expand into runnable override sets."""

import os
import subprocess
import sys

import pytest

from configs import common, smollm2, tiny, zerosearch
from zsjax import train
from zsjax.rl import algorithms


@pytest.mark.parametrize("model", sorted(zerosearch.MODELS))
@pytest.mark.parametrize("algorithm", algorithms.names())
def test_recipes_at_reference_hyperparameters(model, algorithm):
    c = zerosearch.get_config(f"{model},{algorithm}")
    assert c.rl.algorithm == algorithm
    # docs/METHOD.md (Qwen-2.5-3B reference settings)
    assert (c.rl.questions_per_step, c.rl.rollouts_per_question) == (64, 5)
    assert c.rl.mini_batch_size == 256 and c.rl.epochs == 1
    assert (c.rl.lr, c.rl.clip, c.rl.entropy_coef, c.rl.grad_clip) == (1e-6, 0.2, 0.001, 1.0)
    assert (c.rl.kl_coef, c.rl.kl_kind, c.rl.std_eps) == (0.001, "k3", 1e-6)
    assert (c.rl.critic_lr, c.rl.value_clip, c.rl.gamma, c.rl.lam) == (1e-5, 0.5, 1.0, 1.0)
    assert (c.rollout.temperature, c.rollout.top_p) == (1.0, 0.95)
    assert (c.simulator.temperature, c.simulator.max_new_tokens, c.simulator.top_k_docs) == (
        0.8, 600, 5)
    assert (c.curriculum.start, c.curriculum.end, c.curriculum.base) == (0.0, 0.5, 4.0)
    assert c.rollout.max_response_tokens == 500 and c.train.steps == 200
    assert (c.rollout.max_prompt_tokens, c.rollout.max_obs_tokens) == (2048, 2048)
    # the reference's 2 optimizer steps a training step: 256 + 64 trajectories, in
    # micro-batches of the same rows
    sizes, micro = train._update_plan(c.rl)
    assert sizes == [256, 64] and 256 // micro == c.rl.micro_batches
    with pytest.raises(AttributeError):
        c.rl.lrr = 1.0  # locked: a misspelt key is an error


def test_unknown_recipe_names():
    with pytest.raises(ValueError, match="MODEL"):
        zerosearch.get_config("qwen9-1b,grpo")
    with pytest.raises(ValueError, match="ALGORITHM"):
        zerosearch.get_config("qwen2.5-3b-base,dpo")


def test_every_config_has_the_same_keys():
    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
        return out
    base = keys(common.base_config())
    for c in (tiny.get_config(), smollm2.get_config(), zerosearch.get_config()):
        assert base <= keys(c)


def test_sweeps_expand_and_launch_script_prints_runs(tmp_path):
    runs = zerosearch.get_sweep("lr_kl")
    assert len(runs) == 6 and {"rl.lr", "rl.kl_coef"} == set(runs[0])
    assert {r["rl.algorithm"] for r in zerosearch.get_sweep("algorithms")} == set(
        algorithms.names())
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config",
                          "configs/tiny.py", "--sweep", "x", "--workdir", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "get_sweep" in out.stderr
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config",
                          "configs/zerosearch.py:qwen2.5-3b-base,grpo", "--sweep", "turns",
                          "--workdir", str(tmp_path), "--", "--config.train.steps=1"],
                         capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("--config.train.steps=1" in x for x in lines)
    assert "--config.rollout.max_turns=5" in lines[1]
    # an extra flag on a swept key would silently replace the sweep's values: refused
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config",
                          "configs/zerosearch.py:qwen2.5-3b-base,grpo", "--sweep", "turns",
                          "--workdir", str(tmp_path), "--", "--config.rollout.max_turns=3"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and not out.stdout
    assert "sets rollout.max_turns, which the sweep 'turns' varies" in out.stderr
    # from another folder, by the config file's absolute path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "sweep.py"), "--config",
                          os.path.join(root, "configs", "zerosearch.py") + ":qwen2.5-3b-base",
                          "--sweep", "turns", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 2, out.stderr


@pytest.mark.slow
def test_sweep_runs_apply_their_overrides(tmp_path):
    """One sweep entry, run for real on the tiny config: the override reaches the trainer."""
    import os
    tiny_sweep = tmp_path / "tiny_sweep.py"
    tiny_sweep.write_text(
        "from configs.tiny import get_config  # noqa: F401\n"
        "def get_sweep(arg):\n    return [{'rl.questions_per_step': 2}]\n")
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config", str(tiny_sweep),
                          "--sweep", "", "--workdir", str(tmp_path / "w"), "--run", "--",
                          "--config.train.steps=1"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "w" / "rl.questions_per_step=2"
    with open(os.path.join(run_dir, "trajectories.jsonl")) as f:
        assert len(f.readlines()) == 4  # 2 questions x 2 rollouts, not the config's 4 x 2
