"""Batched sampling: one prefill, then a `lax.while_loop` decode over an explicit KV cache.

Prompts of different lengths are left-padded into one batch, so every row writes the same cache
slot each step. Shapes are bucketed (prompt length, generation length and batch rounded up to
a power of two or 1.5 x one), so a training run compiles a handful of programs. The loop stops as soon as every
row has finished (EOS, a stop string, or its token budget).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zsjax import sharding
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder, init_cache
from zsjax.sampling import stop as stop_lib
from zsjax.sampling.distribution import SamplingParams, sample

_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
FINISH_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


@dataclasses.dataclass
class GenerateResult:
    """Per prompt: generated ids (stop token included, nothing after), their logprobs under the
    sampling distribution actually used, the model's logprobs at the sampling temperature without
    top-k/top-p (what a trainer recomputes), and why generation ended."""

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    model_logprobs: list[np.ndarray]
    finish_reasons: list[str]


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two or 1.5 x power of two that is >= n (and >= minimum): at most
    a third of the shape is padding, and a run sees O(log n) distinct shapes."""
    n = max(n, minimum, 1)
    p = 1 << (n - 1).bit_length()  # next power of two
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


@functools.partial(jax.jit, static_argnames=("config", "params_s", "gen_len", "mesh", "rules",
                                             "has_stop"))
def _generate_core(params, tokens_bp, mask_bp, active_b, max_new, eos_ids, stop_next,
                   stop_matched, key, *, config: ModelConfig, params_s: SamplingParams,
                   gen_len: int, mesh, rules, has_stop: bool):
    model = Decoder(config, mesh, rules)
    b, p = tokens_bp.shape
    positions = jnp.maximum(jnp.cumsum(mask_bp, axis=1) - 1, 0).astype(jnp.int32)
    prompt_lens = mask_bp.sum(axis=1).astype(jnp.int32)
    cache = init_cache(config, b, p + gen_len)
    logits, cache = model.apply({"params": params}, tokens_bp, positions, cache, mask_bp,
                                last_logits_only=True)
    logits = logits[:, -1]

    out_tokens = jnp.zeros((b, gen_len), jnp.int32)
    out_lp = jnp.zeros((b, gen_len), jnp.float32)
    out_mlp = jnp.zeros((b, gen_len), jnp.float32)
    reason = jnp.where(active_b, _RUNNING, _LENGTH).astype(jnp.int32)
    stop_state = jnp.zeros((b,), jnp.int32)

    def cond(state):
        i, reason = state[0], state[5]
        return (i < max_new) & jnp.any(reason == _RUNNING)

    def body(state):
        i, cache, logits, key, outs, reason, stop_state = state
        out_tokens, out_lp, out_mlp, lengths = outs
        key, sub = jax.random.split(key)
        tok, lp, mlp = sample(logits, params_s, sub)
        running = reason == _RUNNING
        tok = jnp.where(running, tok, 0).astype(jnp.int32)
        out_tokens = out_tokens.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(running, lp, 0.0))
        out_mlp = out_mlp.at[:, i].set(jnp.where(running, mlp, 0.0))
        is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        if has_stop:
            hit = stop_matched[stop_state, tok]
            stop_state = stop_next[stop_state, tok]
        else:
            hit = jnp.zeros_like(is_eos)
        new_reason = jnp.where(is_eos, _EOS, jnp.where(hit, _STOP, jnp.where(
            i + 1 >= max_new, _LENGTH, _RUNNING)))
        reason = jnp.where(running, new_reason, reason)
        lengths = jnp.where(running, i + 1, lengths)
        # Feed the sampled token back. On the final iteration this forward is wasted (one step
        # in max_new); skipping it would need a lax.cond around the whole model.
        pos = (prompt_lens + i)[:, None]
        logits, cache = model.apply({"params": params}, tok[:, None], pos, cache)
        return (i + 1, cache, logits[:, -1], key, (out_tokens, out_lp, out_mlp, lengths), reason,
                stop_state)

    lengths = jnp.zeros((b,), jnp.int32)
    state = (jnp.int32(0), cache, logits, key, (out_tokens, out_lp, out_mlp, lengths), reason,
             stop_state)
    state = jax.lax.while_loop(cond, body, state)
    steps, reason = state[0], state[5]
    out_tokens, out_lp, out_mlp, lengths = state[4]
    return out_tokens, out_lp, out_mlp, lengths, reason, steps


