"""The policy/critic update: masks, exact accumulation, sharding, learning direction."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zsjax import sharding
from zsjax.models import ModelConfig, forward, init_params, param_shardings
from zsjax.rl import update as U

CONFIG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, d_ff=64, family="qwen2", qkv_bias=True)
B, T = 8, 24
INFO = slice(12, 16)  # an information block inside every response


def _params(seed=0):
    return init_params(CONFIG, jax.random.key(seed))


def _batch(seed=0, params=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([T, T, 20, 22, T, 19, T, 21])
    attn = np.arange(T)[None] < lengths[:, None]
    loss_mask = attn.copy()
    loss_mask[:, :6] = False  # prompt
    loss_mask[:, INFO] = False  # documents
    adv = np.repeat(rng.normal(size=(B, 1)), T, axis=1) * loss_mask
    if params is None:
        old = np.where(loss_mask, -np.log(CONFIG.vocab_size), 0.0)
    else:
        old = np.asarray(U.logprobs_pass(CONFIG, params, tokens, attn, micro_batch=B))
    old = old + 0.05 * rng.normal(size=(B, T)) * loss_mask
    ref = old + 0.1 * rng.normal(size=(B, T)) * loss_mask
    return U.Batch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                   loss_mask=jnp.asarray(loss_mask, jnp.float32),
                   old_logprobs=jnp.asarray(old, jnp.float32),
                   advantages=jnp.asarray(adv, jnp.float32),
                   ref_logprobs=jnp.asarray(ref, jnp.float32))


CFG = U.LossConfig(entropy_coef=0.001, kl_coef=0.001)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_and_their_gradient(temperature):
    """The hand-written backward pass of the token logprobs and entropies against autodiff of
    the textbook formulas, with independent weights on the two outputs."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 9, 40)) * 3 + 30  # large logits, and a confident position:
    logits[0, 2, 5] += 40  # entropy as lse - sum(p z) lost 1e-4 to cancellation here
    logits = jnp.asarray(logits, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 40, (3, 9)), jnp.int32)
    w_logp, w_ent = (jnp.asarray(rng.normal(size=(3, 9)), jnp.float32) for _ in range(2))

    def reference(x):
        logp_all = jax.nn.log_softmax(x[:, :-1] / temperature, axis=-1)
        logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        return logp, entropy

    def ours(x):
        logp, entropy = U.token_logprobs_from_logits(x, tokens, temperature)
        return logp[:, 1:], entropy[:, 1:]

    first = U.token_logprobs_from_logits(logits, tokens, temperature)
    assert not np.any(np.asarray(first[0][:, 0])) and not np.any(np.asarray(first[1][:, 0]))
    for a, b in zip(ours(logits), reference(logits)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x: sum((w[:, 1:] * y).sum() for w, y in zip((w_logp, w_ent), f(x))))(
        logits) for f in (ours, reference)]
    assert float(jnp.abs(grads[1]).max()) > 0.1
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_gradient_wrt_logits_is_zero_at_mask0_targets():
    batch = _batch()
    logits = jax.random.normal(jax.random.key(1), (B, T, CONFIG.vocab_size))
    g = jax.grad(lambda lg: U.policy_terms_from_logits(lg, batch, CFG)[0])(logits)
    g = np.asarray(g)
    # logits at t-1 predict token t: zero exactly where token t is not a policy token
    target_masked = np.asarray(batch.loss_mask)[:, 1:] == 0
    assert np.all(g[:, :-1][target_masked] == 0.0)
    assert np.all(g[:, -1] == 0.0)
    assert np.abs(g[:, :-1][~target_masked]).max() > 0


