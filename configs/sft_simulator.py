"""Simulator fine-tuning (ZeroSearch section "simulator fine-tuning": lr 1e-6, ~1000 steps, loss on
the document tokens only).

    python -m zsjax.sft --config configs/sft_simulator.py:/path/to/hf_model \\
        --workdir runs/sim --config.data.path=pairs.jsonl [--config.train.steps=1000]
"""

import ml_collections

from configs.common import lora_config, wandb_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # dtype: compute; param_dtype: the trained weights and AdamW's moments (float32: a
    # bfloat16 weight would not move under lr 1e-6 updates, see configs/common.py)
    # lora: adapters only (configs/common.py's lora_config; rank 0: off)
    c.model = ml_collections.ConfigDict({"path": arg, "dtype": "float32",
                                         "param_dtype": "float32", "lora": lora_config()})
    c.data = ml_collections.ConfigDict({
        "path": "",  # jsonl rows {query, question, golden_answers, documents, label}
        "prompt_style": "finetuned",  # or "prompt_only"
        "max_length": 1024,
        "use_chat_template": "auto",  # "auto" | "yes" | "no"
        "length_multiple": 64,  # batches are padded to a multiple of this many tokens
    })
    c.train = ml_collections.ConfigDict({
        "steps": 1000, "batch_size": 32, "micro_batches": 1, "lr": 1e-6, "warmup_steps": 0,
        # "constant" after the warm-up, or "cosine": down to 0 at the last step
        "lr_decay": "constant",
        "weight_decay": 0.01, "grad_clip": 1.0, "seed": 0, "remat": False,
        "log_every": 10, "checkpoint_every": 200, "keep_checkpoints": 3,
        # a regex over param paths left out of training and of the backward pass (see
        # configs/common.py's rl.freeze)
        "freeze": "",
        # Weights & Biases, as in the training configs (configs/common.py)
        "wandb": wandb_config(),
    })
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.resume = True  # pick up the latest checkpoint in workdir/checkpoints
    c.export_dir = ""  # default: WORKDIR/simulator_hf
    c.lock()
    return c