def _validate_prompts(prompts, vocab_size) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of token-id lists (one per prompt); tokenize "
                        "text first")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    out = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                             "(e.g. the BOS token)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_strings: Sequence[str] = (), tokenizer=None,
             eos_token_ids: Sequence[int] | None = None, seed: int = 0,
             rules=sharding.DEFAULT_RULES) -> GenerateResult:
    """Samples continuations of token-id prompts (ragged lengths allowed); temperature 0 is greedy.

    Stops a row at an EOS id, at a stop string (needs `tokenizer`; detected on device, across
    token boundaries), or after `max_new_tokens`. Runs sharded when `params` live on a mesh
    (batch over data x fsdp, heads over tensor).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    params_s = SamplingParams(float(temperature), float(top_p), int(top_k))
    prompts = _validate_prompts(prompts, config.vocab_size)
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (to know each token's text)")
    if eos_token_ids is None:
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos_token_ids = sorted(eos)
    eos_arr = np.array(list(eos_token_ids) or [-1], np.int32)

    mesh = sharding.mesh_of(params)
    n = len(prompts)
    batch_multiple = 1
    if mesh is not None:
        batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    b = -(-bucket(n, 1) // batch_multiple) * batch_multiple
    p = bucket(max(len(x) for x in prompts))
    g = bucket(max_new_tokens)
    tokens = np.zeros((b, p), np.int32)
    mask = np.zeros((b, p), bool)
    for i, ids in enumerate(prompts):
        tokens[i, p - len(ids):] = ids
        mask[i, p - len(ids):] = True
    mask[n:, -1] = True  # filler rows: one dummy token, never sampled from
    active = np.arange(b) < n

    if stop_strings:
        tables = stop_lib.tables_for(tokenizer, config.vocab_size, stop_strings)
        stop_next, stop_matched = tables.next_state, tables.matched
    else:
        stop_next = np.zeros((1, 1), np.int32)
        stop_matched = np.zeros((1, 1), bool)

    args = [tokens, mask, active]
    if mesh is not None:
        rows = sharding.named_sharding(("batch", "length"), (b, p), mesh, rules)
        args = [jax.device_put(tokens, rows), jax.device_put(mask, rows),
                jax.device_put(active, sharding.named_sharding(("batch",), (b,), mesh, rules))]
    out_tokens, out_lp, out_mlp, lengths, reason, _ = _generate_core(
        params, *args, jnp.int32(max_new_tokens), eos_arr, stop_next, stop_matched,
        jax.random.key(seed), config=config, params_s=params_s, gen_len=g, mesh=mesh,
        rules=sharding.as_rules(rules), has_stop=bool(stop_strings))
    out_tokens, out_lp, out_mlp, lengths, reason = jax.device_get(
        (out_tokens, out_lp, out_mlp, lengths, reason))

    result = GenerateResult([], [], [], [])
    for i in range(n):
        r = int(reason[i])
        if r == _RUNNING:  # cannot happen: the loop runs until max_new or all rows finish
            raise RuntimeError(f"row {i} did not finish")
        length = int(lengths[i])
        result.tokens.append(out_tokens[i, :length].tolist())
        result.logprobs.append(np.asarray(out_lp[i, :length]))
        result.model_logprobs.append(np.asarray(out_mlp[i, :length]))
        result.finish_reasons.append(FINISH_REASONS[r])
    return result

