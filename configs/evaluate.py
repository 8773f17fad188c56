"""Greedy evaluation of a search agent on QA files (exact match, substring "EM", F1).

    python -m zsjax.evaluate --config configs/evaluate.py --workdir runs/eval \\
        --config.policy.path=runs/grpo --config.backend.simulator_path=SIM_HF_DIR \\
        --config.data.paths=data/qa/nq.test.jsonl,data/qa/bamboogle.test.jsonl

    python -m zsjax.evaluate --config configs/evaluate.py --workdir runs/eval_bm25 \\
        --config.policy.path=runs/grpo --config.backend.kind=bm25 \\
        --config.backend.corpus=corpus.jsonl --config.data.paths=hotpotqa.test.jsonl

    python -m zsjax.evaluate --config configs/evaluate.py:tiny --workdir runs/eval_tiny

`tiny`: the tiny fixture (zsjax.tools.tiny_fixture, built in WORKDIR/fixture) fills every empty
path, with short rollouts: a smoke run in seconds on a CPU.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/evaluate.py: unknown preset {arg!r}; expected '' or 'tiny'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 64  # questions per rollout batch
    # A Hugging Face folder, a training workdir, or its checkpoints/ folder.
    c.policy = ml_collections.ConfigDict({"path": "", "dtype": "float32", "step": -1})  # -1: latest
    # Comma-separated QA files (.jsonl / .parquet); each dataset is named by its file name
    # without the extension. limit 0 = every row, else the first `limit` rows of each file.
    c.data = ml_collections.ConfigDict({"paths": "", "limit": 0})
    c.backend = ml_collections.ConfigDict({
        "kind": "simulator",  # simulator | simulator_url | retriever_url | bm25
        "simulator_path": "",  # kind=simulator: a Hugging Face folder, run in-process
        "dtype": "float32",
        # The simulator's prompt, as in training (config.simulator.style): "finetuned" for
        # a fine-tuned simulator, "prompt_only" for an instruct model used as one (SmolLM2).
        "style": "finetuned",
        "temperature": 0.0,  # greedy documents: a deterministic evaluation
        "max_new_tokens": 600, "top_k_docs": 5,
        "url": "",  # kind=simulator_url / retriever_url
        "model": "",  # kind=simulator_url: served model name ("" = the first at /v1/models)
        "corpus": "",  # kind=bm25: a JSONL corpus of {id, title, text} passages
        "top_k": 3,  # kind=retriever_url / bm25: documents per query
    })
    # The reference's evaluation lengths (docs/METHOD.md); decoding is always greedy.
    c.rollout = ml_collections.ConfigDict({
        "max_turns": 2, "max_response_tokens": 500, "max_prompt_tokens": 2048,
        "max_obs_tokens": 2048})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.tiny_fixture = False  # fill empty paths from the tiny fixture
    c.progress = True  # a progress bar per dataset on stderr
    if arg == "tiny":
        c.tiny_fixture = True
        c.batch_size = 8
        c.backend.max_new_tokens = 24
        c.rollout.update(max_response_tokens=24, max_prompt_tokens=512, max_obs_tokens=64)
    c.lock()
    return c
