"""The policy update: the PPO-clip loss with entropy and KL terms over the policy's tokens, one
jitted, sharded step with exact micro-batch accumulation (`zsjax.rl.step`), and supervised
fine-tuning's step on the same machinery.

This module also re-exports what a trainer needs from `zsjax.rl.step` (the state, the
optimizer, the jitted step), `zsjax.rl.logprobs` (forward-only passes) and `zsjax.rl.critic`,
so `from zsjax.rl import update as U` reaches all of it.
"""

from __future__ import annotations

import jax.numpy as jnp

from zsjax import sharding
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder
from zsjax.rl import losses as L
from zsjax.rl.critic import (ValueHead, critic_step, critic_values, init_critic,  # noqa: F401
                             values_pass)
from zsjax.rl.logprobs import (compiled_start, logprobs_pass, loss_start,  # noqa: F401
                               model_logprobs, shared_prefix_length,
                               token_logprobs_from_logits)
from zsjax.rl.step import (DECAYS, Batch, LossConfig, TrainState, batch_shardings,  # noqa: F401
                           describe_frozen, frozen_mask, gradient_step, init_state, jit_step,
                           make_optimizer, run_step, scaled_gradients, state_shardings)

__all__ = [  # this module's own, then the re-exported ones
    "policy_terms_from_logits", "policy_terms", "policy_gradients", "policy_step",
    "make_policy_step", "supervised_step", "sft_batch",
    "ValueHead", "critic_step", "critic_values", "init_critic", "values_pass",
    "compiled_start", "logprobs_pass", "loss_start", "model_logprobs", "shared_prefix_length",
    "token_logprobs_from_logits", "DECAYS", "Batch", "LossConfig", "TrainState", "batch_shardings",
    "describe_frozen", "frozen_mask", "gradient_step", "init_state", "jit_step",
    "make_optimizer", "run_step", "scaled_gradients", "state_shardings"]


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


def policy_gradients(params, batch: Batch, *, config: ModelConfig, cfg: LossConfig,
                     n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES,
                     remat: bool = False, logits_from: int = 0, shared_prefix: int = 0,
                     freeze: str = ""):
    """Gradient of the batch's loss (its global mean under cfg.aggregation) and metrics.

    `logits_from` (static) skips the logits of positions < logits_from: every row's loss mask
    must be 0 at t <= logits_from (those tokens' logprobs would be taken as 0). A batch whose
    prompts fill the first P positions of every row can use any logits_from <= P - 1 and get
    the same step with less work; see `loss_start`. `shared_prefix` (static): the first
    tokens, the same in every row, run once (`model_logprobs`, `shared_prefix_length`).
    `freeze`: params left out of the gradient (zeros; see `zsjax.rl.step.accumulate`)."""
    grads, metrics = scaled_gradients(
        _policy_loss(config, cfg, mesh, rules, remat, logits_from, shared_prefix), params,
        batch,
        denom=L.aggregate(batch.loss_mask, batch.loss_mask, cfg.aggregation)[1],
        n_micro=n_micro, freeze=freeze)
    metrics["tokens"] = batch.attention_mask.sum()
    return grads, metrics


def _policy_loss(config, cfg, mesh, rules, remat, logits_from, shared_prefix):
    model = Decoder(config, mesh, sharding.as_rules(rules), remat=remat)

    def loss_fn(params, mb: Batch):
        logp, entropy = model_logprobs(model, params, mb.tokens, mb.attention_mask,
                                       cfg.temperature, logits_from, shared_prefix)
        return policy_terms(logp, entropy, mb, cfg)
    return loss_fn


def policy_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx, cfg: LossConfig,
                n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False,
                logits_from: int = 0, shared_prefix: int = 0, freeze: str = ""):
    """One optimizer step on the policy; returns (new state, metrics). Unjitted: see
    `make_policy_step` for the sharded, jitted, donated version. `freeze`: the optimizer's
    (`make_optimizer`), whose params are then not differentiated at all."""
    return gradient_step(state, batch,
                         _policy_loss(config, cfg, mesh, rules, remat, logits_from, shared_prefix),
                         tx=tx, n_micro=n_micro, freeze=freeze,
                         denom=L.aggregate(batch.loss_mask, batch.loss_mask, cfg.aggregation)[1],
                         extra={"tokens": batch.attention_mask.sum()})


def make_policy_step(state: TrainState, batch_like: Batch, *, config: ModelConfig, tx,
                     cfg: LossConfig, n_micro: int = 1, mesh=None,
                     rules=sharding.DEFAULT_RULES, remat: bool = False, logits_from: int = 0,
                     shared_prefix: int = 0, freeze: str = ""):
    """`policy_step`, jitted and sharded (see `jit_step`)."""
    return jit_step(policy_step, state, batch_like, mesh=mesh, rules=rules, config=config, tx=tx,
                    cfg=cfg, n_micro=n_micro, remat=remat, logits_from=logits_from,
                    shared_prefix=shared_prefix, freeze=freeze)


# --- Supervised fine-tuning (the simulator; the policy's warm start) ------------------------

def supervised_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx,
                    n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES,
                    remat: bool = False, logits_from: int = 0, shared_prefix: int = 0,
                    freeze: str = ""):
    """One step of masked next-token cross-entropy: the mean over tokens with loss_mask 1
    (e.g. the simulator's documents). Uses batch.tokens, attention_mask and loss_mask only.
    `logits_from`, `shared_prefix` and `freeze` as in `policy_gradients`."""
    model = Decoder(config, mesh, sharding.as_rules(rules), remat=remat)

    def loss_fn(params, mb: Batch):
        logp, _ = model_logprobs(model, params, mb.tokens, mb.attention_mask,
                                 logits_from=logits_from, shared_prefix=shared_prefix)
        nll = -(logp * mb.loss_mask).sum()
        return nll, {"loss": nll}

    return gradient_step(state, batch, loss_fn, tx=tx, denom=batch.loss_mask.sum(),
                         n_micro=n_micro, freeze=freeze,
                         extra={"tokens": batch.attention_mask.sum()})


def sft_batch(tokens, attention_mask, loss_mask) -> Batch:
    """A Batch for supervised_step (the RL fields are unused zeros)."""
    zeros = jnp.zeros(jnp.shape(tokens), jnp.float32)
    return Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention_mask),
                 loss_mask=jnp.asarray(loss_mask, jnp.float32), old_logprobs=zeros,
                 advantages=zeros)
