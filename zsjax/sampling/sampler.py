"""Batched sampling: one prefill, then a `lax.while_loop` decode over an explicit KV cache.

Prompts of different lengths are left-padded into one batch, so every row writes the same cache
slot each step. Shapes are bucketed (prompt length, generation length and batch rounded up to
a power of two or 1.5 x one), so a training run compiles a handful of programs. The loop stops as soon as every
row has finished (EOS, a stop string, or its token budget).

Randomness is per row: row r draws from `fold_in(key(seed), row_seeds[r])`, one `fold_in` per
decode step. The random numbers a row draws therefore depend on its seed alone, not on the
other rows, its position in the batch, the padding or the mesh. A rollout split over several
processes (or re-batched between turns) samples what one batch would. The one exception: the
logits themselves can differ in the last bits between batch shapes or meshes, and such a
difference flips a sample only when two perturbed logits are that close. This is rare; it
never happened in the CPU tests, which compare tokens exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zsjax import sharding
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder, KVCache, init_cache
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
    # Rows x decode steps computed, padding and finished rows included (a cost measure: the
    # tokens of `tokens` over it is the batch's utilisation).
    rows_stepped: int = 0


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two or 1.5 x power of two that is >= n (and >= minimum): at most
    a third of the shape is padding, and a run sees O(log n) distinct shapes."""
    n = max(n, minimum, 1)
    p = 1 << (n - 1).bit_length()  # next power of two
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


