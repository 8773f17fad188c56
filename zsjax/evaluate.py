"""Greedy evaluation of a search agent on QA files, with any search backend.

    python -m zsjax.evaluate --config configs/evaluate.py --workdir DIR \\
        --config.policy.path=RUN_OR_HF_DIR --config.data.paths=a.jsonl,b.parquet \\
        [--config.backend.kind=simulator --config.backend.simulator_path=SIM_DIR]
        [--config.backend.kind=bm25 --config.backend.corpus=CORPUS.jsonl] [...]

Prints a table per dataset (exact match, the reference's "EM" = substring match, F1) and writes
the same numbers to DIR/eval.json. The policy is a Hugging Face folder, a `zsjax.train` workdir
or its checkpoints/ folder. The evaluation loop itself is `zsjax.search.evaluation.evaluate`
(also the trainer's periodic evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
import orbax.checkpoint as ocp

from zsjax import sharding
from zsjax.data import tiny_fixture
from zsjax.data.qa import QARow, dataset_names
from zsjax.data.sources import load_qa
from zsjax.errors import check_workdir
from zsjax.models import from_hf_dict, load_hf, param_shardings
from zsjax.models.config import read_hf_config
from zsjax.models.decoder import param_shapes
from zsjax.models.tokenizer import check_vocab, eos_ids, load_tokenizer
from zsjax.search import RolloutSettings
from zsjax.search.evaluation import evaluate, format_table
from zsjax.search.factory import check_backend, make_backend
from zsjax.search.http_backends import SearchBackendError
from zsjax.search.simulator import InProcessSimulator

_EXPECTED = ("a Hugging Face model folder (config.json + *.safetensors), a zsjax.train workdir "
             "or its checkpoints/ folder")


# --- Loading a policy -------------------------------------------------------------------------

def policy_source(path: str) -> tuple[str, str]:
    """("hf", folder) or ("checkpoint", checkpoints folder) for a policy path; raises when it is
    neither."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"policy path {path} does not exist; expected {_EXPECTED}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "checkpoint", os.path.join(path, "checkpoints")
    if os.path.isdir(path) and (os.path.basename(os.path.normpath(path)) == "checkpoints" or any(
            n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))):
        return "checkpoint", path
    raise ValueError(f"policy path {path} has no config.json and no checkpoints; expected "
                     f"{_EXPECTED}")


def _restore_params(ckpt_dir: str, step: int | None, dtype: str, mesh
                    ) -> tuple[object, dict, object, int]:
    """(config, params, tokenizer, step) from a zsjax.train checkpoint, restoring the policy's
    params only (no optimizer state)."""
    ckpt_dir = os.path.abspath(ckpt_dir)  # orbax takes absolute paths only
    with ocp.CheckpointManager(ckpt_dir, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}) as mgr:
        steps = list(mgr.all_steps())
        if not steps:
            raise ValueError(f"checkpoint dir {ckpt_dir} has no saved steps; expected orbax "
                             "checkpoints written by zsjax.train")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"checkpoint dir {ckpt_dir} has no step {step}; it has {steps}")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if "policy_config" not in meta:
            raise ValueError(f"checkpoint {ckpt_dir}/{step} has no policy_config in its meta; "
                             "expected a checkpoint written by zsjax.train")
        config = from_hf_dict(meta["policy_config"], dtype=dtype,
                              source=f"{ckpt_dir}/{step}/meta")
        # The tokenizer of the run's initial policy, or the exported policy_hf beside it.
        candidates = [meta.get("tokenizer_dir") or "",
                      os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "policy_hf")]
        tok_dir = next((d for d in candidates if os.path.exists(os.path.join(
            d, "tokenizer_config.json")) or os.path.exists(os.path.join(d, "tokenizer.json"))),
            None)
        if tok_dir is None:
            raise FileNotFoundError(f"checkpoint {ckpt_dir}/{step}: no tokenizer in any of "
                                    f"{[c for c in candidates if c]}")
        tokenizer = load_tokenizer(tok_dir)
        check_vocab(tokenizer, config, f"checkpoint {ckpt_dir}/{step} (tokenizer {tok_dir})")
        saved = mgr.item_metadata(step)["state"].tree
        if "layers" in saved[0]["params"]:  # trained with policy.scan_layers: stacked layers
            config = dataclasses.replace(config, scan_layers=True)
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, param_shapes(config))
        else:
            shardings = param_shardings(config, mesh)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              param_shapes(config), shardings)
        # The saved state is (TrainState(step, params, opt_state), critic_state): restore the
        # params and skip every other leaf.
        item = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved)
        item[0]["params"] = target
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)))).state
    return config, state[0]["params"], tokenizer, step


def _load(path: str, dtype: str, step: int | None, mesh=None):
    """load_policy, plus the checkpoint step restored (None for a Hugging Face folder)."""
    kind, where = policy_source(path)
    if kind == "checkpoint":
        return _restore_params(where, step, dtype, mesh)
    if step is not None:
        raise ValueError(f"policy step {step} given, but {path} is a Hugging Face folder, "
                         "which has no steps")
    hf_config = read_hf_config(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, hf_config, f"model dir {path}")
    config, params = load_hf(path, dtype=dtype, mesh=mesh)
    return config, params, tokenizer, None


