"""PPO's critic: a value head on a copy of the decoder, its clipped value loss step, and the
forward-only values pass over a training batch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding

from zsjax import sharding
from zsjax.models.config import ModelConfig
from zsjax.models.decoder import Decoder
from zsjax.rl import losses as L
from zsjax.rl.logprobs import after_prefix, scan_micro_batches
from zsjax.rl.step import Batch, LossConfig, TrainState, gradient_step


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
                  mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False,
                  shared_prefix: int = 0):
    """[B, T] values aligned to actions: entry t is V(tokens[:t]), the value of the state in
    which token t was chosen (0 at t = 0), like the policy's logprobs and advantages.
    `shared_prefix` P (static): the first P tokens are the same in every row and run once
    (`zsjax.rl.logprobs.after_prefix`); entries t <= P are then 0 (a batch's loss starts
    later)."""
    hidden = after_prefix(Decoder(config, mesh, sharding.as_rules(rules), remat=remat),
                          critic_params["decoder"], tokens_bt, attention_mask_bt, shared_prefix,
                          return_hidden=True)
    v = ValueHead(config).apply({"params": critic_params["head"]}, hidden)
    return jnp.concatenate([jnp.zeros((v.shape[0], shared_prefix + 1), v.dtype), v[:, :-1]],
                           axis=1)


def critic_step(state: TrainState, batch: Batch, *, config: ModelConfig, tx, cfg: LossConfig,
                n_micro: int = 1, mesh=None, rules=sharding.DEFAULT_RULES, remat: bool = False,
                shared_prefix: int = 0):
    """One optimizer step on the critic with the clipped value loss (`shared_prefix` as in
    `critic_values`)."""
    def loss_fn(params, mb: Batch):
        values = critic_values(config, params, mb.tokens, mb.attention_mask, mesh=mesh,
                               rules=rules, remat=remat, shared_prefix=shared_prefix)
        s, _ = L.value_loss(values, mb.old_values, mb.returns, mb.loss_mask,
                            clip=cfg.value_clip, mode=cfg.aggregation)
        return s, {"value_loss": s}

    return gradient_step(state, batch, loss_fn, tx=tx, n_micro=n_micro,
                         denom=L.aggregate(batch.loss_mask, batch.loss_mask, cfg.aggregation)[1],
                         norm_key="critic_grad_norm")


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _values_jit(config, critic_params, tokens, mask, micro_batch, mesh, rules, shared_prefix):
    return scan_micro_batches(
        lambda t, m: critic_values(config, critic_params, t, m, mesh=mesh, rules=rules,
                                   shared_prefix=shared_prefix),
        micro_batch, tokens, mask)


def values_pass(config: ModelConfig, critic_params, tokens_bt, attention_mask_bt, *,
                micro_batch: int, mesh=None, rules=sharding.DEFAULT_RULES,
                shared_prefix: int = 0):
    """Critic values [B, T] computed micro-batch by micro-batch (a scan; `shared_prefix` as
    in `critic_values`)."""
    return _values_jit(config, critic_params, tokens_bt, attention_mask_bt, micro_batch, mesh,
                       sharding.as_rules(rules), shared_prefix)
