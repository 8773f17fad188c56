"""The policy (and critic) update: one jitted, sharded step with exact micro-batch accumulation.

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
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding

from zsjax import sharding
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder
from zsjax.rl import losses as L


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


def make_optimizer(lr: float = 1e-6, *, warmup_steps: int = 0, weight_decay: float = 0.01,
                   grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   freeze: str = "", updates_per_step: int = 1) -> optax.GradientTransformation:
    """AdamW at a constant rate after a linear warm-up, after global-norm clipping.

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
    schedule = optax.constant_schedule(lr)
    if warmup_steps > 0:
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


def token_logprobs_from_logits(logits_btv, tokens_bt, temperature: float = 1.0,
                               logits_from: int = 0):
    """log p(tokens[t] | tokens[<t]) aligned to t ([B, T], 0 at t = 0) and the entropy of the
    distribution that predicted token t ([B, T]). `temperature` is a Python float.

    `logits_btv` holds positions [logits_from, T) or [logits_from, T - 1) of the sequence (the
    last position predicts nothing); both outputs are 0 at t <= logits_from."""
    span = tokens_bt.shape[1] - 1 - logits_from
    if logits_btv.shape[1] not in (span, span + 1):
        raise ValueError(f"logits cover {logits_btv.shape[1]} positions; from position "
                         f"{logits_from} of a length-{tokens_bt.shape[1]} sequence expected "
                         f"{span} or {span + 1}")
    picked, entropy = _picked_and_entropy(logits_btv[:, :span], tokens_bt[:, logits_from + 1:],
                                          temperature)
    pad = jnp.zeros((tokens_bt.shape[0], logits_from + 1), jnp.float32)
    return (jnp.concatenate([pad, picked], axis=1), jnp.concatenate([pad, entropy], axis=1))


def _model_logprobs(model, params, tokens_bt, attention_mask_bt, temperature: float = 1.0,
                    logits_from: int = 0):
    """`token_logprobs_from_logits` of `model`'s forward pass, which computes logits at
    positions [logits_from, T - 1) only: a training batch needs none at its prompt's positions,
    and the lm_head and the loss over the vocabulary are a large part of a small model's step.
    Nothing about the sequence's other positions changes (attention still sees every token)."""
    t = tokens_bt.shape[1]
    if not 0 <= logits_from <= t - 2:
        raise ValueError(f"logits_from {logits_from} must be in [0, {t - 2}] for sequences of "
                         f"length {t}")
    logits, _ = model.apply({"params": params}, tokens_bt, _positions(attention_mask_bt), None,
                            attention_mask_bt, logits_positions=(logits_from, t - 1))
    return token_logprobs_from_logits(logits, tokens_bt, temperature, logits_from)


