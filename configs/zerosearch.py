"""The ZeroSearch recipes at the reference hyper-parameters, for accelerators:

    python -m zsjax.train --config configs/zerosearch.py:MODEL,ALGORITHM --workdir DIR \
        --config.policy.path=/models/Qwen2.5-3B --config.simulator.path=/models/Simulator-14B \
        --config.data.train_path=/data/zerosearch/train.parquet

MODEL: qwen2.5-3b-base (default), qwen2.5-3b-instruct, qwen2.5-7b-base, qwen2.5-7b-instruct,
llama3.2-3b-base, llama3.2-3b-instruct, qwen3-1.7b-base, qwen3-1.7b, qwen3-4b-base, qwen3-4b,
qwen3-8b-base, qwen3-8b (Qwen3's post-trained models, thinking mode on: docs/METHOD.md).
ALGORITHM: grpo (default), dr_grpo, rloo, ppo, reinforce_pp, or any name registered in
zsjax.rl.algorithms. The model folders are Hugging Face folders you provide; nothing is
downloaded. Instruct models get their chat template automatically.

Sweeps are small functions below (`get_sweep`); `launch/sweep.py` expands one into runs.
"""

import itertools

import ml_collections

from configs import common
from zsjax.rl import algorithms

MODELS = {
    # name: (params in billions, micro-batches per mini-batch of 256 trajectories: 8 and 4
    # rows; the step's last 64 trajectories take 8 and 16 micro-batches of those rows)
    "qwen2.5-3b-base": (3, 32),
    "qwen2.5-3b-instruct": (3, 32),
    "qwen2.5-7b-base": (7, 64),
    "qwen2.5-7b-instruct": (7, 64),
    "llama3.2-3b-base": (3, 32),
    "llama3.2-3b-instruct": (3, 32),
    # Qwen3 dense (q/k RMSNorm, explicit head_dim): the same reference settings; the names
    # without "-base" are the post-trained (thinking) models, whose chat template is applied
    "qwen3-1.7b-base": (1.7, 16),
    "qwen3-1.7b": (1.7, 16),
    "qwen3-4b-base": (4, 32),
    "qwen3-4b": (4, 32),
    "qwen3-8b-base": (8, 64),
    "qwen3-8b": (8, 64),
}


def parse_arg(arg: str) -> tuple[str, str]:
    parts = [p.strip() for p in arg.split(",")] if arg else []
    model = parts[0] if parts else "qwen2.5-3b-base"
    algorithm = parts[1] if len(parts) > 1 else "grpo"
    if model not in MODELS or algorithm not in algorithms.names() or len(parts) > 2:
        raise ValueError(f"configs/zerosearch.py:{arg}: expected MODEL[,ALGORITHM] with MODEL in "
                         f"{sorted(MODELS)} and ALGORITHM in {algorithms.names()}")
    return model, algorithm


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    model, algorithm = parse_arg(arg)
    billions, micro = MODELS[model]
    c = common.base_config()
    c.name = f"{model},{algorithm}"
    c.policy.dtype = c.simulator.dtype = "bfloat16"
    # The reference's mini-batches: 320 trajectories a step cut into 256 + 64 (docs/METHOD.md);
    # a warm-up of 10 training steps (20 updates), counted in steps as veRL's scheduler counts
    c.rl.update(algorithm=algorithm, mini_batch_size=256, micro_batches=micro, remat=True,
                warmup_steps=10)
    if algorithms.get(algorithm).kl == "reward":
        c.rl.kl_coef = 0.001  # in the reward, not the loss
    c.train.update(steps=200, checkpoint_every=25, eval_every=50)
    c.data.eval_limit = 512
    # Fully sharded data parallel over every device; add tensor parallelism for 7B on small
    # accelerators with --config.mesh.tensor=2 (then fsdp takes the rest).
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.lock()
    return c


def get_sweep(arg: str = "") -> list[dict]:
    """Override sets (`{"rl.lr": 1e-6, ...}`), one per run. arg names the sweep:
    `algorithms` (every registered one), `lr_kl` (learning rate x KL coefficient),
    `curriculum` (the noise schedule's end point and base), `turns` (max_turns 2 / 5)."""
    sweeps = {
        "algorithms": {"rl.algorithm": list(algorithms.names())},
        "lr_kl": {"rl.lr": [5e-7, 1e-6, 2e-6], "rl.kl_coef": [0.0, 0.001]},
        "curriculum": {"curriculum.end": [0.25, 0.5, 0.75], "curriculum.base": [2.0, 4.0, 10.0]},
        "turns": {"rollout.max_turns": [2, 5]},
    }
    if arg not in sweeps:
        raise ValueError(f"unknown sweep {arg!r}; choose one of {sorted(sweeps)}")
    keys = list(sweeps[arg])
    return [dict(zip(keys, values)) for values in itertools.product(*sweeps[arg].values())]
