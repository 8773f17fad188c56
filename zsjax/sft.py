"""Supervised fine-tuning of a simulator on (query, documents) pairs, loss on the documents only.

    python -m zsjax.sft --config configs/sft_simulator.py:MODEL_DIR --workdir DIR \\
        --config.data.path=pairs.jsonl [--config.train.steps=N ...]

Writes DIR/metrics.jsonl, orbax checkpoints in DIR/checkpoints (resumed automatically), and the
fine-tuned model as a Hugging Face folder in DIR/simulator_hf (or config.export_dir); with
`model.lora.rank > 0` only adapters are trained, and DIR/simulator_peft holds them as a PEFT
adapter folder beside the merged export. SIGTERM
or Ctrl-C ends the run after the step in progress, with a checkpoint of it and exit status 143
(130 for Ctrl-C).
"""

from __future__ import annotations

import os
import re
import sys
import time

import jax

from zsjax import sharding
from zsjax.data import sft_data
from zsjax.errors import InputError
from zsjax.loop import TrainingLoop
from zsjax.metrics import WandbSettings
from zsjax.models import load_hf, lora, save_hf
from zsjax.models.config import DTYPES
from zsjax.models.tokenizer import load_tokenizer
from zsjax.rl import update as U


def _check(config):
    """Checks `config` before any compute; returns its LoRA settings (None without LoRA)."""
    if not config.model.path:
        raise InputError("config.model.path is empty: pass the model folder as the config "
                         "argument (configs/sft_simulator.py:DIR) or --config.model.path=DIR")
    if not config.data.path:
        raise InputError("config.data.path is empty: --config.data.path=pairs.jsonl")
    if config.data.length_multiple < 1:
        raise InputError(f"data.length_multiple must be >= 1; got {config.data.length_multiple}")
    if config.data.use_chat_template not in ("auto", "yes", "no"):
        raise InputError(f"data.use_chat_template must be auto, yes or no; got "
                         f"{config.data.use_chat_template!r}")
    tc = config.train
    for key in ("steps", "batch_size", "micro_batches", "keep_checkpoints"):
        if not isinstance(tc[key], int) or tc[key] < 1:
            raise InputError(f"train.{key} must be an integer >= 1; got {tc[key]!r}")
    for key in ("log_every", "checkpoint_every"):
        if not isinstance(tc[key], int) or tc[key] < 0:
            raise InputError(f"train.{key} must be an integer >= 0 (0: never; the last step "
                             f"is always logged and checkpointed); got {tc[key]!r}")
    if tc.batch_size % tc.micro_batches:
        raise InputError(f"train.batch_size={tc.batch_size} does not split into "
                         f"train.micro_batches={tc.micro_batches} equal micro-batches")
    if config.model.param_dtype not in DTYPES:
        raise InputError(f"model.param_dtype={config.model.param_dtype!r}; expected one of "
                         f"{DTYPES}")
    try:
        WandbSettings.from_config(tc.wandb).check("train.wandb")
    except ValueError as e:
        raise InputError(str(e)) from None
    if tc.lr_decay not in U.DECAYS:
        raise InputError(f"train.lr_decay={tc.lr_decay!r}; expected one of {U.DECAYS}")
    if tc.lr_decay == "cosine" and tc.steps <= tc.warmup_steps:
        raise InputError(f"train.lr_decay='cosine' needs train.steps ({tc.steps}) > "
                         f"train.warmup_steps ({tc.warmup_steps})")
    try:
        lora_cfg = lora.from_training_config(config.model.get("lora"), tc.freeze, "model.lora",
                                             "train.freeze")
    except ValueError as e:
        raise InputError(str(e)) from None
    return lora_cfg