def _log_normalizer(z):
    m = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    return m + jnp.log(jnp.exp(z - m).sum(-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _picked_and_entropy(logits_btv, next_bt, temperature: float):
    """log softmax(logits / T)[next] and the entropy, [B, T] each (T a Python float). The
    backward pass is one elementwise expression over [B, T, V]: autodiff kept log_softmax's
    [B, T, V] result and scattered the picked token's gradient through a one-hot it built in
    memory."""
    return _picked_and_entropy_fwd(logits_btv, next_bt, temperature)[0]


def _picked_and_entropy_fwd(logits_btv, next_bt, temperature):
    z = logits_btv.astype(jnp.float32) / temperature
    lse = _log_normalizer(z)
    picked = jnp.take_along_axis(z, next_bt[..., None], axis=-1)[..., 0] - lse[..., 0]
    entropy = -(jnp.exp(z - lse) * (z - lse)).sum(-1)
    return (picked, entropy), (logits_btv, next_bt, lse, entropy)


def _picked_and_entropy_bwd(temperature, res, cotangents):
    logits_btv, next_bt, lse, entropy = res
    d_picked, d_entropy = cotangents
    logp = logits_btv.astype(jnp.float32) / temperature - lse
    p = jnp.exp(logp)
    one_hot = jnp.arange(logp.shape[-1]) == next_bt[..., None]
    # d logp[next] / dz = one_hot - p;  d entropy / dz = -p (logp + entropy)
    dz = (d_picked[..., None] * (one_hot - p)
          - d_entropy[..., None] * p * (logp + entropy[..., None]))
    return (dz / temperature).astype(logits_btv.dtype), None


_picked_and_entropy.defvjp(_picked_and_entropy_fwd, _picked_and_entropy_bwd)


def _positions(mask_bt):
    return jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0).astype(jnp.int32)


def policy_terms_from_logits(logits_btv, batch: Batch, cfg: LossConfig):
    """(loss sum, metric sums) of one micro-batch, given its logits. Denominators come apart."""
    logp, entropy = token_logprobs_from_logits(logits_btv, batch.tokens, cfg.temperature)
    return policy_terms(logp, entropy, batch, cfg)


def policy_terms(logp, entropy, batch: Batch, cfg: LossConfig):
    """`policy_terms_from_logits` given the token logprobs and entropies [B, T]."""
    mask = batch.loss_mask
    per_token, clipped = L.ppo_clip_terms(logp, batch.old_logprobs, batch.advantages,
                                          clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                          dual_clip=cfg.dual_clip)
    pg_sum, _ = L.aggregate(per_token, mask, cfg.aggregation)
    ent_sum, _ = L.aggregate(entropy, mask, cfg.aggregation)
    total = pg_sum - cfg.entropy_coef * ent_sum
    metrics = {"policy_loss": pg_sum, "entropy": ent_sum,
               "clip_fraction": L.aggregate(clipped.astype(jnp.float32), mask,
                                            cfg.aggregation)[0],
               "approx_kl_old": L.aggregate(0.5 * (logp - batch.old_logprobs) ** 2, mask,
                                            cfg.aggregation)[0]}
    if batch.ref_logprobs is not None:
        kl_sum, _ = L.aggregate(L.kl_estimate(logp, batch.ref_logprobs, cfg.kl_kind), mask,
                                cfg.aggregation)
        metrics["kl"] = kl_sum
        if cfg.kl_coef:
            total = total + cfg.kl_coef * kl_sum  # added: the reference's minus is a sign bug
    return total, metrics


def _split(batch, n_micro: int):
    def split(x):
        if x is None:
            return None
        if x.shape[0] % n_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n_micro} "
                             "micro-batches")
        return x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:])
    return jax.tree.map(split, batch)


def _accumulate(loss_fn, params, batch, n_micro: int, freeze: str = ""):
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


def _apply(state: TrainState, grads, tx, metrics: dict):
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


def policy_gradients(params, batch: Batch, *, config: ModelConfig, cfg: LossConfig,
                     n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES,
                     remat: bool = False, logits_from: int = 0, freeze: str = ""):
    """Gradient of the batch's loss (its global mean under cfg.aggregation) and metrics.

    `logits_from` (static) skips the logits of positions < logits_from: every row's loss mask
    must be 0 at t <= logits_from (those tokens' logprobs would be taken as 0). A batch whose
    prompts fill the first P positions of every row can use any logits_from <= P - 1 and get
    the same step with less work; see `loss_start`. `freeze`: params left out of the
    gradient (zeros; see `_accumulate`)."""
    model = Decoder(config, mesh, sharding.as_rules(rules), remat=remat)
    denom = L.aggregate(batch.loss_mask, batch.loss_mask, cfg.aggregation)[1]

    def loss_fn(params, mb: Batch):
        logp, entropy = _model_logprobs(model, params, mb.tokens, mb.attention_mask,
                                        cfg.temperature, logits_from)
        return policy_terms(logp, entropy, mb, cfg)

    grads, sums = _accumulate(loss_fn, params, batch, n_micro, freeze)
    scale = 1.0 / jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = {k: v * scale for k, v in sums.items()}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["tokens"] = batch.attention_mask.sum()
    return grads, metrics


def policy_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx, cfg: LossConfig,
                n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False,
                logits_from: int = 0, freeze: str = ""):
    """One optimizer step on the policy; returns (new state, metrics). Unjitted: see
    `make_policy_step` for the sharded, jitted, donated version. `freeze`: the optimizer's
    (`make_optimizer`), whose params are then not differentiated at all."""
    grads, metrics = policy_gradients(state.params, batch, config=config, cfg=cfg,
                                      n_micro=n_micro, mesh=mesh, rules=rules, remat=remat,
                                      logits_from=logits_from, freeze=freeze)
    return _apply(state, grads, tx, metrics), metrics


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