def load_policy(path: str, *, dtype: str = "float32", step: int | None = None, mesh=None):
    """(config, params, tokenizer) from a Hugging Face folder, a zsjax.train workdir or its
    checkpoints/ folder (the latest step, or `step`)."""
    return _load(path, dtype, step, mesh)[:3]


# --- The command line ------------------------------------------------------------------------

def read_datasets(paths: Sequence[str], limit: int = 0) -> dict[str, list[QARow]]:
    """QA files or tfds specs -> {name: rows} (the first `limit` rows when limit > 0); a file is
    named by its file name without the extension, with its folder where two files share that
    (`zsjax.data.qa.dataset_names`)."""
    datasets = {}
    for path, name in zip(paths, dataset_names(paths)):
        rows = load_qa(path)
        datasets[name] = rows[:limit] if limit > 0 else rows
    return datasets


def _check_config(config) -> None:
    if not config.policy.path:
        raise ValueError("config.policy.path is empty: --config.policy.path=DIR (" + _EXPECTED
                         + ")")
    if not config.data.paths:
        raise ValueError("config.data.paths is empty: --config.data.paths=a.jsonl,b.parquet")
    if config.batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1; got {config.batch_size}")
    b = config.backend
    check_backend(b.kind, url=b.url, corpus=b.corpus, top_k=b.top_k)
    if b.kind == "simulator":
        if not b.simulator_path:
            raise ValueError("config.backend.kind='simulator' needs "
                             "config.backend.simulator_path (a Hugging Face model folder)")
        read_hf_config(b.simulator_path)  # it exists and has a readable config.json


def _make_backend(b, policy, seed: int, mesh):
    """The search backend from config.backend (`zsjax.search.factory`); `policy` = (path,
    dtype, config, params, tokenizer), reused when the simulator is the policy's own folder."""
    def simulator():
        path, dtype, *model = policy
        if os.path.abspath(b.simulator_path) == os.path.abspath(path) and b.dtype == dtype:
            config, params, tokenizer = model
        else:
            tokenizer = load_tokenizer(b.simulator_path)
            check_vocab(tokenizer, read_hf_config(b.simulator_path), f"simulator "
                         f"{b.simulator_path}")
            config, params = load_hf(b.simulator_path, dtype=b.dtype, mesh=mesh)
        return InProcessSimulator(config, params, tokenizer, style=b.style or "finetuned",
                                  temperature=b.temperature, max_new_tokens=b.max_new_tokens,
                                  top_k_docs=b.top_k_docs, seed=seed,
                                  eos_token_ids=eos_ids(b.simulator_path, config, tokenizer))

    return make_backend(b.kind, url=b.url, model=b.get("model") or "", corpus=b.corpus,
                        top_k=b.top_k, style=b.style or "finetuned", temperature=b.temperature,
                        max_new_tokens=b.max_new_tokens, top_k_docs=b.top_k_docs,
                        simulator=simulator)


def run(config, workdir: str) -> dict[str, dict]:
    """Evaluates per `config` (configs/evaluate.py): checks every input before any model is
    loaded, prints the table, writes WORKDIR/eval.json; returns the per-dataset results."""
    check_workdir(workdir)
    paths = (config.policy.path, config.backend.simulator_path, config.data.paths)
    if config.tiny_fixture and not all(paths):
        fx = tiny_fixture.make(os.path.join(workdir, "fixture"), seed=config.seed)
        config = config.copy_and_resolve_references()  # the caller's config stays as it was
        config.policy.path = config.policy.path or fx["policy"]
        config.backend.simulator_path = config.backend.simulator_path or fx["simulator"]
        config.data.paths = config.data.paths or fx["qa"]
    _check_config(config)
    policy_path = config.policy.path
    policy_source(policy_path)
    datasets = read_datasets([p.strip() for p in config.data.paths.split(",") if p.strip()],
                             config.data.limit)
    mesh = sharding.mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    step = None if config.policy.step < 0 else config.policy.step
    model_config, params, tokenizer, step = _load(policy_path, config.policy.dtype, step, mesh)
    backend = _make_backend(config.backend, (policy_path, config.policy.dtype, model_config,
                                             params, tokenizer), config.seed, mesh)
    settings = RolloutSettings(
        max_turns=config.rollout.max_turns, max_response_tokens=config.rollout.max_response_tokens,
        max_prompt_tokens=config.rollout.max_prompt_tokens,
        max_obs_tokens=config.rollout.max_obs_tokens, temperature=0.0)
    results = evaluate(model_config, params, tokenizer, datasets, backend, settings=settings,
                       batch_size=config.batch_size, seed=config.seed,
                       eos_token_ids=eos_ids(tokenizer.name_or_path, model_config, tokenizer),
                       progress=config.progress)
    print(format_table(results))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump({"policy": policy_path, "step": step, "backend": config.backend.kind,
                   "results": results}, f, indent=2)
    return results


def _main(config, workdir: str) -> None:
    """run(), with bad input (or an unreachable search server) reported as one line, exit 2."""
    try:
        run(config, workdir)
    except (FileNotFoundError, ValueError, SearchBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from zsjax.cli import run_config_program
    run_config_program(_main)