@flax.struct.dataclass
class _Decode:
    """Everything the decode loop carries. Every leaf but `step` (and the cache's slot index) is
    batch-major, so the rows still running can be taken into a smaller batch and continue
    there (`_take`), then be put back (`_put`)."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32, the logits of each row's next token
    row_keys: jax.Array  # [B] PRNG keys
    pos_base: jax.Array  # [B] int32, the position of generated token 0
    reason: jax.Array  # [B] int32, _RUNNING until the row finishes
    stop_state: jax.Array  # [B] int32, the stop-string automaton's state
    lengths: jax.Array  # [B] int32, tokens generated
    tokens: jax.Array  # [B, G] int32
    logprobs: jax.Array  # [B, G] float32, under the sampling distribution
    model_logprobs: jax.Array  # [B, G] float32, at the temperature, no top-k/top-p
    step: jax.Array  # [] int32, the next step


def _prefill(params, cache, tokens_bc, mask_bc, start_pos_b, active_b, row_keys, *,
             config: ModelConfig, gen_len: int, mesh, rules) -> _Decode:
    """Writes a left-padded chunk [B, C] into the cache at cache.index; the decode state.

    Row r's chunk tokens get positions start_pos[r], start_pos[r] + 1, ...; every active row's
    chunk must be non-empty (its last column is real).
    """
    b, _ = tokens_bc.shape
    positions = (start_pos_b[:, None]
                 + jnp.maximum(jnp.cumsum(mask_bc, axis=1) - 1, 0)).astype(jnp.int32)
    logits, cache = Decoder(config, mesh, rules).apply(
        {"params": params}, tokens_bc, positions, cache, mask_bc, last_logits_only=True)
    zeros = jnp.zeros((b, gen_len), jnp.float32)
    return _Decode(cache=cache, logits=logits[:, -1], row_keys=row_keys,
                   pos_base=(start_pos_b + mask_bc.sum(axis=1)).astype(jnp.int32),
                   reason=jnp.where(active_b, _RUNNING, _LENGTH).astype(jnp.int32),
                   stop_state=jnp.zeros((b,), jnp.int32), lengths=jnp.zeros((b,), jnp.int32),
                   tokens=jnp.zeros((b, gen_len), jnp.int32), logprobs=zeros,
                   model_logprobs=zeros, step=jnp.int32(0))


def _decode(params, d: _Decode, max_new, eos_ids, stop_next, stop_matched, *,
            config: ModelConfig, params_s: SamplingParams, mesh, rules, has_stop: bool,
            shrink_below: int) -> _Decode:
    """Decodes until every row has finished or `max_new` steps, or (shrink_below > 0) until at
    most `shrink_below` rows are still running, for the caller to continue them in a smaller
    batch. Tokens fed back after a row has finished are written as invalid slots, so the cache
    can be extended again (multi-turn KV reuse)."""
    model = Decoder(config, mesh, rules)

    def cond(d):
        running = d.reason == _RUNNING
        go = (d.step < max_new) & jnp.any(running)
        return go & (running.sum() > shrink_below) if shrink_below else go

    def body(d):
        i = d.step
        tok, lp, mlp = sample(d.logits, params_s,
                              jax.vmap(jax.random.fold_in, (0, None))(d.row_keys, i))
        running = d.reason == _RUNNING
        tok = jnp.where(running, tok, 0).astype(jnp.int32)
        is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        stop_state = d.stop_state
        if has_stop:
            hit = stop_matched[stop_state, tok]
            stop_state = stop_next[stop_state, tok]
        else:
            hit = jnp.zeros_like(is_eos)
        new_reason = jnp.where(is_eos, _EOS, jnp.where(hit, _STOP, jnp.where(
            i + 1 >= max_new, _LENGTH, _RUNNING)))
        # Feed the sampled token back (as an invalid slot for rows already finished). The last
        # iteration's forward also puts the final token in the cache, ready for the next turn.
        logits, cache = model.apply({"params": params}, tok[:, None], (d.pos_base + i)[:, None],
                                    d.cache, running[:, None])
        return d.replace(
            cache=cache, logits=logits[:, -1], stop_state=stop_state,
            reason=jnp.where(running, new_reason, d.reason),
            lengths=jnp.where(running, i + 1, d.lengths),
            tokens=d.tokens.at[:, i].set(tok),
            logprobs=d.logprobs.at[:, i].set(jnp.where(running, lp, 0.0)),
            model_logprobs=d.model_logprobs.at[:, i].set(jnp.where(running, mlp, 0.0)),
            step=i + 1)

    return jax.lax.while_loop(cond, body, d)


_STATIC = ("config", "params_s", "gen_len", "mesh", "rules", "has_stop", "shrink_below")


def _prefill_and_decode(params, cache, tokens, mask, start, active, row_seeds, max_new, eos_ids,
                        stop_next, stop_matched, key, *, config, params_s, gen_len, mesh, rules,
                        has_stop, shrink_below):
    d = _prefill(params, cache, tokens, mask, start, active, _row_keys(key, row_seeds),
                 config=config, gen_len=gen_len, mesh=mesh, rules=rules)
    return _decode(params, d, max_new, eos_ids, stop_next, stop_matched, config=config,
                   params_s=params_s, mesh=mesh, rules=rules, has_stop=has_stop,
                   shrink_below=shrink_below)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_core(params, tokens_bp, mask_bp, active_b, row_seeds_b, max_new, eos_ids,
                   stop_next, stop_matched, key, **static):
    b, p = tokens_bp.shape
    cache = init_cache(static["config"], b, p + static["gen_len"])
    start = jnp.zeros((b,), jnp.int32)
    return _prefill_and_decode(params, cache, tokens_bp, mask_bp, start, active_b, row_seeds_b,
                               max_new, eos_ids, stop_next, stop_matched, key, **static)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _continue_core(params, cache, tokens_bc, mask_bc, start_pos_b, active_b, row_seeds_b,
                   max_new, eos_ids, stop_next, stop_matched, key, **static):
    return _prefill_and_decode(params, cache, tokens_bc, mask_bc, start_pos_b, active_b,
                               row_seeds_b, max_new, eos_ids, stop_next, stop_matched, key,
                               **static)


_RESUME_STATIC = tuple(s for s in _STATIC if s != "gen_len")


@functools.partial(jax.jit, static_argnames=_RESUME_STATIC, donate_argnames=("d",))
def _resume_core(params, d, max_new, eos_ids, stop_next, stop_matched, **static):
    return _decode(params, d, max_new, eos_ids, stop_next, stop_matched, **static)


@jax.jit
def _take(d: _Decode, idx, filler) -> _Decode:
    """Rows idx of d; rows where `filler` is true only pad the batch and count as finished."""
    cache = _take_rows(d.cache, idx)
    d = jax.tree.map(lambda x: x if x.ndim == 0 else x[idx], d.replace(cache=None))
    return d.replace(cache=cache, reason=jnp.where(filler, _LENGTH, d.reason))


@functools.partial(jax.jit, donate_argnums=0)
def _put(d: _Decode, sub: _Decode, dest) -> _Decode:
    """d with row r of `sub` written to row dest[r] (entries past d's batch are dropped); the
    step and the cache's slot index are sub's. Logits and keys are left as they were."""
    def put(x, y):
        return y if x.ndim == 0 else x.at[dest].set(y, mode="drop")

    def put_kv(x, y):  # rows at axis -4 (see _take_rows)
        return x.at[(slice(None),) * (x.ndim - 4) + (dest,)].set(y, mode="drop")
    cache = d.cache.replace(k=tuple(map(put_kv, d.cache.k, sub.cache.k)),
                            v=tuple(map(put_kv, d.cache.v, sub.cache.v)),
                            valid=put(d.cache.valid, sub.cache.valid), index=sub.cache.index)
    names = ("reason", "stop_state", "lengths", "tokens", "logprobs", "model_logprobs", "step")
    moved = jax.tree.map(put, tuple(getattr(d, n) for n in names),
                         tuple(getattr(sub, n) for n in names))
    return d.replace(cache=cache, **dict(zip(names, moved)))


def _shrink_below(b: int, mesh, min_batch: int) -> int:
    """The running-row count at which a batch of b rows stops to continue in a smaller one
    (half of it), or 0: never, for batches of at most `min_batch` rows (or where the mesh
    allows no smaller batch)."""
    if min_batch <= 0 or b <= min_batch or _batch_size(b // 2, mesh) >= b:
        return 0
    return b // 2


def _decode_rest(params, d: _Decode, max_new: int, tables, mesh, static: dict,
                 min_batch: int) -> tuple[_Decode, int]:
    """Continues a loop that stopped with rows still running: those rows go on in a batch of
    their own (recursively smaller), then are put back. `tables`: the (eos, stop_next,
    stop_matched) device arrays. Returns the final state and the rows x steps the smaller
    loops ran."""
    reason, step = jax.device_get((d.reason, d.step))
    live = np.flatnonzero(reason == _RUNNING)
    if not len(live) or step >= max_new:
        return d, 0
    b, b2 = len(reason), _batch_size(len(live), mesh)
    idx = np.concatenate([live, np.full(b2 - len(live), live[0])]).astype(np.int32)
    filler = np.arange(b2) >= len(live)
    sub = _take(d, *_place_rows([idx, filler], mesh, static["rules"]))
    resume_static = {k: static[k] for k in _RESUME_STATIC if k != "shrink_below"}
    sub = _resume_core(params, sub, jnp.int32(max_new), *tables,
                       shrink_below=_shrink_below(b2, mesh, min_batch), **resume_static)
    stepped = b2 * (int(sub.step) - int(step))
    sub, deeper = _decode_rest(params, sub, max_new, tables, mesh, static, min_batch)
    dest = np.where(filler, b, idx).astype(np.int32)  # fillers land past the end: dropped
    return _put(d, sub, *_place_rows([dest], mesh, static["rules"])), stepped + deeper


def _key(seed: int) -> jax.Array:
    """jax.random.key(seed) for any Python int: seeds outside int64 (callers derive them as
    seed * 1_000_003 + step, and so on) are taken modulo 2**63."""
    seed = int(seed)
    return jax.random.key(seed if -2 ** 63 <= seed < 2 ** 63 else seed % 2 ** 63)


def _row_keys(key, row_seeds_b):
    return jax.vmap(jax.random.fold_in, (None, 0))(key, row_seeds_b)


def _row_seeds(row_seeds, n: int, b: int) -> np.ndarray:
    """uint32 seeds for the b rows of a batch (n real ones); default: the row index. Any
    Python int is taken modulo 2**32 (so -1 is 2**32 - 1, and 2**32 + 1 draws what 1 does)."""
    if row_seeds is None:
        row_seeds = range(n)
    row_seeds = [int(s) for s in row_seeds]
    if len(row_seeds) != n:
        raise ValueError(f"row_seeds has {len(row_seeds)} entries for {n} prompts")
    out = np.zeros(b, np.uint32)
    out[:n] = np.array([s % 2 ** 32 for s in row_seeds], np.uint64)
    return out


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


@dataclasses.dataclass(frozen=True)
class _Prepared:
    params_s: SamplingParams
    eos: np.ndarray
    stop_next: np.ndarray
    stop_matched: np.ndarray
    has_stop: bool


def _prepare(config, max_new_tokens, temperature, top_p, top_k, stop_strings, tokenizer,
             eos_token_ids) -> _Prepared:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    params_s = SamplingParams(float(temperature), float(top_p), int(top_k))
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (to know each token's text)")
    if eos_token_ids is None:
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        eos_token_ids = sorted(eos)
    eos_arr = np.array(list(eos_token_ids) or [-1], np.int32)
    if stop_strings:
        tables = stop_lib.tables_for(tokenizer, config.vocab_size, stop_strings)
        return _Prepared(params_s, eos_arr, tables.next_state, tables.matched, True)
    return _Prepared(params_s, eos_arr, np.zeros((1, 1), np.int32), np.zeros((1, 1), bool),
                     False)


def _batch_size(n: int, mesh) -> int:
    multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-bucket(n, 1) // multiple) * multiple


def _left_pad(chunks: list[list[int]], b: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), bool)
    for i, ids in enumerate(chunks):
        tokens[i, width - len(ids):] = ids
        mask[i, width - len(ids):] = True
    mask[len(chunks):, -1] = True  # filler rows: one dummy token, never sampled from
    return tokens, mask


def _place_rows(arrays, mesh, rules):
    """Puts [B, ...] host arrays on the mesh with the batch split over data x fsdp."""
    if mesh is None:
        return arrays
    return [jax.device_put(a, sharding.named_sharding(("batch",) + (None,) * (a.ndim - 1),
                                                      a.shape, mesh, rules)) for a in arrays]


# Batches of more rows than this shrink as rows finish: once at most half the rows still run,
# the loop stops and they continue in a batch of their own, so finished rows stop costing
# compute (on a CPU a decode step's time grows with its rows). 0 turns shrinking off.
# Memory: a smaller batch holds a copy of its rows' KV caches until they are put back, so at
# its peak a shrinking loop holds 1 + 1/2 + 1/4 + ... (under 2x) of the full batch's cache,
# against 1x without shrinking.
SHRINK_ABOVE = 8


def _run(core, params, args: list, key, n: int, prep: _Prepared, max_new: int, mesh,
         static: dict, shrink_above: int) -> tuple[GenerateResult, _Decode]:
    """Runs a prefill-and-decode program (`args`: its arrays before max_new, row seeds last),
    continues its running rows in ever smaller batches until all have finished, and collects
    the first n rows; returns the result and the final state."""
    b = args[-1].shape[0]
    # Uploaded once for the first loop and every smaller one (the stop tables are vocab x
    # states); uncommitted, so each program places them where its mesh needs them.
    tables = jax.device_put((prep.eos, prep.stop_next, prep.stop_matched))
    d = core(params, *args, jnp.int32(max_new), *tables, key,
             shrink_below=_shrink_below(b, mesh, shrink_above), **static)
    first = b * int(d.step)
    d, rest = _decode_rest(params, d, max_new, tables, mesh, static, shrink_above)
    result = _collect(n, jax.device_get((d.tokens, d.logprobs, d.model_logprobs, d.lengths,
                                         d.reason)))
    result.rows_stepped = first + rest
    return result, d


def _collect(n, outs) -> GenerateResult:
    out_tokens, out_lp, out_mlp, lengths, reason = outs
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


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_strings: Sequence[str] = (), tokenizer=None,
             eos_token_ids: Sequence[int] | None = None, seed: int = 0,
             row_seeds: Sequence[int] | None = None, shrink_above: int = SHRINK_ABOVE,
             rules=sharding.DEFAULT_RULES) -> GenerateResult:
    """Samples continuations of token-id prompts (ragged lengths allowed); temperature 0 is greedy.

    Row r samples from `fold_in(key(seed), row_seeds[r])` (default: r), independently of the
    other rows.

    Stops a row at an EOS id, at a stop string (needs `tokenizer`; detected on device, across
    token boundaries), or after `max_new_tokens`. A batch of more than `shrink_above` rows
    continues in a smaller one once half its rows have finished (0: never). Runs sharded when
    `params` live on a mesh (batch over data x fsdp, heads over tensor).
    """
    prep = _prepare(config, max_new_tokens, temperature, top_p, top_k, stop_strings, tokenizer,
                    eos_token_ids)
    prompts = _validate_prompts(prompts, config.vocab_size)
    mesh = sharding.mesh_of(params)
    n = len(prompts)
    b = _batch_size(n, mesh)
    p = bucket(max(len(x) for x in prompts))
    tokens, mask = _left_pad(prompts, b, p)
    active = np.arange(b) < n
    result, _ = _run(
        _generate_core, params,
        _place_rows([tokens, mask, active, _row_seeds(row_seeds, n, b)], mesh, rules),
        _key(seed), n, prep, max_new_tokens, mesh,
        dict(config=config, params_s=prep.params_s, gen_len=bucket(max_new_tokens), mesh=mesh,
             rules=sharding.as_rules(rules), has_stop=prep.has_stop), shrink_above)
    return result


@dataclasses.dataclass
class DecodeSession:
    """KV caches of rows that continue across calls (multi-turn rollouts reuse them).

    `next_pos[r]` is the position row r's next token takes; `last_slot[r]` the cache slot of its
    last generated token. `index` mirrors cache.index on the host.
    """

    cache: KVCache
    index: int
    rows: int
    next_pos: np.ndarray
    last_slot: np.ndarray

    def select(self, keep: Sequence[int], mesh=None, batch: int = 0) -> "DecodeSession":
        """Keeps rows `keep` (in that order), padded to a batch bucket, or to `batch` rows when
        that is larger (a batch size already in use: no new compiled programs)."""
        keep = list(keep)
        b = max(_batch_size(len(keep), mesh), batch)
        idx = np.array(keep + [keep[0] if keep else 0] * (b - len(keep)), np.int32)
        cache = _take_rows(self.cache, jnp.asarray(idx))
        next_pos = self.next_pos[idx].copy()
        last_slot = self.last_slot[idx].copy()
        return DecodeSession(cache, self.index, len(keep), next_pos, last_slot)

    def drop_last_token(self, rows: Sequence[int]) -> "DecodeSession":
        """Forgets each listed row's last generated token (e.g. an EOS the rollout drops)."""
        rows = [r for r in rows if self.last_slot[r] >= 0]
        if not rows:
            return self
        slots = np.full(self.last_slot.shape, -1, np.int32)
        slots[rows] = self.last_slot[rows]
        valid = _forget_slots(self.cache.valid, jnp.asarray(slots))
        next_pos = self.next_pos.copy()
        next_pos[rows] -= 1
        last_slot = self.last_slot.copy()
        last_slot[rows] = -1
        return DecodeSession(self.cache.replace(valid=valid), self.index, self.rows, next_pos,
                             last_slot)


# One program that allocates every layer's cache (eagerly, that is 2 x n_layers dispatches).
_new_cache = jax.jit(init_cache, static_argnums=(0, 1, 2))


@jax.jit
def _forget_slots(valid, slots):
    """Marks slot slots[r] of row r invalid (-1: none). One program per cache shape, where an
    indexed update would compile again for every number of rows it touches."""
    return valid & (jnp.arange(valid.shape[1])[None, :] != slots[:, None])


# Axes counted from the end, so that a per-layer cache [B, KVH, S, Dh] and a stacked one
# (scan_layers: [L, B, KVH, S, Dh]) take the same code: rows at -4, key slots at -2, value
# slots at -1.
@jax.jit
def _take_rows(cache: KVCache, idx) -> KVCache:
    take = lambda x: jnp.take(x, idx, axis=-4)  # noqa: E731
    return KVCache(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                   valid=jnp.take(cache.valid, idx, axis=0), index=cache.index)


@functools.partial(jax.jit, static_argnums=1)
def _grow(cache: KVCache, capacity: int) -> KVCache:
    extra = capacity - cache.capacity
    pad_k = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])  # noqa: E731
    pad_v = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])  # noqa: E731
    return KVCache(k=tuple(map(pad_k, cache.k)), v=tuple(map(pad_v, cache.v)),
                   valid=jnp.pad(cache.valid, ((0, 0), (0, extra))), index=cache.index)


