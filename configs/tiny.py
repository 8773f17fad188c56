"""A tiny random policy and simulator on a generated QA fixture: a few steps in well under a
minute on a CPU. Used by the tests and as a smoke run.

    python -m zsjax.train --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Empty paths: build the tiny fixture (zsjax.tools.tiny_fixture) in WORKDIR/fixture.
    c.policy = ml_collections.ConfigDict({"path": "", "dtype": "float32"})
    c.reference = ml_collections.ConfigDict({"path": ""})  # empty: the initial policy
    c.simulator = ml_collections.ConfigDict({
        "path": "", "dtype": "float32", "style": "finetuned", "temperature": 0.8,
        "max_new_tokens": 24, "top_k_docs": 5})
    c.data = ml_collections.ConfigDict({"train_path": ""})
    c.rollout = ml_collections.ConfigDict({
        "max_turns": 2, "max_response_tokens": 24, "max_prompt_tokens": 512,
        "max_obs_tokens": 64, "temperature": 1.0, "top_p": 0.95, "kv_reuse": True})
    c.curriculum = ml_collections.ConfigDict({"start": 0.0, "end": 0.5, "base": 4.0})
    c.rl = ml_collections.ConfigDict({
        "algorithm": "grpo",  # grpo | ppo | reinforce_pp
        "questions_per_step": 4, "rollouts_per_question": 2, "mini_batches": 1, "epochs": 1,
        "micro_batches": 1, "lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0,
        "grad_clip": 1.0, "clip": 0.2, "entropy_coef": 0.001, "kl_coef": 0.001,
        "kl_kind": "k3", "std_eps": 1e-6, "aggregation": "token-mean", "remat": False,
        "critic_lr": 1e-4, "value_clip": 0.5, "gamma": 1.0, "lam": 1.0})
    c.train = ml_collections.ConfigDict({
        "steps": 3, "log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 2})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.resume = True
    c.lock()
    return c
