"""The generic training step: a loss accumulated over micro-batches, divided once by the whole
batch's denominator, then one optimizer step (global-norm clipping inside the optimizer),
skipped when anything is not finite. The policy (`zsjax.rl.update`), the critic
(`zsjax.rl.critic`) and supervised fine-tuning share it; also the train state, the optimizer
(with frozen params) and the jitted, sharded wrapper of a step.

Every per-token array in a `Batch` is aligned to token positions: `loss_mask[b, t] = 1` means
token t was written by the policy, and `old_logprobs[b, t]` is log p(tokens[t] | tokens[<t]).
Position 0 never carries a loss. Losses return (sum, denominator); the step sums gradients of the
sums over micro-batches (a `lax.scan`) and divides once by the whole batch's denominator, so any
micro-batch split gives the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from zsjax import sharding


@flax.struct.dataclass
class Batch:
    tokens: jax.Array  # [B, T] int32, prompt + response, right-padded
    attention_mask: jax.Array  # [B, T] bool
    loss_mask: jax.Array  # [B, T] float32, 1 on policy tokens
    old_logprobs: jax.Array  # [B, T] float32
    advantages: jax.Array  # [B, T] float32
    ref_logprobs: jax.Array | None = None  # [B, T], for a KL loss
    old_values: jax.Array | None = None  # [B, T], critic
    returns: jax.Array | None = None  # [B, T], critic


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    entropy_coef: float = 0.001
    kl_coef: float = 0.0  # > 0 adds coef * KL(policy || reference) to the loss (GRPO: 0.001)
    kl_kind: str = "k3"
    aggregation: str = "token-mean"
    temperature: float = 1.0  # logits are divided by it, as the sampler did
    value_clip: float = 0.5


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


DECAYS = ("constant", "cosine")


def make_optimizer(lr: float = 1e-6, *, warmup_steps: int = 0, weight_decay: float = 0.01,
                   grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   freeze: str = "", updates_per_step: int = 1, decay: str = "constant",
                   total_steps: int = 0) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, at a rate that warms up linearly, then stays constant
    (`decay="constant"`) or follows a cosine down to 0 at `total_steps` (`decay="cosine"`).

    `warmup_steps` counts training steps of `updates_per_step` optimizer updates each (its
    mini-batches times its epochs): every update of a step gets that step's rate, as veRL
    steps its scheduler once a training step. (A skipped, non-finite update is not counted,
    so the warm-up after one runs an update behind.)

    `freeze`: a regular expression searched in each param's path (`jax.tree_util.keystr`, e.g.
    "['embed']['embedding']"); the params it matches are never updated and get no optimizer
    state. Why one would: Adam turns the small, one-signed gradients that a softmax gives to
    tokens a batch never uses into full-size steps, so an embedding row that RL never sees (a
    name only in held-out questions) drifts anyway; freezing the table keeps it as the warm
    start left it."""
    if decay not in DECAYS:
        raise ValueError(f"unknown learning-rate decay {decay!r}; expected one of {DECAYS}")
    if decay == "cosine" and total_steps <= warmup_steps:
        raise ValueError(f"a cosine decay needs total_steps ({total_steps}) > warmup_steps "
                         f"({warmup_steps})")
    schedule = (optax.constant_schedule(lr) if decay == "constant"
                else optax.cosine_decay_schedule(lr, total_steps - warmup_steps))
    if warmup_steps > 0 or decay != "constant":
        by_step = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), schedule],
                                       [warmup_steps])
        schedule = lambda count: by_step(count // updates_per_step)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    if not freeze:
        return tx

    def labels(params):
        return jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(params, freeze))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_mask(params, freeze: str):
    """A pytree of bools like `params`: True where the regex `freeze` is found in the param's
    path (`jax.tree_util.keystr`); an error when it matches nothing."""
    pattern = re.compile(freeze)
    out = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(pattern.search(jax.tree_util.keystr(path))), params)
    if not any(jax.tree.leaves(out)):
        first = jax.tree_util.tree_flatten_with_path(params)[0][0][0]
        raise ValueError(f"freeze={freeze!r} matches no parameter; paths look like "
                         f"{jax.tree_util.keystr(first)}")
    return out