def continue_generate(config: ModelConfig, params, chunks: Sequence[Sequence[int]], *,
                      session: DecodeSession | None, max_new_tokens: int,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                      stop_strings: Sequence[str] = (), tokenizer=None,
                      eos_token_ids: Sequence[int] | None = None, seed: int = 0,
                      row_seeds: Sequence[int] | None = None,
                      shrink_above: int = SHRINK_ABOVE,
                      rules=sharding.DEFAULT_RULES) -> tuple[GenerateResult, DecodeSession]:
    """Like `generate`, but each row's chunk extends that row's cached context in `session`
    (None: start fresh, the chunks are the prompts). Returns the result and the new session,
    whose cache holds every chunk and generated token.

    The session passed in is consumed: its cache is donated to the new one (no copy of the
    largest array), so do not use it again; to branch, continue from `session.select(rows)`,
    which copies."""
    prep = _prepare(config, max_new_tokens, temperature, top_p, top_k, stop_strings, tokenizer,
                    eos_token_ids)
    chunks = _validate_prompts(chunks, config.vocab_size)
    mesh = sharding.mesh_of(params)
    n = len(chunks)
    b = _batch_size(n, mesh)
    c = bucket(max(len(x) for x in chunks), 8)
    g = bucket(max_new_tokens)
    if session is None:
        session = DecodeSession(_new_cache(config, b, bucket(c + g, 64)), 0, n,
                                np.zeros(b, np.int64), np.full(b, -1, np.int64))
    if session.rows != n or session.cache.valid.shape[0] < b:
        raise ValueError(f"session has {session.rows} rows (batch {session.cache.valid.shape[0]})"
                         f" but {n} chunks were given; select() the continuing rows first")
    b = session.cache.valid.shape[0]  # select() may have kept a larger batch
    needed = session.index + c + g
    cache = session.cache
    if needed > cache.capacity:
        cache = _grow(cache, bucket(needed, 64))
    tokens, mask = _left_pad(chunks, b, c)
    active = np.arange(b) < n
    start = session.next_pos.astype(np.int32)
    result, d = _run(
        _continue_core, params,
        [cache, *_place_rows([tokens, mask, start, active, _row_seeds(row_seeds, n, b)], mesh,
                             rules)],
        _key(seed), n, prep, max_new_tokens, mesh,
        dict(config=config, params_s=prep.params_s, gen_len=g, mesh=mesh,
             rules=sharding.as_rules(rules), has_stop=prep.has_stop), shrink_above)
    lengths, steps = jax.device_get((d.lengths, d.step))
    chunk_lens = np.array([len(x) for x in chunks] + [1] * (b - n))
    next_pos = session.next_pos + chunk_lens + lengths
    last_slot = np.where(lengths > 0, session.index + c + lengths - 1, -1)
    new_session = DecodeSession(d.cache, session.index + c + int(steps), n, next_pos, last_slot)
    return result, new_session