def test_information_tokens_change_the_gradient_only_through_attention():
    params = _params()
    a = _batch()
    other = np.asarray(a.tokens).copy()
    other[:, INFO] = (other[:, INFO] + 7) % CONFIG.vocab_size
    b = a.replace(tokens=jnp.asarray(other))
    logits = jax.random.normal(jax.random.key(2), (B, T, CONFIG.vocab_size))
    grad_logits = lambda batch: jax.grad(  # noqa: E731
        lambda lg: U.policy_terms_from_logits(lg, batch, CFG)[0])(logits)
    # same logits: the loss never reads the tokens inside the block
    np.testing.assert_array_equal(grad_logits(a), grad_logits(b))
    # through the model, the block is context for later tokens: the gradient differs
    ga, _ = U.policy_gradients(params, a, config=CONFIG, cfg=CFG)
    gb, _ = U.policy_gradients(params, b, config=CONFIG, cfg=CFG)
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(ga),
                                                              jax.tree.leaves(gb)))
    assert diff > 1e-6


def _rel(a, b):
    fa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return np.linalg.norm(fa - fb) / np.linalg.norm(fa)


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum"])
def test_micro_batch_accumulation_is_exact(aggregation):
    params = _params()
    batch = _batch(params=params)
    cfg = U.LossConfig(aggregation=aggregation, kl_coef=0.001)
    grad = jax.jit(functools.partial(U.policy_gradients, config=CONFIG, cfg=cfg),
                   static_argnames="n_micro")
    g1, m1 = grad(params, batch, n_micro=1)
    for n in (2, 4, 8):
        gn, mn = grad(params, batch, n_micro=n)
        assert _rel(g1, gn) < 1e-6
        np.testing.assert_allclose(m1["policy_loss"], mn["policy_loss"], rtol=1e-5, atol=1e-7)


def test_learning_direction_grpo():
    params = _params(3)
    batch = _batch(3, params=params)
    seq_adv = np.where(np.arange(B) % 2 == 0, 1.0, -1.0)
    batch = batch.replace(advantages=jnp.asarray(seq_adv[:, None] * np.asarray(batch.loss_mask),
                                                 jnp.float32))
    tx = U.make_optimizer(1e-2, weight_decay=0.0)
    state = U.init_state(params, tx)
    step = U.make_policy_step(state, batch, config=CONFIG, tx=tx, cfg=CFG)

    def seq_logp(p):
        lp = U.logprobs_pass(CONFIG, p, batch.tokens, batch.attention_mask, micro_batch=B)
        return np.asarray((lp * batch.loss_mask).sum(1))

    before = seq_logp(params)
    for _ in range(3):
        state, metrics = step(state, batch)
    after = seq_logp(state.params)
    assert np.all(after[seq_adv > 0] > before[seq_adv > 0])
    assert np.all(after[seq_adv < 0] < before[seq_adv < 0])
    assert int(state.step) == 3 and float(metrics["grad_norm"]) > 0


