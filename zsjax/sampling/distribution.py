"""The sampling distribution: temperature, top-k and top-p applied to logits.

`filter_logits` returns log-probabilities of the distribution actually sampled from (-inf
outside the kept set), so the sampler's logprobs are exact for that distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_bv: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probabilities [B, V] after temperature, top-k and top-p (float32, -inf = excluded)."""
    logits = logits_bv.astype(jnp.float32)
    if not params.greedy:
        logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if params.top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # (a token is kept when the mass strictly before it is below top_p).
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < params.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits_bv: jax.Array, params: SamplingParams, key: jax.Array
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row: (tokens [B], logprobs under the sampled distribution [B],
    model logprobs at temperature T without top-k/top-p [B])."""
    logits = logits_bv.astype(jnp.float32)
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        # Greedy has no proper distribution; report the model's own (T = 1) logprob.
        model_lp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(model_lp, tokens[:, None], axis=-1)[:, 0]
        return tokens, lp, lp
    logprobs = filter_logits(logits, params)
    tokens = jax.random.categorical(key, logprobs, axis=-1)
    lp = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    model_lp = jax.nn.log_softmax(logits / params.temperature, axis=-1)
    mlp = jnp.take_along_axis(model_lp, tokens[:, None], axis=-1)[:, 0]
    return tokens, lp, mlp