def run(config, workdir: str) -> dict:
    """Trains per `config`; returns the final metrics. Importable (tests, notebooks)."""
    lora_cfg = _check(config)
    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    try:  # bad input: a one-line error (status 2 from the command line), before any compute
        mesh = sharding.mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        # with LoRA the base is not trained: held in the compute dtype
        model_config, params = load_hf(
            config.model.path, dtype=config.model.dtype,
            param_dtype=config.model.dtype if lora_cfg else config.model.param_dtype, mesh=mesh)
        if lora_cfg is not None:
            params = lora.attach(params, lora_cfg, jax.random.key(tc.seed))
        tokenizer = load_tokenizer(config.model.path)
        chat = {"auto": None, "yes": True, "no": False}[config.data.use_chat_template]
        rows = sft_data.read_rows(config.data.path)
        examples = [sft_data.build_example(r, tokenizer, style=config.data.prompt_style,
                                           max_length=config.data.max_length,
                                           use_chat_template=chat) for r in rows]
    except (FileNotFoundError, ValueError) as e:  # ConfigError, CheckpointError among them
        raise InputError(str(e)) from None
    freeze = lora.FROZEN if lora_cfg is not None else tc.freeze
    if lora_cfg is not None:
        print(f"[sft] model.lora: rank {lora_cfg.rank} adapters on {len(params.adapters)} "
              f"kernels, {lora.count(params.adapters) / 1e6:.2f}M trained params",
              file=sys.stderr)
    try:
        tx = U.make_optimizer(tc.lr, warmup_steps=tc.warmup_steps,
                              weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                              freeze=freeze, decay=tc.lr_decay, total_steps=tc.steps)
    except (ValueError, re.error) as e:  # a bad pattern, or one matching nothing
        raise InputError(f"train.freeze: {e}") from None
    if tc.freeze and lora_cfg is None:
        print(f"[sft] train.freeze: {U.describe_frozen(params, tc.freeze)}", file=sys.stderr)
    state = U.init_state(params, tx)
    loop = TrainingLoop(workdir, steps=tc.steps, checkpoint_every=tc.checkpoint_every,
                        keep=tc.keep_checkpoints, resume=config.resume,
                        wandb=WandbSettings.from_config(tc.wandb), run_config=config.to_dict())
    # The loop's step, not the optimizer's count, which skipped non-finite updates leave behind.
    if config.resume and loop.ckpt.latest_step() is not None:
        try:
            lora.check_resumable((loop.ckpt.restore_meta() or {}).get("lora"), lora_cfg,
                                 workdir)
        except ValueError as e:
            raise InputError(f"model.lora: {e}") from None
    saved, meta = loop.restore(lora.saved_part(state))  # under LoRA: the adapters only
    state = lora.with_saved(state, saved)
    position = meta["data_position"] if meta else 0
    if meta:
        print(f"[sft] resumed from step {loop.start}", file=sys.stderr)

    steps_fns = {}
    stream = sft_data.batches(examples, tc.batch_size, seed=tc.seed, start=position,
                              length_multiple=config.data.length_multiple)
    last = {}
    t0 = time.time()
    with loop:
        for step in range(loop.start, tc.steps):
            position, tokens, attn, mask = next(stream)
            batch = U.sft_batch(tokens, attn, mask)
            # One compiled step per (padded width, first position whose logits the loss needs,
            # length of the prefix every row shares: a templated prompt's, run once).
            width = tokens.shape[1]
            start = U.compiled_start(steps_fns, width, U.loss_start(mask))
            key = (width, start, U.shared_prefix_length(tokens, attn, start))
            if key not in steps_fns:
                steps_fns[key] = U.jit_step(U.supervised_step, state, batch, mesh=mesh,
                                            config=model_config, tx=tx, n_micro=tc.micro_batches,
                                            remat=tc.remat, logits_from=start,
                                            shared_prefix=key[2], freeze=freeze)
            state, m = U.run_step(steps_fns[key], state, batch)
            last = {"step": step + 1, **{k: round(v, 6) for k, v in m.items()}}
            loop.log(last)
            if (tc.log_every and (step + 1) % tc.log_every == 0) or step + 1 == tc.steps:
                print(f"[sft] step {step + 1}/{tc.steps} loss {m['loss']:.4f} grad_norm "
                      f"{m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s "
                      f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            if loop.end_step(step, lora.saved_part(state), {"data_position": position,
                                                            "lora": lora.record(lora_cfg)}):
                break  # SIGTERM or Ctrl-C: checkpointed; leaving the block raises Stopped
    export = config.export_dir or os.path.join(workdir, "simulator_hf")
    final = jax.device_get(state.params)
    save_hf(model_config, lora.weights(final), export, tokenizer_dir=config.model.path)
    print(f"[sft] exported {export}", file=sys.stderr)
    if lora_cfg is not None:
        peft_dir = os.path.join(workdir, "simulator_peft")
        lora.save_peft(final.adapters, lora_cfg, peft_dir,
                       base_model=os.path.abspath(config.model.path))
        print(f"[sft] exported the adapters as a PEFT folder: {peft_dir}", file=sys.stderr)
    return last


if __name__ == "__main__":
    from zsjax.cli import run_config_program
    run_config_program(run)