def make_policy_step(state: TrainState, batch_like: Batch, *, config: ModelConfig, tx,
                     cfg: LossConfig, n_micro: int = 1, mesh=None,
                     rules=sharding.DEFAULT_RULES, remat: bool = False, logits_from: int = 0,
                     freeze: str = ""):
    """`policy_step`, jitted and sharded (see `jit_step`)."""
    return jit_step(policy_step, state, batch_like, mesh=mesh, rules=rules, config=config, tx=tx,
                    cfg=cfg, n_micro=n_micro, remat=remat, logits_from=logits_from,
                    freeze=freeze)


def loss_start(loss_mask_bt, multiple: int = 16) -> int:
    """A `logits_from` for a batch, from its host-side loss mask [B, T]: the position before
    its earliest loss token, rounded down to a multiple of `multiple` so that batches with
    slightly different prompts share a compiled step. With no token in the loss, the latest
    position allowed (T - 2, rounded down), so that a minimum over processes ignores it."""
    mask = np.asarray(loss_mask_bt) != 0
    rows = mask.any(axis=1)
    first = int(mask[rows].argmax(axis=1).min()) if rows.any() else mask.shape[1] - 1
    return max(first - 1, 0) // multiple * multiple


def compiled_start(compiled, width: int, start: int) -> int:
    """`start`, or the largest logits_from <= start among the (width, logits_from) keys of
    `compiled` (a dict of compiled steps) for this width: a step compiled for an earlier start
    is valid for the batch, so a batch whose prompts are longer reuses it."""
    return max((key[1] for key in compiled
                if isinstance(key, tuple) and key[0] == width and key[1] <= start),
               default=start)


# --- Forward-only passes: old policy, reference policy, critic ------------------------------

def logprobs_pass(config: ModelConfig, params, tokens_bt, attention_mask_bt, *,
                  micro_batch: int, temperature: float = 1.0, mesh=None,
                  rules=sharding.DEFAULT_RULES, logits_from: int = 0):
    """log p(tokens[t] | tokens[<t]) [B, T] computed micro-batch by micro-batch (a scan), for
    the old and the reference policy; 0 at t <= logits_from (see `policy_gradients`)."""
    return _logprobs_jit(config, params, tokens_bt, attention_mask_bt, micro_batch, temperature,
                         mesh, sharding.as_rules(rules), logits_from)


