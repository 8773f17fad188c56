"""Token log-probabilities and entropies from a decoder's logits (with a hand-written backward
pass), and the forward-only passes over a training batch (old and reference policy), computed
from the first position whose logits the loss needs (`loss_start`, `compiled_start`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zsjax import sharding
from zsjax.models import lora
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder, broadcast_cache, init_cache


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


def model_logprobs(model, params, tokens_bt, attention_mask_bt, temperature: float = 1.0,
                    logits_from: int = 0, shared_prefix: int = 0):
    """`token_logprobs_from_logits` of `model`'s forward pass, which computes logits at
    positions [logits_from, T - 1) only: a training batch needs none at its prompt's positions,
    and the lm_head and the loss over the vocabulary are a large part of a small model's step.
    Nothing about the sequence's other positions changes (attention still sees every token).
    `params` may be LoRA params (`zsjax.models.lora.LoraParams`): the adapted projections add
    their adapters' outputs (`zsjax.models.lora.apply`).

    `shared_prefix` P (static, at most logits_from): every row holds the same P real tokens
    first (`shared_prefix_length` finds P on the host). They go through the model once, as a
    one-row prefill whose keys and values every row then attends to; the rows' own positions
    run after it. The same function of the params as without P, gradients included: a
    templated prompt (the search prompt is about 110 tokens) is most of a short trajectory's
    compute."""
    t = tokens_bt.shape[1]
    if not 0 <= logits_from <= t - 2:
        raise ValueError(f"logits_from {logits_from} must be in [0, {t - 2}] for sequences of "
                         f"length {t}")
    if not 0 <= shared_prefix <= logits_from:
        raise ValueError(f"shared_prefix {shared_prefix} must be in [0, logits_from = "
                         f"{logits_from}]")
    if getattr(params, "dropout", 0.0):
        shared_prefix = 0  # LoRA dropout: each row draws its own masks on the prefix too
    logits = after_prefix(model, params, tokens_bt, attention_mask_bt, shared_prefix,
                          logits_positions=(logits_from - shared_prefix, t - 1 - shared_prefix))
    return token_logprobs_from_logits(logits, tokens_bt, temperature, logits_from)


def after_prefix(model, params, tokens_bt, attention_mask_bt, shared_prefix: int, **kwargs):
    """`model`'s output (logits, or hidden states with return_hidden=True) at positions
    [shared_prefix, T), given `kwargs` for the model (positions in them count from
    shared_prefix). The first shared_prefix tokens, the same real tokens in every row, run
    once as a one-row prefill whose keys and values every row then attends to: the same
    function of the params as the whole rows' forward pass, gradients included. Not for LoRA
    params with dropout, whose rows draw their own masks on the prefix too (`model_logprobs`
    runs those whole; the critic holds plain params)."""
    pos = positions(attention_mask_bt)
    p = shared_prefix
    if not p:
        return lora.apply(model, params, tokens_bt, pos, None, attention_mask_bt, **kwargs)[0]
    cache = init_cache(model.config, 1, tokens_bt.shape[1])
    _, cache = lora.apply(model, params, tokens_bt[:1, :p], pos[:1, :p], cache,
                          attention_mask_bt[:1, :p], return_hidden=True)
    cache = broadcast_cache(cache, tokens_bt.shape[0])
    return lora.apply(model, params, tokens_bt[:, p:], pos[:, p:], cache,
                      attention_mask_bt[:, p:], **kwargs)[0]


def shared_prefix_length(tokens_bt, attention_mask_bt, limit: int, multiple: int = 16) -> int:
    """A `shared_prefix` for a host-side batch: the length of the real tokens every row
    starts with, at most `limit` (the batch's logits_from), rounded down to a multiple of
    `multiple` so that batches share a compiled step; 0 under `multiple` tokens."""
    tokens, mask = np.asarray(tokens_bt), np.asarray(attention_mask_bt).astype(bool)
    same = (tokens == tokens[:1]).all(axis=0) & mask.all(axis=0)
    n = int(same.argmin()) if not same.all() else same.size
    return min(n, limit) // multiple * multiple


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


def positions(mask_bt):
    return jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0).astype(jnp.int32)


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


def logprobs_pass(config: ModelConfig, params, tokens_bt, attention_mask_bt, *,
                  micro_batch: int, temperature: float = 1.0, mesh=None,
                  rules=sharding.DEFAULT_RULES, logits_from: int = 0, shared_prefix: int = 0):
    """log p(tokens[t] | tokens[<t]) [B, T] computed micro-batch by micro-batch (a scan), for
    the old and the reference policy; 0 at t <= logits_from (see `policy_gradients`;
    `shared_prefix` as in `model_logprobs`)."""
    return _logprobs_jit(config, params, tokens_bt, attention_mask_bt, micro_batch, temperature,
                         mesh, sharding.as_rules(rules), logits_from, shared_prefix)


def scan_micro_batches(fn, micro_batch: int, tokens, mask):
    """fn(tokens [m, T], mask [m, T]) -> [m, T], run over micro-batches of m rows (a scan)."""
    b = tokens.shape[0]
    if b % micro_batch:
        raise ValueError(f"batch of {b} rows does not split into micro-batches of {micro_batch}")
    split = lambda x: x.reshape((b // micro_batch, micro_batch) + x.shape[1:])  # noqa: E731
    _, out = jax.lax.scan(lambda _, xs: (None, fn(*xs)), None, (split(tokens), split(mask)))
    return out.reshape(tokens.shape)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8, 9))
def _logprobs_jit(config, params, tokens, mask, micro_batch, temperature, mesh, rules,
                  logits_from, shared_prefix):
    model = Decoder(config, mesh, rules)

    def fn(t, m):
        return model_logprobs(model, params, t, m, temperature, logits_from, shared_prefix)[0]

    return scan_micro_batches(fn, micro_batch, tokens, mask)
