"""The RL algorithms by name: everything the trainer needs to know about each, in one registry.

An algorithm is an advantage function plus four facts: whether it needs a reference model,
whether its KL penalty goes in the loss or in the reward, whether it trains a critic, and the
smallest group of rollouts per question it can use. `zsjax.train` reads nothing else about it,
so a new estimator is one function and one `register` call (README, "Extending zsjax"):

    from zsjax.rl import algorithms

    def leave_best_out(x: algorithms.AdvantageInputs):
        r = x.rewards.reshape(-1, x.group_size)
        adv = (r - r.max(-1, keepdims=True)).reshape(-1)
        return adv[:, None] * x.mask, None

    algorithms.register("leave_best_out", algorithms.Algorithm(leave_best_out, min_group_size=2))

and then `--config.rl.algorithm=leave_best_out`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from zsjax.rl import advantages as A
from zsjax.rl import losses as L


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage function gets for one training step's batch of B trajectories.

    `rewards` [B]: one scalar reward per trajectory, the trajectories of one question next to
    each other in groups of `group_size`. Token arrays are [B, T] over the padded sequence;
    `mask` is 1 exactly on the policy's own tokens (documents and prompts are 0).
    `ref_logprobs` is None unless the algorithm needs a reference; `values` (the critic's, on
    mask-1 tokens) is None unless it trains a critic. `rl` is the config's `rl` group (std_eps,
    kl_coef, gamma, lam and anything a new estimator adds to it)."""
    rewards: jax.Array
    group_size: int
    mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: Optional[jax.Array]
    values: Optional[jax.Array]
    rl: Any