@pytest.mark.parametrize("updates_per_step", [1, 2])
def test_warmup_counts_training_steps(updates_per_step):
    """The warm-up counts training steps of `updates_per_step` optimizer updates (veRL steps
    its scheduler once a step): both mini-batch updates of a step get the step's rate. With
    a constant gradient, Adam's first-moment / root-second-moment ratio is 1, so each
    update moves a weight by the rate itself."""
    tx = U.make_optimizer(1.0, warmup_steps=3, weight_decay=0.0, grad_clip=1e9,
                          updates_per_step=updates_per_step)
    w = {"w": jnp.zeros(4)}
    opt = tx.init(w)
    moves = []
    for _ in range(8):
        upd, opt = tx.update({"w": jnp.ones(4)}, opt, w)
        moves.append(-float(upd["w"][0]))
        w = jax.tree.map(lambda a, b: a + b, w, upd)
    steps = np.arange(8) // updates_per_step
    np.testing.assert_allclose(moves, np.minimum(steps / 3, 1.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup,updates_per_step", [(0, 1), (3, 1), (3, 2)])
def test_cosine_decay_reaches_zero_at_the_last_step(warmup, updates_per_step):
    """decay="cosine": after the warm-up, lr * (1 + cos(pi * (step - warmup) / (total -
    warmup))) / 2, written here from its definition, per training step."""
    total = 10
    tx = U.make_optimizer(1.0, warmup_steps=warmup, weight_decay=0.0, grad_clip=1e9,
                          updates_per_step=updates_per_step, decay="cosine", total_steps=total)
    w = {"w": jnp.zeros(4)}
    opt = tx.init(w)
    moves = []
    for _ in range(total * updates_per_step):
        upd, opt = tx.update({"w": jnp.ones(4)}, opt, w)
        moves.append(-float(upd["w"][0]))
    want = []
    for k in range(total * updates_per_step):
        step = k // updates_per_step
        want.append(step / warmup if step < warmup
                    else (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2)
    np.testing.assert_allclose(moves, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown learning-rate decay"):
        U.make_optimizer(1.0, decay="linear")
    with pytest.raises(ValueError, match="total_steps"):
        U.make_optimizer(1.0, warmup_steps=5, decay="cosine", total_steps=5)


@pytest.mark.slow
def test_freeze_leaves_matching_params_unchanged():
    """`freeze` is a regex over param paths: those params stay bit-identical (no weight decay,
    no Adam step) while every other param moves, on one device and on a mesh. A pattern
    matching nothing is an error."""
    params = _params(5)
    batch = _batch(5, params=params)
    params = jax.tree.map(np.asarray, params)  # host copies: the step donates its input
    meshes = [None]
    if jax.device_count() >= 4:
        meshes.append(sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4]))
    for mesh in meshes:
        p = (jax.tree.map(jnp.asarray, params) if mesh is None
             else jax.device_put(params, param_shardings(CONFIG, mesh)))
        tx = U.make_optimizer(1e-2, weight_decay=0.1, freeze=r"embed|\['mlp'\]")
        state = U.init_state(p, tx)
        step = U.make_policy_step(state, batch, config=CONFIG, tx=tx, cfg=CFG, mesh=mesh)
        for _ in range(2):
            state, _ = step(state, batch)
        for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = jax.tree_util.keystr(path)
            after = np.asarray(functools.reduce(lambda t, k: t[k.key], path, state.params))
            if "embed" in name or "['mlp']" in name:
                np.testing.assert_array_equal(after, before, err_msg=name)
            else:
                assert np.abs(after - before).max() > 1e-4, name
    with pytest.raises(ValueError, match="matches no parameter"):
        U.init_state(params, U.make_optimizer(1e-2, freeze="no_such_param"))


@pytest.mark.slow
@pytest.mark.parametrize("n_micro", [1, 2])
def test_frozen_params_are_not_differentiated_and_the_rest_is_unchanged(n_micro):
    """With `freeze`, the loss is differentiated with respect to the other params only: their
    gradients equal the full gradient's (autodiff of the whole model), the frozen ones are 0,
    and the step equals the optimizer's masked step on the full gradient."""
    params = _params(6)
    batch = _batch(6, params=params)
    pattern = r"embed|layers_0"
    full, m_full = U.policy_gradients(params, batch, config=CONFIG, cfg=CFG, n_micro=n_micro)
    part, m_part = U.policy_gradients(params, batch, config=CONFIG, cfg=CFG, n_micro=n_micro,
                                      freeze=pattern)
    frozen = U.frozen_mask(params, pattern)
    for (path, g), f, h in zip(jax.tree_util.tree_flatten_with_path(full)[0],
                               jax.tree.leaves(frozen), jax.tree.leaves(part)):
        name = jax.tree_util.keystr(path)
        assert f == ("embed" in name or "layers_0" in name), name
        if f:
            assert not np.asarray(h).any(), name
        else:
            np.testing.assert_allclose(h, g, rtol=2e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(m_part["policy_loss"], m_full["policy_loss"], rtol=1e-6)
    tx = U.make_optimizer(1e-2, freeze=pattern)
    host = jax.tree.map(np.asarray, params)
    states = []
    for freeze in ("", pattern):  # the masked optimizer alone, then with the skipped backward
        state = U.init_state(jax.tree.map(jnp.asarray, host), tx)
        step = U.make_policy_step(state, batch, config=CONFIG, tx=tx, cfg=CFG, n_micro=n_micro,
                                  freeze=freeze)
        states.append(jax.tree.map(np.asarray, step(state, batch)[0].params))
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        # Adam divides by the gradient's scale: a near-0 gradient's rounding moves its update
        # by a few thousandths of the 1e-2 step
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_kl_penalty_is_added():
    batch = _batch()
    logits = jax.random.normal(jax.random.key(4), (B, T, CONFIG.vocab_size))
    with_kl, m = U.policy_terms_from_logits(logits, batch, U.LossConfig(kl_coef=0.5))
    without, _ = U.policy_terms_from_logits(logits, batch, U.LossConfig(kl_coef=0.0))
    assert float(m["kl"]) > 0
    np.testing.assert_allclose(float(with_kl - without), 0.5 * float(m["kl"]), rtol=1e-5)


def test_logprobs_pass_matches_full_forward():
    params = _params()
    batch = _batch()
    lp = U.logprobs_pass(CONFIG, params, batch.tokens, batch.attention_mask, micro_batch=2)
    logits = forward(CONFIG, params, batch.tokens, attention_mask=batch.attention_mask)
    ref = jax.nn.log_softmax(logits, -1)
    ref = np.take_along_axis(np.asarray(ref)[:, :-1], np.asarray(batch.tokens)[:, 1:, None],
                             -1)[..., 0]
    attn = np.asarray(batch.attention_mask)[:, 1:]
    np.testing.assert_allclose(np.asarray(lp)[:, 1:][attn], ref[attn], atol=1e-5)


@pytest.mark.slow
def test_logits_from_skips_only_the_prompt_positions():
    """With logits_from <= the position before the first loss token, the step is the same
    (gradients, metrics, old logprobs, the supervised step); one position later it is not."""
    from zsjax.models.decoder import Decoder
    params = _params()
    batch = _batch(params=params)  # loss mask 0 at t < 6
    grad = jax.jit(functools.partial(U.policy_gradients, config=CONFIG, cfg=CFG),
                   static_argnames="logits_from")
    g0, m0 = grad(params, batch, logits_from=0)
    for k in (3, 5):
        gk, mk = grad(params, batch, logits_from=k)
        assert _rel(g0, gk) < 1e-6
        for name in m0:
            np.testing.assert_allclose(m0[name], mk[name], rtol=1e-6, atol=1e-9)
    g6, m6 = grad(params, batch, logits_from=6)  # drops the first loss token's logprob
    assert abs(float(m6["policy_loss"]) - float(m0["policy_loss"])) > 1e-4

    full = U.logprobs_pass(CONFIG, params, batch.tokens, batch.attention_mask, micro_batch=4)
    cut = U.logprobs_pass(CONFIG, params, batch.tokens, batch.attention_mask, micro_batch=4,
                          logits_from=5)
    np.testing.assert_allclose(np.asarray(cut)[:, 6:], np.asarray(full)[:, 6:], atol=1e-6)
    assert not np.asarray(cut)[:, :6].any()

    logits = Decoder(CONFIG).apply({"params": params}, batch.tokens, jnp.zeros((B, T), int))[0]
    part = Decoder(CONFIG).apply({"params": params}, batch.tokens, jnp.zeros((B, T), int),
                                 logits_positions=(5, T - 1))[0]
    np.testing.assert_allclose(np.asarray(part), np.asarray(logits)[:, 5:T - 1], atol=1e-5)
    with pytest.raises(ValueError, match="logits_positions"):
        Decoder(CONFIG).apply({"params": params}, batch.tokens, jnp.zeros((B, T), int),
                              logits_positions=(4, T + 1))
    with pytest.raises(ValueError, match="not both"):
        Decoder(CONFIG).apply({"params": params}, batch.tokens, jnp.zeros((B, T), int),
                              last_logits_only=True, logits_positions=(4, T - 1))
    with pytest.raises(ValueError, match="logits_from"):
        U.logprobs_pass(CONFIG, params, batch.tokens, batch.attention_mask, micro_batch=4,
                        logits_from=T - 1)

    tx = U.make_optimizer(1e-3)
    sft = U.sft_batch(batch.tokens, batch.attention_mask, batch.loss_mask)
    steps = [jax.jit(functools.partial(U.supervised_step, config=CONFIG, tx=tx, logits_from=k))
             for k in (0, 5)]
    (s0, n0), (s5, n5) = (step(U.init_state(params, tx), sft) for step in steps)
    np.testing.assert_allclose(n0["loss"], n5["loss"], rtol=1e-6)
    assert _rel(s0.params, s5.params) < 1e-6


def test_loss_start_and_compiled_start():
    """Hand-written cases, then random masks against a loop."""
    def ones_from(t, firsts):
        m = np.zeros((len(firsts), t), np.float32)
        for row, first in enumerate(firsts):
            if first is not None:
                m[row, first:] = 1
        return m
    assert U.loss_start(ones_from(40, [17, 30]), 1) == 16
    assert U.loss_start(ones_from(40, [17, 30]), 16) == 16
    assert U.loss_start(ones_from(40, [33, None]), 16) == 32
    assert U.loss_start(ones_from(40, [1]), 16) == 0
    assert U.loss_start(ones_from(40, [0]), 1) == 0
    assert U.loss_start(ones_from(40, [None, None]), 1) == 38  # nothing in the loss: T - 2
    assert U.loss_start(ones_from(40, [None]), 16) == 32
    compiled = {(64, 0): None, (64, 32): None, (128, 48): None, ("critic", 64): None}
    assert U.compiled_start(compiled, 64, 40) == 32
    assert U.compiled_start(compiled, 64, 31) == 0
    assert U.compiled_start(compiled, 128, 40) == 40  # (128, 48) starts too late
    assert U.compiled_start(compiled, 256, 16) == 16

    rng = np.random.default_rng(0)
    for _ in range(50):
        b, t = rng.integers(1, 5), rng.integers(2, 90)
        mask = rng.random((b, t)) < rng.random()
        mask[:, : rng.integers(0, t)] = False
        multiple = int(rng.choice([1, 8, 16]))
        firsts = [next(i for i in range(t) if row[i]) for row in mask if row.any()]
        first = min(firsts) if firsts else t - 1
        expected = max(first - 1, 0) // multiple * multiple
        assert U.loss_start(mask.astype(np.float32), multiple) == expected


def test_critic_learns_returns():
    params = _params()
    batch = _batch()
    returns = jnp.asarray(np.random.default_rng(0).normal(size=(B, T)), jnp.float32)
    critic = U.init_critic(CONFIG, params)
    values = U.critic_values(CONFIG, critic, batch.tokens, batch.attention_mask)
    assert values.shape == (B, T) and float(jnp.abs(values).max()) == 0.0  # zero-init head
    batch = batch.replace(old_values=values, returns=returns)
    tx = U.make_optimizer(3e-3, weight_decay=0.0)
    state = U.init_state(critic, tx)
    step = jax.jit(functools.partial(U.critic_step, config=CONFIG, tx=tx,
                                     cfg=U.LossConfig(value_clip=10.0)))
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["value_loss"]))
    assert losses[-1] < losses[0]


def test_sharded_step_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    params = _params()
    batch = _batch(params=params)
    sharded_params = jax.device_put(params, param_shardings(CONFIG, mesh))

    # the gradient computation itself, sharded vs single device
    grad = functools.partial(U.policy_gradients, config=CONFIG, cfg=CFG, n_micro=2)
    g1, m1 = jax.jit(grad)(params, batch)
    g8, m8 = jax.jit(functools.partial(grad, mesh=mesh))(sharded_params, batch)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert _rel(g1, g8) < 1e-5
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-5, atol=1e-6)
    # no logits at the prompt's positions (loss mask 0 at t < 6), sharded: the same gradient
    g8p, _ = jax.jit(functools.partial(grad, mesh=mesh, logits_from=5))(sharded_params, batch)
    assert _rel(g1, g8p) < 1e-5
    # the shared prefix run once (one row, on every data shard), sharded: the same gradient
    pbatch = _prefix_batch()
    g1s, _ = jax.jit(grad)(params, pbatch)
    g8s, _ = jax.jit(functools.partial(grad, mesh=mesh, logits_from=8, shared_prefix=8))(
        sharded_params, pbatch)
    assert _rel(g1s, g8s) < 1e-5

    # a whole step (AdamW), jitted with explicit shardings, vs the single-device step
    tx = U.make_optimizer(1e-3)
    single_state = U.init_state(jax.tree.map(jnp.copy, params), tx)  # the step donates it
    single = U.make_policy_step(single_state, batch, config=CONFIG, tx=tx, cfg=CFG, n_micro=2)
    s1, _ = single(single_state, batch)
    state = U.init_state(sharded_params, tx)
    step = U.make_policy_step(state, batch, config=CONFIG, tx=tx, cfg=CFG, n_micro=2, mesh=mesh)
    s8, _ = step(state, batch)
    # Adam's update g / (|g| + eps) is ill-conditioned where |g| is near eps = 1e-8: there,
    # 1e-9 of summation-order noise moves the update by percents of lr. Elsewhere the steps
    # must agree within 1e-5; on those few elements, within Adam's largest update (2 lr).
    ill = 0
    for a, b, g in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params),
                       jax.tree.leaves(g1)):
        a, b, tiny = np.asarray(a), np.asarray(b), np.abs(np.asarray(g)) < 1e-7
        np.testing.assert_allclose(a[~tiny], b[~tiny], atol=1e-5)
        assert np.all(np.abs(a[tiny] - b[tiny]) <= 2e-3)
        ill += int(tiny.sum())
    assert ill < 0.05 * sum(x.size for x in jax.tree.leaves(params))
    print(f"\n{ill} of {sum(x.size for x in jax.tree.leaves(params))} params have |grad| < 1e-7")
    # the compiled step keeps params and optimizer moments sharded
    q = s8.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert sharding.shard_shape(q) == (16, 2, 8)
    mu = s8.opt_state[1][0].mu["layers_0"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor", None)
    gate = s8.params["layers_1"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == P("fsdp", "tensor")
    s8b, _ = step(s8, batch)  # and it runs again on its own output (donated, same shardings)
    assert int(s8b.step) == 2


def test_critic_values_are_aligned_to_actions():
    """Entry t is V(tokens[:t]): it must not depend on token t itself."""
    params = _params()
    batch = _batch()
    critic = U.init_critic(CONFIG, params)
    critic["head"] = jax.tree.map(lambda x: x + 0.1, critic["head"])
    v1 = np.asarray(U.critic_values(CONFIG, critic, batch.tokens, batch.attention_mask))
    changed = np.asarray(batch.tokens).copy()
    changed[:, 10] = (changed[:, 10] + 1) % CONFIG.vocab_size
    v2 = np.asarray(U.critic_values(CONFIG, critic, jnp.asarray(changed), batch.attention_mask))
    assert np.all(v1[:, 0] == 0)
    np.testing.assert_array_equal(v1[:, :11], v2[:, :11])  # up to and including t = 10
    assert np.abs(v1[:, 11:] - v2[:, 11:]).max() > 0


def test_critic_with_a_shared_prefix():
    """Values after the shared prefix as without it (0 up to it: no loss reads them there);
    the critic step the same. The prefix is most of the row (16 of 24 tokens)."""
    params = _params()
    batch = _prefix_batch(prefix=16, loss_from=18)
    critic = U.init_critic(CONFIG, params)
    critic["head"] = jax.tree.map(lambda x: x + 0.1, critic["head"])
    full, cut = (np.asarray(U.values_pass(CONFIG, critic, batch.tokens, batch.attention_mask,
                                          micro_batch=4, shared_prefix=k)) for k in (0, 16))
    attn = np.asarray(batch.attention_mask)
    np.testing.assert_allclose(cut[:, 17:][attn[:, 17:]], full[:, 17:][attn[:, 17:]],
                               atol=2e-6)
    assert not cut[:, :17].any()
    batch = batch.replace(old_values=jnp.asarray(full) * batch.loss_mask,
                          returns=batch.loss_mask * 0.5)
    tx = U.make_optimizer(3e-3, weight_decay=0.0)
    (s0, m0), (s8, m8) = (
        jax.jit(functools.partial(U.critic_step, config=CONFIG, tx=tx, cfg=U.LossConfig(),
                                  shared_prefix=k))(U.init_state(critic, tx), batch)
        for k in (0, 16))
    np.testing.assert_allclose(m0["value_loss"], m8["value_loss"], rtol=1e-6)
    assert _rel(s0.params, s8.params) < 1e-5


def test_values_pass_and_run_step_metrics():
    params = _params()
    batch = _batch(params=params)
    critic = U.init_critic(CONFIG, params)
    critic["head"] = jax.tree.map(lambda x: x + 0.1, critic["head"])
    full = U.critic_values(CONFIG, critic, batch.tokens, batch.attention_mask)
    micro = U.values_pass(CONFIG, critic, batch.tokens, batch.attention_mask, micro_batch=2)
    np.testing.assert_allclose(np.asarray(micro), np.asarray(full), atol=1e-5)
    tx = U.make_optimizer(1e-4)
    state = U.init_state(params, tx)
    step = U.make_policy_step(state, batch, config=CONFIG, tx=tx, cfg=CFG)
    state, m = U.run_step(step, state, batch)
    for key in ("policy_loss", "entropy", "kl", "clip_fraction", "grad_norm", "tokens_per_s"):
        assert np.isfinite(m[key]), key
    assert m["tokens"] == float(np.asarray(batch.attention_mask).sum()) and m["entropy"] > 0


def _prefix_batch(seed=0, prefix=8, loss_from=10):
    """`_batch` with the first `prefix` tokens the same in every row and the loss from
    position `loss_from` on."""
    b = _batch(seed)
    tokens = np.asarray(b.tokens).copy()
    tokens[:, :prefix] = tokens[0, :prefix]
    loss = np.asarray(b.loss_mask).copy()
    loss[:, :loss_from] = 0
    return b.replace(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss),
                     advantages=b.advantages * loss)


@pytest.mark.parametrize("variant", ["layers", "scan_layers", "lora"])
def test_shared_prefix_is_the_same_function(variant):
    """The prefix run once and broadcast (`shared_prefix`) gives the logprobs, the
    entropies, the gradients and the supervised step of the full forward pass."""
    from zsjax.models import lora
    from zsjax.models.decoder import Decoder, stack_layers
    config = CONFIG
    params = _params()
    if variant == "scan_layers":
        config = dataclasses.replace(CONFIG, scan_layers=True)
        params = stack_layers(params, CONFIG.n_layers)
    if variant == "lora":
        params = lora.attach(params, lora.LoraConfig(rank=4), jax.random.key(1))
        params = params.replace(adapters=jax.tree.map(lambda a: a + 0.01, params.adapters))
    batch = _prefix_batch()
    model = Decoder(config)

    def terms(p, prefix):
        lp, ent = U.model_logprobs(model, p, batch.tokens, batch.attention_mask, 1.0, 8, prefix)
        w = batch.attention_mask.astype(jnp.float32)
        return (lp * w).sum() + 0.5 * (ent * w).sum(), (lp, ent)

    value_and_grad = jax.jit(jax.value_and_grad(terms, has_aux=True), static_argnums=1)
    (v0, (lp0, e0)), g0 = value_and_grad(params, 0)
    (v8, (lp8, e8)), g8 = value_and_grad(params, 8)
    attn = np.asarray(batch.attention_mask)
    np.testing.assert_allclose(np.asarray(lp8)[attn], np.asarray(lp0)[attn], atol=2e-6)
    np.testing.assert_allclose(np.asarray(e8)[attn], np.asarray(e0)[attn], atol=2e-6)
    np.testing.assert_allclose(float(v8), float(v0), rtol=1e-6)
    assert _rel(g0, g8) < 1e-5

    if variant == "layers":
        grad = jax.jit(functools.partial(U.policy_gradients, config=config, cfg=CFG),
                       static_argnames=("logits_from", "shared_prefix"))
        (ga, ma), (gb, mb) = (grad(params, batch, logits_from=8, shared_prefix=k)
                              for k in (0, 8))
        assert _rel(ga, gb) < 1e-5
        for name in ma:
            np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-8)
        passes = [U.logprobs_pass(config, params, batch.tokens, batch.attention_mask,
                                  micro_batch=4, logits_from=8, shared_prefix=k) for k in (0, 8)]
        np.testing.assert_allclose(np.asarray(passes[1]), np.asarray(passes[0]), atol=2e-6)
        tx = U.make_optimizer(1e-3)
        sft = U.sft_batch(batch.tokens, batch.attention_mask, batch.loss_mask)
        (s0, n0), (s8, n8) = (
            jax.jit(functools.partial(U.supervised_step, config=config, tx=tx, logits_from=8,
                                      shared_prefix=k))(U.init_state(params, tx), sft)
            for k in (0, 8))
        np.testing.assert_allclose(n0["loss"], n8["loss"], rtol=1e-6)
        assert _rel(s0.params, s8.params) < 1e-5
        with pytest.raises(ValueError, match="shared_prefix"):
            U.model_logprobs(model, params, batch.tokens, batch.attention_mask, 1.0, 4, 8)