def describe_frozen(params, freeze: str) -> str:
    """How much of the model `freeze` leaves out of training, for the logs (a typo in part
    of a pattern otherwise goes unnoticed when another part matches)."""
    flags = jax.tree.leaves(frozen_mask(params, freeze))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    frozen = sum(n for n, f in zip(sizes, flags) if f)
    return (f"{sum(flags)} of {len(flags)} param arrays frozen, {frozen / 1e6:.1f}M of "
            f"{sum(sizes) / 1e6:.1f}M params")


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Optimizer state whose per-param leaves (Adam's moments) are sharded exactly like the
    params, with scalars (step, Adam's count) replicated over the params' mesh."""
    mesh = sharding.mesh_of(params)
    if mesh is None:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=jax.jit(tx.init)(params))
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    # An optimizer-state leaf that is a copy of a param (Adam's moments) ends with that
    # param's path and has its shape; everything else (counts) is replicated. Matching on paths
    # rather than with optax.tree_map_params also covers multi_transform (`freeze`), whose
    # labels need the real params.
    by_path = {tuple(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def leaf_sharding(path, leaf):
        for i in range(len(path)):
            x = by_path.get(tuple(path[i:]))
            if x is not None and x.shape == leaf.shape:
                return x.sharding
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(leaf_sharding,
                                                     jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                      opt_state=opt_state)


def _split(batch, n_micro: int):
    def split(x):
        if x is None:
            return None
        if x.shape[0] % n_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n_micro} "
                             "micro-batches")
        return x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:])
    return jax.tree.map(split, batch)


def accumulate(loss_fn, params, batch, n_micro: int, freeze: str = ""):
    """Sums (grads, metric sums) of loss_fn over micro-batches with a scan.

    `freeze`: the params whose path matches it (`frozen_mask`) get zero gradients without
    computing them: the loss is differentiated with respect to the others only, so no backward
    pass runs through what depends on frozen params alone (frozen lower layers and embeddings
    cost their forward pass only)."""
    micro = _split(batch, n_micro)
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(frozen_mask(params, freeze)) if freeze else [False] * len(leaves)
    frozen = [x for x, f in zip(leaves, flags) if f]

    def merge(trained, fixed):
        t, x = iter(trained), iter(fixed)
        return treedef.unflatten([next(x) if f else next(t) for f in flags])

    def loss_of_trained(trained, mb):
        return loss_fn(merge(trained, frozen), mb)

    def body(acc, mb):
        (_, metrics), grads = jax.value_and_grad(loss_of_trained, has_aux=True)(trained, mb)
        return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    trained = [x for x, f in zip(leaves, flags) if not f]
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda p, b: (jax.grad(lambda q: loss_of_trained(q, b)[0])(p),
                      loss_of_trained(p, b)[1]), trained, first))
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    return merge(grads, [jnp.zeros_like(x) for x in frozen]), metrics


def apply(state: TrainState, grads, tx, metrics: dict):
    """The optimizer step, skipped (state unchanged, step not counted) when the gradients or
    the loss are not finite; `metrics["nonfinite"]` is 1.0 for a skipped step."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    ok = jnp.isfinite(optax.global_norm(grads))
    for v in metrics.values():
        ok &= jnp.all(jnp.isfinite(v))
    metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)


def scaled_gradients(loss_fn: Callable, params, batch, *, denom, n_micro: int = 1,
                     freeze: str = "", norm_key: str = "grad_norm"):
    """(gradients, metrics) of a batch: `loss_fn(params, micro_batch) -> (loss sum, metric
    sums)` accumulated over `n_micro` micro-batches and divided once by `denom` (the whole
    batch's denominator), with the gradients' global norm under `norm_key`. `freeze`: params
    left out of the gradient (zeros; see `accumulate`)."""
    grads, sums = accumulate(loss_fn, params, batch, n_micro, freeze)
    scale = 1.0 / jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = {k: v * scale for k, v in sums.items()}
    metrics[norm_key] = optax.global_norm(grads)
    return grads, metrics


def gradient_step(state: TrainState, batch, loss_fn: Callable, *, tx, denom, n_micro: int = 1,
                  freeze: str = "", norm_key: str = "grad_norm", extra: dict | None = None):
    """One optimizer step of any loss: `scaled_gradients`, then `apply`. `extra`: metrics
    computed outside the loss (e.g. the batch's token count). Returns (new state, metrics)."""
    grads, metrics = scaled_gradients(loss_fn, state.params, batch, denom=denom,
                                      n_micro=n_micro, freeze=freeze, norm_key=norm_key)
    metrics.update(extra or {})
    return apply(state, grads, tx, metrics), metrics


def state_shardings(state: TrainState):
    """The shardings the state's arrays live on (params from the logical rules; optimizer
    moments inherit them), to pass as explicit in/out shardings."""
    return jax.tree.map(lambda x: x.sharding, state)


def batch_shardings(batch: Batch, mesh, rules=sharding.DEFAULT_RULES):
    """Rows over data x fsdp for every [B, T] array of the batch."""
    return jax.tree.map(lambda x: sharding.named_sharding(("batch", "length"), x.shape, mesh,
                                                          rules), batch)


def jit_step(step_fn, state: TrainState, batch_like: Batch, *, mesh=None,
             rules=sharding.DEFAULT_RULES, **kwargs):
    """`step_fn(state, batch, **kwargs)` under jax.jit with explicit in/out shardings (pjit):
    the state keeps its own shardings, the batch rows go over data x fsdp (the batch is put
    there first), metrics are replicated; the state is donated. Without a mesh, a plain jit."""
    fn = functools.partial(step_fn, mesh=mesh, rules=rules, **kwargs)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    s_state = state_shardings(state)
    s_batch = batch_shardings(batch_like, mesh, rules)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(s_state, s_batch), out_shardings=(s_state, replicated),
                     donate_argnums=0)

    def step(state, batch):
        # Batch arrays may arrive committed to another layout (e.g. advantages computed by a
        # replicated program): move them to the rows-over-data layout the program expects.
        return jitted(state, jax.device_put(batch, s_batch))
    return step


def run_step(step_fn, state, batch: Batch):
    """Runs a jitted step, waits for it, and returns (state, host metrics) with `step_s` and
    `tokens_per_s` (non-padding tokens of the batch per second of wall time)."""
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - start
    out = {k: float(v) for k, v in metrics.items()}
    out["step_s"] = seconds
    out["tokens_per_s"] = out.get("tokens", 0.0) / seconds
    return state, out