# (advantages [B, T], returns [B, T] for the critic's loss, or None)
AdvantageFn = Callable[[AdvantageInputs], "tuple[jax.Array, Optional[jax.Array]]"]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """`kl`: "loss" adds rl.kl_coef x KL(policy || reference) to the loss, and needs the
    reference only when kl_coef > 0; "reward" subtracts rl.kl_coef x KL from the token rewards
    inside `advantages`, and always gets the reference's logprobs. `critic`: a value model is
    trained beside the policy (its values reach `advantages`, its returns come back)."""
    advantages: AdvantageFn
    kl: str = "loss"
    critic: bool = False
    min_group_size: int = 1
    description: str = ""

    def __post_init__(self):
        if self.kl not in ("loss", "reward"):
            raise ValueError(f"Algorithm.kl must be 'loss' or 'reward'; got {self.kl!r}")
        if self.min_group_size < 1:
            raise ValueError(f"Algorithm.min_group_size must be >= 1; got "
                             f"{self.min_group_size}")

    def needs_reference(self, kl_coef: float) -> bool:
        return self.kl == "reward" or bool(kl_coef)

    def loss_kl_coef(self, kl_coef: float) -> float:
        """The KL coefficient of the policy loss (0 when the KL goes in the reward)."""
        return kl_coef if self.kl == "loss" else 0.0


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, algorithm: Algorithm) -> Algorithm:
    """Adds (or replaces) an algorithm under `name`, selectable as `rl.algorithm=name`."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register({name!r}, ...) takes an Algorithm; got "
                        f"{type(algorithm).__name__}")
    ALGORITHMS[name] = algorithm
    return algorithm


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"rl.algorithm={name!r} is not available; choose one of "
                         f"{names()}") from None


KL_PLACEMENTS = ("", "loss")


def resolve(name: str, kl_placement: str = "") -> Algorithm:
    """The algorithm `name` as a run uses it: with `kl_placement="loss"` an algorithm that
    puts its KL in the reward (PPO, REINFORCE++) takes it as a loss term instead, as GRPO does
    (rl.kl_coef x the rl.kl_kind estimate, a per-token mean; veRL's use_kl_loss), and its
    rewards carry no KL. "" keeps the algorithm's own placement."""
    algorithm = get(name)
    if kl_placement not in KL_PLACEMENTS:
        raise ValueError(f"rl.kl_placement={kl_placement!r}; expected one of {KL_PLACEMENTS}")
    if kl_placement == "loss" and algorithm.kl == "reward":
        def without_reward_kl(x: AdvantageInputs):  # no reference logprobs: no KL to subtract
            return algorithm.advantages(dataclasses.replace(x, ref_logprobs=None))
        return dataclasses.replace(algorithm, advantages=without_reward_kl, kl="loss")
    return algorithm


def names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


# --- The built-in estimators -----------------------------------------------------------------

def _per_sequence(adv_qk: jax.Array, x: AdvantageInputs):
    """[Q, K] sequence advantages -> [B, T] on the policy's tokens."""
    return adv_qk.reshape(-1)[:, None] * x.mask, None


def _grpo(x: AdvantageInputs):
    return _per_sequence(A.group_normalized(x.rewards.reshape(-1, x.group_size),
                                            eps=x.rl.std_eps), x)


def _dr_grpo(x: AdvantageInputs):
    return _per_sequence(A.group_normalized(x.rewards.reshape(-1, x.group_size), scale=False), x)


def _rloo(x: AdvantageInputs):
    return _per_sequence(A.rloo(x.rewards.reshape(-1, x.group_size)), x)


def _reward_kl(x: AdvantageInputs) -> jax.Array:
    """The k1 KL estimate on each policy token: what the reward-KL algorithms subtract (0
    without a reference's logprobs: `resolve` moved the KL into the loss)."""
    if x.ref_logprobs is None:
        return jnp.zeros_like(x.mask, dtype=jnp.float32)
    return L.kl_estimate(x.old_logprobs, x.ref_logprobs, "k1") * x.mask


SCORE_BASELINES = ("none", "group", "group_norm")


def _scores(x: AdvantageInputs) -> jax.Array:
    """The sequence scores the reward-KL algorithms put on the last token: the rewards; with
    `rl.score_baseline="group"` the rewards minus their question's mean reward (Dr.GRPO's
    advantages; with REINFORCE++ this is REINFORCE++-baseline); with "group_norm" GRPO's."""
    baseline = getattr(x.rl, "score_baseline", "none")
    if baseline == "none":
        return x.rewards
    return A.group_normalized(x.rewards.reshape(-1, x.group_size), eps=x.rl.std_eps,
                              scale=baseline == "group_norm").reshape(-1)


def _ppo(x: AdvantageInputs):
    # KL to the reference in the reward, GAE (skipping document tokens), whitened.
    token_rewards = (A.place_on_last_token(_scores(x), x.mask)
                     - x.rl.kl_coef * _reward_kl(x))
    adv, returns = A.gae(token_rewards, x.values, x.mask, gamma=x.rl.gamma, lam=x.rl.lam)
    return A.masked_whiten(adv, x.mask), returns


def _reinforce_pp(x: AdvantageInputs):
    return A.reinforce_plus_plus(A.place_on_last_token(_scores(x), x.mask), _reward_kl(x),
                                 x.mask, kl_coef=x.rl.kl_coef), None


register("grpo", Algorithm(_grpo, min_group_size=2, description=(
    "GRPO: (r - group mean) / (group std + eps), KL in the loss")))
register("dr_grpo", Algorithm(_dr_grpo, min_group_size=2, description=(
    "Dr.GRPO: r - group mean, no division by the std, KL in the loss")))
register("rloo", Algorithm(_rloo, min_group_size=2, description=(
    "RLOO: r minus the mean of the group's other rewards, KL in the loss")))
register("ppo", Algorithm(_ppo, kl="reward", critic=True, description=(
    "PPO: a critic, GAE over the policy's tokens, KL in the reward")))
register("reinforce_pp", Algorithm(_reinforce_pp, kl="reward", description=(
    "REINFORCE++: whitened discounted returns, KL in the reward")))