def _scan_micro_batches(fn, micro_batch: int, tokens, mask):
    """fn(tokens [m, T], mask [m, T]) -> [m, T], run over micro-batches of m rows (a scan)."""
    b = tokens.shape[0]
    if b % micro_batch:
        raise ValueError(f"batch of {b} rows does not split into micro-batches of {micro_batch}")
    split = lambda x: x.reshape((b // micro_batch, micro_batch) + x.shape[1:])  # noqa: E731
    _, out = jax.lax.scan(lambda _, xs: (None, fn(*xs)), None, (split(tokens), split(mask)))
    return out.reshape(tokens.shape)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _logprobs_jit(config, params, tokens, mask, micro_batch, temperature, mesh, rules,
                  logits_from):
    model = Decoder(config, mesh, rules)

    def fn(t, m):
        return _model_logprobs(model, params, t, m, temperature, logits_from)[0]

    return _scan_micro_batches(fn, micro_batch, tokens, mask)


class ValueHead(nn.Module):
    """The critic: the decoder's final hidden state -> a scalar per token."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_btd):
        return nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros_init(), name="value")(
            hidden_btd.astype(jnp.float32))[..., 0]


def init_critic(config: ModelConfig, decoder_params) -> dict:
    """Critic params: a copy of a decoder (usually the policy's) plus a zero-initialised head,
    replicated over the decoder's mesh when it has one (a step takes all its arrays from one
    set of devices)."""
    head = ValueHead(config).init(jax.random.key(0), jnp.zeros((1, 1, config.d_model)))
    mesh = sharding.mesh_of(decoder_params)
    if mesh is not None:
        head = jax.device_put(head, NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return {"decoder": decoder_params, "head": head["params"]}


def critic_values(config: ModelConfig, critic_params, tokens_bt, attention_mask_bt, *,
                  mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False):
    """[B, T] values aligned to actions: entry t is V(tokens[:t]), the value of the state in
    which token t was chosen (0 at t = 0), like the policy's logprobs and advantages."""
    hidden, _ = Decoder(config, mesh, sharding.as_rules(rules), remat=remat).apply(
        {"params": critic_params["decoder"]}, tokens_bt, _positions(attention_mask_bt), None,
        attention_mask_bt, return_hidden=True)
    v = ValueHead(config).apply({"params": critic_params["head"]}, hidden)
    return jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)


def critic_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx, cfg: LossConfig,
                n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False):
    """One optimizer step on the critic with the clipped value loss."""
    denom = L.aggregate(batch.loss_mask, batch.loss_mask, cfg.aggregation)[1]

    def loss_fn(params, mb: Batch):
        values = critic_values(config, params, mb.tokens, mb.attention_mask, mesh=mesh,
                               rules=rules, remat=remat)
        s, _ = L.value_loss(values, mb.old_values, mb.returns, mb.loss_mask,
                            clip=cfg.value_clip, mode=cfg.aggregation)
        return s, {"value_loss": s}

    grads, sums = _accumulate(loss_fn, state.params, batch, n_micro)
    scale = 1.0 / jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = {k: v * scale for k, v in sums.items()}
    metrics["critic_grad_norm"] = optax.global_norm(grads)
    return _apply(state, grads, tx, metrics), metrics


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _values_jit(config, critic_params, tokens, mask, micro_batch, mesh, rules):
    return _scan_micro_batches(
        lambda t, m: critic_values(config, critic_params, t, m, mesh=mesh, rules=rules),
        micro_batch, tokens, mask)


def values_pass(config: ModelConfig, critic_params, tokens_bt, attention_mask_bt, *,
                micro_batch: int, mesh=None, rules=sharding.DEFAULT_RULES):
    """Critic values [B, T] computed micro-batch by micro-batch (a scan)."""
    return _values_jit(config, critic_params, tokens_bt, attention_mask_bt, micro_batch, mesh,
                       sharding.as_rules(rules))


def run_step(step_fn, state, batch: Batch):
    """Runs a jitted step, waits for it, and returns (state, host metrics) with `step_s` and
    `tokens_per_s` (non-padding tokens of the batch per second of wall time)."""
    import time
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - start
    out = {k: float(v) for k, v in metrics.items()}
    out["step_s"] = seconds
    out["tokens_per_s"] = out.get("tokens", 0.0) / seconds
    return state, out


# --- Supervised fine-tuning (the simulator; the policy's warm start) ------------------------

def supervised_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx,
                    n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES,
                    remat: bool = False, logits_from: int = 0, freeze: str = ""):
    """One step of masked next-token cross-entropy: the mean over tokens with loss_mask 1
    (e.g. the simulator's documents). Uses batch.tokens, attention_mask and loss_mask only.
    `logits_from` and `freeze` as in `policy_gradients`."""
    model = Decoder(config, mesh, sharding.as_rules(rules), remat=remat)
    denom = batch.loss_mask.sum()

    def loss_fn(params, mb: Batch):
        logp, _ = _model_logprobs(model, params, mb.tokens, mb.attention_mask,
                                  logits_from=logits_from)
        nll = -(logp * mb.loss_mask).sum()
        return nll, {"loss": nll}

    grads, sums = _accumulate(loss_fn, state.params, batch, n_micro, freeze)
    scale = 1.0 / jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    metrics = {"loss": sums["loss"] * scale, "grad_norm": optax.global_norm(grads),
               "tokens": batch.attention_mask.sum()}
    return _apply(state, grads, tx, metrics), metrics


def sft_batch(tokens, attention_mask, loss_mask) -> Batch:
    """A Batch for supervised_step (the RL fields are unused zeros)."""
    zeros = jnp.zeros(jnp.shape(tokens), jnp.float32)
    return Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention_mask),
                 loss_mask=jnp.asarray(loss_mask, jnp.float32), old_logprobs=zeros,
                 advantages=zeros)