def test_shared_prefix_length_against_a_loop():
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(1, 50, 40), (3, 1))
    mask = np.ones((3, 40), bool)
    assert U.shared_prefix_length(tokens, mask, 38, 1) == 40 - 2  # capped by the limit
    assert U.shared_prefix_length(tokens, mask, 38, 16) == 32
    tokens[1, 21] += 1
    assert U.shared_prefix_length(tokens, mask, 38, 1) == 21
    assert U.shared_prefix_length(tokens, mask, 38, 16) == 16
    mask[2, 5:] = False  # a padded row shares only its real tokens
    assert U.shared_prefix_length(tokens, mask, 38, 1) == 5
    assert U.shared_prefix_length(tokens, mask, 38, 8) == 0
    for _ in range(50):
        b, t = rng.integers(1, 5), rng.integers(2, 60)
        tokens = np.tile(rng.integers(0, 3, t), (b, 1))
        tokens[rng.random((b, t)) < 0.05] = 7
        mask = np.arange(t)[None] < rng.integers(1, t + 1, (b, 1))
        limit, multiple = int(rng.integers(0, t)), int(rng.choice([1, 4, 16]))
        n = 0
        while n < t and all(mask[r, n] and tokens[r, n] == tokens[0, n] for r in range(b)):
            n += 1
        assert U.shared_prefix_length(tokens, mask, limit, multiple) == (
            min(n, limit) // multiple * multiple)
