"""The full set of training keys with the reference's hyper-parameters (docs/METHOD.md,
Qwen-2.5-3B). Recipes start from `base_config()`, change what differs, and lock the result, so
a misspelt override (`--config.rl.lrr=...`) is an error."""

import ml_collections


def wandb_config() -> ml_collections.ConfigDict:
    """Weights & Biases logging (zsjax/metrics.py), shared by the training and SFT configs:
    mode "online", "offline" (a local run folder for `wandb sync`), "disabled", or "" for W&B's
    own default ($WANDB_MODE, else online)."""
    return ml_collections.ConfigDict({"project": "", "entity": "", "name": "", "mode": ""})


def lora_config() -> ml_collections.ConfigDict:
    """LoRA adapters (zsjax/models/lora.py), for the policy in RL (`policy.lora`) and the model
    in `zsjax.sft` (`model.lora`). rank 0: off (the whole model is trained). rank > 0: only
    the adapters W + (alpha / rank) A B on the kernels whose path ("layers_0/attn/q_proj/
    kernel") matches `targets` are trained, held by the optimizer and checkpointed; the base is
    held in the compute dtype and is the KL reference; the export is the merged model plus a
    PEFT adapter folder. dropout > 0 drops the adapters' inputs in training passes (then
    un-merged, slower on a CPU); rollouts and evaluation run without it."""
    return ml_collections.ConfigDict({
        "rank": 0, "alpha": 32.0, "dropout": 0.0,
        "targets": r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.fixture = False  # True: empty model / data paths get the tiny generated fixture
    # dtype: the policy's compute dtype (and the rollouts' weights and KV caches).
    # param_dtype: the trained weights and AdamW's moments. Keep float32 under bfloat16
    # compute: an update of lr 1e-6 is far below a bfloat16 weight's rounding step (about
    # 1e-4 at 0.02), so bfloat16 weights would hardly move. The reference and the simulator,
    # which are not trained, are held in `dtype`.
    # scan_layers: the layers as one scan over stacked params (zsjax.models.decoder): compile
    # time that does not grow with depth; "yes", "no" or "auto": for models of 8 layers or
    # more, except with policy.lora or an rl.freeze pattern naming layers (layers_N), which
    # need them apart.
    c.policy = ml_collections.ConfigDict({"path": "", "dtype": "float32",
                                          "param_dtype": "float32", "scan_layers": "auto",
                                          "lora": lora_config()})
    c.reference = ml_collections.ConfigDict({"path": ""})  # empty: the initial policy
    c.simulator = ml_collections.ConfigDict({
        "path": "", "dtype": "float32",
        "style": "finetuned",  # finetuned | prompt_only
        "temperature": 0.8, "max_new_tokens": 600, "top_k_docs": 5,
        "shrink_above": 8,  # as rollout.shrink_above, for the simulator's generation
        # False: every search call samples its own documents, as in the reference. True:
        # identical calls of a step (same query, question, answer and noisy draw, as from
        # rollouts of one question) share one generation: less simulator work, but the same
        # documents across a group.
        "share_documents": False})
    # The search backend (zsjax.search.factory): "simulator" is the model of `simulator` above,
    # in this program; "simulator_url" a simulator behind an OpenAI-compatible server (url,
    # model; prompt style, temperature and lengths from `simulator`); "retriever_url" a real
    # engine with the Search-R1 retriever API (url, top_k); "bm25" a local JSONL corpus of
    # {id, title, text} passages (corpus, top_k; its index is cached beside it).
    c.backend = ml_collections.ConfigDict({"kind": "simulator", "url": "", "model": "",
                                           "corpus": "", "top_k": 3})
    # QA files: .jsonl {question, golden_answers} or ZeroSearch / Search-R1 parquet.
    # eval_paths: comma-separated files for periodic evaluation (train.eval_every).
    # length_multiple: update batches are padded to a multiple of this many tokens (fewer
    # compiled shapes with a larger one, less padding with a smaller one).
    c.data = ml_collections.ConfigDict({"train_path": "", "eval_paths": "", "eval_limit": 0,
                                        "length_multiple": 64})
    # shrink_above: a decode batch of more rows than this continues its still-running rows in
    # a smaller batch once half have finished (`zsjax.sampling.generate`); 0: never, and the
    # rows that go on to a next turn stay in the first turn's batch size too. Shrinking saves
    # the finished rows' compute at the price of more compiled programs and row copies: worth
    # it for large models on a CPU, a loss for tiny ones (docs/PERFORMANCE.md).
    # The reference's lengths (docs/METHOD.md): the context is kept from the left at
    # max_prompt_tokens, each turn's response at most max_response_tokens, each observation
    # at most max_obs_tokens.
    c.rollout = ml_collections.ConfigDict({
        "max_turns": 2, "max_response_tokens": 500, "max_prompt_tokens": 2048,
        "max_obs_tokens": 2048, "temperature": 1.0, "top_p": 0.95, "kv_reuse": True,
        "shrink_above": 8})
    c.curriculum = ml_collections.ConfigDict({"start": 0.0, "end": 0.5, "base": 4.0})
    c.rl = ml_collections.ConfigDict({
        "algorithm": "grpo",  # grpo | dr_grpo | rloo | ppo | reinforce_pp (zsjax.rl.algorithms)
        # the trajectory's reward: f1 (the paper's) | em | substring (zsjax.rl.rewards)
        "reward": "f1",
        # 64 questions x 5 rollouts; 1 epoch. Mini-batches (one optimizer step each):
        # mini_batches equal ones, or (mini_batch_size > 0) chunks of mini_batch_size
        # trajectories, the last one holding the rest, as the reference cuts them
        # (configs/zerosearch.py: 256 + 64).
        "questions_per_step": 64, "rollouts_per_question": 5, "mini_batch_size": 0,
        "mini_batches": 2, "epochs": 1,
        # gradient accumulation: micro-batches of the first (largest) mini-batch; the others
        # take micro-batches of as many rows
        "micro_batches": 1,
        # warmup_steps: training steps of linear warm-up (veRL steps its scheduler once a
        # step); every mini-batch update of a step gets that step's rate
        "lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.01, "grad_clip": 1.0, "clip": 0.2,
        "entropy_coef": 0.001, "kl_coef": 0.001, "kl_kind": "k3", "std_eps": 1e-6,
        "aggregation": "token-mean",  # token-mean | seq-mean-token-mean | seq-mean-token-sum
        "remat": False,
        # The PPO ratio's old logprobs: "recompute" them with a forward pass over the rollouts,
        # or take the "sampler"'s (one forward pass a step less). The sampler records the
        # model's logprobs at the sampling temperature before top-k/top-p, which is what the
        # forward pass computes: equal to ~1e-5 in float32.
        "old_logprobs": "recompute",
        # A regex over param paths (e.g. "embed") that the policy update leaves unchanged; they
        # are not differentiated either, so frozen lower layers cost only their forward pass
        # (e.g. "embed|layers_([0-9]|1[0-9])'" trains SmolLM2's top 10 of 30 layers: 2.9x the
        # tokens/s of training all of them on a CPU, docs/PERFORMANCE.md).
        "freeze": "",
        # PPO's critic and GAE.
        "critic_lr": 1e-5, "value_clip": 0.5, "gamma": 1.0, "lam": 1.0,
        # PPO and REINFORCE++ (the algorithms with the KL in the reward): "group" subtracts
        # each question's mean reward over its rollouts from the score before the returns are
        # taken (REINFORCE++-baseline); "none" leaves the batch-wide whitening as the only
        # baseline, as the reference does.
        "score_baseline": "none",
        # "loss": PPO and REINFORCE++ take the KL to the reference as a loss term (kl_coef x
        # the kl_kind estimate, a per-token mean, as GRPO does; veRL's use_kl_loss) instead of
        # in the reward; "" keeps each algorithm's own placement (zsjax.rl.algorithms.resolve)
        "kl_placement": ""})
    c.train = ml_collections.ConfigDict({
        "steps": 200, "log_every": 10, "checkpoint_every": 50, "keep_checkpoints": 3,
        "tensorboard": True, "progress": True,
        "max_nonfinite_steps": 3,  # stop after this many steps in a row with only NaN updates
        "eval_every": 0, "eval_batch_size": 64,
        # Weights & Biases: every metrics.jsonl key at its step, the config as the run's config;
        # off while project is "" (pip install wandb to use it; zsjax/metrics.py)
        "wandb": wandb_config()})
    # The training mesh over all processes' devices; -1 takes the remaining devices. 1 x 1 x 1
    # is one device.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    # Generation meshes, over each process's own devices (`devices`: a slice "A:B" of them).
    # Sizes all 0: the training mesh in a one-process run, else all local devices along data.
    # Some set: the others are 1, but data takes the rest (tensor=4 on 8 devices: data=2).
    # The simulator's all 0 and devices "": it shares the rollout mesh; e.g. devices "4:8"
    # with tensor=-1 puts it on a sub-mesh of its own. Params move between meshes in-program.
    c.rollout_mesh = ml_collections.ConfigDict({"data": 0, "fsdp": 0, "tensor": 0,
                                                "devices": ""})
    c.simulator_mesh = ml_collections.ConfigDict({"data": 0, "fsdp": 0, "tensor": 0,
                                                  "devices": ""})
    c.resume = True
    return c
