"""A tiny random policy and simulator on a generated QA fixture: a few steps in well under a
minute on a CPU. Used by the tests and as a smoke run.

    python -m zsjax.train --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common.base_config()
    c.fixture = True  # empty model / data paths: build the tiny fixture in WORKDIR/fixture
    c.simulator.update(max_new_tokens=24)
    c.rollout.update(max_turns=2, max_response_tokens=24, max_prompt_tokens=512,
                     max_obs_tokens=64)
    c.rl.update(questions_per_step=4, rollouts_per_question=2, lr=1e-4, kl_coef=0.001,
                critic_lr=1e-4)
    c.train.update(steps=3, log_every=1, checkpoint_every=0, progress=False)
    if arg:
        c.rl.algorithm = arg
    c.lock()
    return c
