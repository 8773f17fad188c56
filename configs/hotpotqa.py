"""RL of SmolLM2-135M-Instruct on real HotpotQA questions on a CPU: the RL stage of
`python -m zsjax.recipes.hotpotqa`, which fills the paths (its workdir's cold-start policy,
fine-tuned simulator, training questions and corpus). Run alone:

    python -m zsjax.train --config configs/hotpotqa.py:simulator --workdir runs/hp_rl \\
        --config.policy.path=HP/cold_start_hf --config.simulator.path=HP/simulator_hf \\
        --config.data.train_path=HP/data/train.jsonl
    python -m zsjax.train --config configs/hotpotqa.py:bm25 --workdir runs/hp_rl_bm25 \\
        --config.policy.path=HP/cold_start_hf --config.backend.corpus=HP/data/corpus.jsonl \\
        --config.data.train_path=HP/data/train.jsonl

ARG: `simulator` (the fine-tuned simulator, with the noise curriculum) or `bm25` (a local BM25
engine over the corpus; no curriculum: a real engine has no noisy mode), then optionally
`,quick` (fewer steps). Both runs see the same questions in the same order.
"""

import ml_collections

from configs import common

STEPS = {"full": 20, "quick": 8}


def get_config(arg: str = "simulator") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    backend = parts[0] if parts else "simulator"
    quick = parts[1:] == ["quick"]
    if backend not in ("simulator", "bm25") or parts[1:] not in ([], ["quick"]):
        raise ValueError(f"configs/hotpotqa.py: unknown preset {arg!r}; expected simulator or "
                         "bm25, optionally followed by ,quick")
    c = common.base_config()
    # bfloat16 compute (1.2x on a CPU with AVX-512 BF16), float32 trained weights
    c.policy.update(dtype="bfloat16", param_dtype="float32")
    # The fine-tuned simulator writes three documents of about 30 words, as the engine returns
    # its top 3; identical searches of a step (a question's rollouts searching the question)
    # share their documents: a third of the simulator's work.
    c.simulator.update(dtype="bfloat16", style="finetuned", temperature=0.8, max_new_tokens=160,
                       top_k_docs=3, share_documents=True)
    c.backend.update(kind=backend, top_k=3)
    # Two searches at most, then an answer; short turns (the cold start thinks in a sentence).
    c.rollout.update(max_turns=2, max_response_tokens=64, max_prompt_tokens=1024,
                     max_obs_tokens=256, temperature=1.0, top_p=1.0)
    if backend == "simulator":
        c.curriculum.update(start=0.0, end=0.5, base=4.0)  # the paper's
    else:
        c.curriculum.update(start=0.0, end=0.0)
    # 8 questions x 4 rollouts a step, one on-policy update; no reference model (kl 0): on a
    # 135M model and a few dozen steps the KL term only slows learning, and the reference
    # forward pass is a third of the update's time. A rate far above the 3B recipe's 1e-6: a
    # 135M model, its top layers only, and a handful of steps (at 2e-5, 16 steps against BM25
    # left held-out F1 where it was: 0.083 -> 0.082 on 96 questions).
    # SmolLM2's top 10 of 30 layers are trained: the frozen embeddings and lower layers need
    # no backward pass (2.8x faster updates on a CPU).
    c.rl.update(algorithm="grpo", questions_per_step=8, rollouts_per_question=4, mini_batches=1,
                micro_batches=4, lr=5e-5, warmup_steps=2, kl_coef=0.0, entropy_coef=0.0,
                old_logprobs="sampler", weight_decay=0.0,
                freeze=r"embed|layers_([0-9]|1[0-9])'")
    c.data.length_multiple = 128  # few compiled update shapes (each costs a minute to compile)
    c.train.update(steps=STEPS["quick" if quick else "full"], log_every=1, checkpoint_every=4,
                   keep_checkpoints=1, eval_every=0)
    c.lock()
    return c
