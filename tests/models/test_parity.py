"""Logits parity with transformers' PyTorch models, loaded from save_pretrained folders."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import LLAMA3_ROPE, torch_logits
from zsjax.models import forward, init_cache, load_hf, save_hf
from zsjax.models.decoder import Decoder
from zsjax.models import rope

VARIANTS = {
    "qwen2-bias-tied": dict(family="qwen2", tied=True),
    "qwen2-bias-untied": dict(family="qwen2", tied=False),
    "llama3rope-tied": dict(family="llama", tied=True, rope=LLAMA3_ROPE, bias=False),
    "llama3rope-untied": dict(family="llama", tied=False, rope=LLAMA3_ROPE, bias=False),
    "llama-attnbias-untied": dict(family="llama", tied=False, bias=True),
    # Qwen3: q/k norms, head_dim 32 against hidden / heads = 16, no biases
    "qwen3-qknorm-tied": dict(family="qwen3", tied=True, bias=False),
    "qwen3-qknorm-untied": dict(family="qwen3", tied=False, bias=False),
    # the MLP's gate activation from config.json's hidden_act
    "llama-gelu-tanh-untied": dict(family="llama", tied=False, bias=False,
                                   act="gelu_pytorch_tanh"),
}


def _tokens(batch, length, vocab=257, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_model_dir, variant):
    path, model = hf_model_dir(**VARIANTS[variant])
    config, params = load_hf(path)
    assert config.tie_embeddings == VARIANTS[variant]["tied"]
    assert ("lm_head" in params) != config.tie_embeddings
    # 200 positions reach the low-frequency RoPE bands that Llama-3 scaling changes.
    tokens = _tokens(2, 200)
    ours = np.asarray(forward(config, params, tokens))
    ref = torch_logits(model, tokens)
    assert np.abs(ref).std() > 0.3  # the weights are large enough for a bug to show
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2-bias-untied", "llama3rope-tied"])
def test_right_padded_batch_matches_transformers(hf_model_dir, variant):
    path, model = hf_model_dir(**VARIANTS[variant])
    config, params = load_hf(path)
    lengths = [23, 9, 16]
    tokens = _tokens(3, 23, seed=1)
    mask = np.arange(23)[None, :] < np.array(lengths)[:, None]
    tokens = np.where(mask, tokens, 0)
    ours = np.asarray(forward(config, params, tokens, attention_mask=mask))
    ref = torch_logits(model, tokens, attention_mask=mask)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(ours[row, :n], ref[row, :n], atol=1e-4, rtol=0)
        # Each padded row must equal the same sequence run alone (padding truly masked).
        alone = torch_logits(model, tokens[row:row + 1, :n])[0]
        np.testing.assert_allclose(ours[row, :n], alone, atol=1e-4, rtol=0)


def test_rope_inverse_frequencies_match_transformers(hf_model_dir):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    path, model = hf_model_dir(**VARIANTS["llama3rope-untied"])
    config, _ = load_hf(path)
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](model.config, device="cpu")
    ours = rope.inverse_frequencies(config)
    assert scale == 1.0
    # all three Llama-3 bands (kept, interpolated, divided) are present in this config
    base = rope.inverse_frequencies(config.replace(rope_scaling=None))
    ratio = ours / base
    assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, 1 / 8))
    assert np.any((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("variant,block", [("qwen2-bias-tied", 64), ("llama-attnbias-untied", 64),
                                           ("qwen2-bias-tied", 8), ("qwen3-qknorm-untied", 64),
                                           ("llama-gelu-tanh-untied", 64)])
def test_gradients_match_torch(hf_model_dir, variant, block, tmp_path, monkeypatch):
    """The gradient of a weighted token log-likelihood plus an entropy term, with right padding,
    against PyTorch autograd on the transformers model: every weight, bias, norm and the (tied or
    untied) head. On a CPU the projections run through a hand-written backward pass
    (`kernels.matmul`), which this checks; with 8-row blocks, so is causal attention by blocks
    of queries (30 tokens: 8 + 8 + 8 + 6 rows)."""
    import torch
    from safetensors.numpy import load_file
    from zsjax.models import kernels
    from zsjax.rl.update import token_logprobs_from_logits
    monkeypatch.setattr(kernels, "CAUSAL_BLOCK", block)

    path, model = hf_model_dir(**VARIANTS[variant])
    config, params = load_hf(path)
    lengths = [30, 17]
    tokens = np.where(np.arange(30)[None] < np.array(lengths)[:, None], _tokens(2, 30, seed=4), 0)
    mask = np.arange(30)[None] < np.array(lengths)[:, None]
    weights = np.random.RandomState(5).normal(size=tokens.shape).astype(np.float32) * mask

    def loss_fn(p):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, _ = Decoder(config).apply({"params": p}, tokens, positions, None, mask)
        logp, entropy = token_logprobs_from_logits(logits, jnp.asarray(tokens))
        return -(weights * logp).sum() - 0.1 * (weights * entropy).sum()

    grads = jax.jit(jax.grad(loss_fn))(params)
    save_hf(config, grads, str(tmp_path / "grads"))  # our gradients under transformers' names
    ours = load_file(str(tmp_path / "grads" / "model.safetensors"))

    logits = model(torch.tensor(tokens, dtype=torch.int64),
                   attention_mask=torch.tensor(mask.astype(np.int64))).logits[:, :-1]
    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, torch.tensor(tokens[:, 1:, None], dtype=torch.int64))[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    w = torch.tensor(weights[:, 1:])
    loss = -(w * logp).sum() - 0.1 * (w * entropy).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    ref = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    if config.tie_embeddings:
        assert "lm_head.weight" not in ours
    assert set(ours) == set(ref)
    for name, g in ref.items():
        assert np.abs(g).max() > 1e-3, name  # every tensor gets a gradient worth comparing
        np.testing.assert_allclose(ours[name], g, rtol=2e-4, atol=2e-4 * np.abs(g).max(),
                                   err_msg=name)


def test_causal_attention_by_blocks_matches_whole():
    """Causal attention a block of query rows at a time (the last block short) against the
    whole product, values and gradients, with right padding and a left-padded row whose first
    query rows see no key (their outputs are unspecified, an average of values that nothing
    reads, so they get no weight here)."""
    from zsjax.models.kernels import attention as _attention
    from zsjax.models.kernels import causal_attention as _causal_attention
    rng = np.random.RandomState(1)
    b, t, kvh, g, dh = 3, 21, 2, 2, 4
    q, k, v, w = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                  [(b, t, kvh, g, dh), (b, kvh, t, dh), (b, kvh, dh, t), (b, t, kvh, g, dh)])
    valid = np.ones((b, t), bool)
    valid[1, 15:] = False  # right padding
    valid[2, :4] = False  # left padding
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
    w = w * jnp.asarray(mask.any(-1))[:, :, None, None, None]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda *a: (fn(*a, mask) * w).sum(), (0, 1, 2)))

    whole = loss(_attention)(q, k, v)
    for block in (4, 8, 20):
        blocked = loss(lambda *a: _causal_attention(*a, block=block))(q, k, v)
        for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    seen = np.asarray(mask.any(-1))
    out = _causal_attention(q, k, v, mask, block=8)
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(_attention(q, k, v, mask))[seen],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_backward_matches_autodiff(dtype):
    """The attention's hand-written backward pass against autodiff of the textbook softmax
    attention, with a ragged mask that leaves some query rows no visible key (left padding).
    In bfloat16 both are compared with the float32 reference, under jit with the arrays as
    arguments (as a training step sees them)."""
    from zsjax.models.kernels import attention as _attention
    rng = np.random.RandomState(0)
    b, t, s, kvh, g, dh = 2, 5, 7, 2, 3, 4
    inputs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
              [(b, t, kvh, g, dh), (b, kvh, s, dh), (b, kvh, dh, s), (b, t, kvh, g, dh)]]
    mask = rng.rand(b, t, s) < 0.6
    mask[0, 1] = False  # a row that sees nothing

    def reference(q, k, v):
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores / np.sqrt(dh), jnp.finfo(jnp.float32).min)
        return jnp.einsum("bkgts,bkds->btkgd", jax.nn.softmax(scores, -1).astype(q.dtype), v)

    def ours(q, k, v):
        return _attention(q, k, v, jnp.asarray(mask))

    @jax.jit
    def out_and_grads(q, k, v, d_out):
        return [(y, vjp(d_out)) for y, vjp in (jax.vjp(f, q, k, v) for f in (ours, reference))]

    exact = out_and_grads(*inputs)[1]  # float32 autodiff
    results = out_and_grads(*[x.astype(dtype) for x in inputs])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=0, atol=0.1)
    for y, grads in results:
        np.testing.assert_allclose(np.asarray(y, np.float32), exact[0], **tol)
        for a, r in zip(grads, exact[1]):
            assert a.dtype == jnp.dtype(dtype) and float(jnp.abs(r).max()) > 0.1
            np.testing.assert_allclose(np.asarray(a, np.float32), r, **tol)


@pytest.mark.parametrize("w_transposed", [False, True])
def test_bfloat16_products_and_gradients_round_once(w_transposed):
    """The CPU projections in bfloat16 (`kernels.matmul`, which multiplies with a float32
    result and rounds once) and both gradient products, against float64: each result is within
    about one bfloat16 rounding of the exact value, as with float32 accumulation (a product
    accumulated in bfloat16 over K = 1536 terms misses by many roundings). Under jit, as a
    step runs them."""
    from zsjax.models.kernels import matmul as _matmul
    rng = np.random.RandomState(0)
    m, k, n = 24, 1536, 200
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(n, k) if w_transposed else (k, n)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    out, vjp = jax.jit(lambda a, b: jax.vjp(lambda a, b: _matmul(a, b, w_transposed), a, b))(x, w)
    dx, dw = jax.jit(vjp)(g)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    w64 = np.asarray(w, np.float64).T if w_transposed else np.asarray(w, np.float64)
    exact_dw = x64.T @ g64
    for got, exact in ((out, x64 @ w64), (dx, g64 @ w64.T),
                       (dw, exact_dw.T if w_transposed else exact_dw)):
        assert got.dtype == jnp.bfloat16 and got.shape == exact.shape
        # one rounding to bfloat16 (8 bits) is at most 2**-9 relative; allow 2 roundings
        np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact),
                                     2 ** -8 * np.abs(exact) + 1e-6 * np.abs(exact).max())


def test_kv_cache_decode_matches_full_forward(hf_model_dir):
    """Left-padded ragged prefill, then one token at a time, against transformers' logits."""
    path, model = hf_model_dir(**VARIANTS["qwen2-bias-untied"])
    config, params = load_hf(path)
    seqs = [list(_tokens(1, n, seed=n)[0]) for n in (12, 7)]
    prompt_len, steps = 12, 6
    batch = len(seqs)
    tokens = np.zeros((batch, prompt_len), np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for i, s in enumerate(seqs):  # left padding
        tokens[i, prompt_len - len(s):] = s
        mask[i, prompt_len - len(s):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model_fn = Decoder(config)
    apply = jax.jit(lambda p, t, pos, c, m: model_fn.apply({"params": p}, t, pos, c, m))
    cache = init_cache(config, batch, prompt_len + steps)
    logits, cache = apply(params, tokens, positions, cache, mask)
    rng = np.random.RandomState(3)
    full = [list(s) for s in seqs]
    last = np.asarray(logits[:, -1])
    for step in range(steps):
        for i, s in enumerate(full):
            ref = torch_logits(model, [s])[0, -1]
            np.testing.assert_allclose(last[i], ref, atol=1e-4, rtol=0)
        nxt = rng.randint(0, 257, (batch, 1))
        for i in range(batch):
            full[i].append(int(nxt[i, 0]))
        pos = np.array([[len(s) - 1] for s in full])
        logits, cache = apply(params, nxt, pos, cache, np.ones((batch, 1), bool))
        last = np.asarray(logits[:, -1])
    assert int(cache.index) == prompt_len + steps


def test_round_trip_through_save_hf(hf_model_dir, tmp_path):
    import transformers
    for variant in ("qwen2-bias-tied", "llama3rope-untied", "qwen3-qknorm-tied",
                    "llama-gelu-tanh-untied"):
        path, model = hf_model_dir(**VARIANTS[variant])
        config, params = load_hf(path)
        out = tmp_path / variant
        save_hf(config, params, str(out))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
        assert type(reloaded) is type(model)
        tokens = _tokens(2, 50)
        np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens),
                                   atol=1e-6, rtol=0)
        config2, params2 = load_hf(str(out))
        assert config2 == config
        jax.tree.map(np.testing.assert_array_equal, params2, params)
        # a transformers-4 reader sees only the older keys (rope_theta, rope_scaling with
        # `type`, torch_dtype): they alone must describe the same model
        from zsjax.models.config import from_hf_dict
        legacy = json.load(open(out / "config.json"))
        del legacy["rope_parameters"], legacy["dtype"]
        assert from_hf_dict(legacy) == config
        assert legacy["torch_dtype"] == "float32" and legacy["rope_theta"] == config.rope_theta
        assert ("rope_scaling" in legacy) == (config.rope_scaling is not None)


def test_sharded_checkpoint_and_sharded_export(hf_model_dir, tmp_path):
    path, model = hf_model_dir(family="llama", tied=False, rope=LLAMA3_ROPE,
                               max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    config, params = load_hf(path)
    tokens = _tokens(2, 30)
    np.testing.assert_allclose(np.asarray(forward(config, params, tokens)),
                               torch_logits(model, tokens), atol=1e-4, rtol=0)
    # exported over an earlier single-file export of other params (a fine-tune written back
    # into its base model's folder): the stale model.safetensors must go, or transformers,
    # which reads it before the index, would load the old params
    save_hf(config, jax.tree.map(lambda x: 1.5 * x, params), str(tmp_path))
    save_hf(config, params, str(tmp_path), max_shard_bytes=60_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    weights = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert weights == sorted(set(index["weight_map"].values()))
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32")
    np.testing.assert_allclose(torch_logits(reloaded.eval(), tokens), torch_logits(model, tokens),
                               atol=1e-6, rtol=0)
    save_hf(config, params, str(tmp_path))  # and back to one file: the shards and index go
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_legacy_config_style(hf_model_dir, tmp_path):
    """Older folders: top-level rope_theta and rope_scaling (with `type` instead of rope_type)."""
    path, model = hf_model_dir(**VARIANTS["llama3rope-untied"])
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.load(open(legacy / "config.json"))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    json.dump(cfg, open(legacy / "config.json", "w"))
    config, params = load_hf(str(legacy))
    assert config.rope_theta == 500000.0 and config.rope_scaling.rope_type == "llama3"
    tokens = _tokens(1, 200)
    np.testing.assert_allclose(np.asarray(forward(config, params, tokens)),
                               torch_logits(model, tokens), atol=1e-4, rtol=0)


def test_bfloat16_params_and_compute(hf_model_dir):
    path, model = hf_model_dir(**VARIANTS["qwen2-bias-untied"])
    config, params = load_hf(path, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = _tokens(2, 40)
    ours = np.asarray(forward(config, params, tokens))
    assert ours.dtype == np.float32
    ref = torch_logits(model, tokens)
    err = np.abs(ours - ref).max()
    # bfloat16 has 8 mantissa bits: expect ~1e-2 relative error, not 1e-4, but no blow-up.
    assert err < 0.05 * np.abs(ref).max(), err
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # and the same folder exported in bfloat16 reloads bit-exactly
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_hf(config, params, d)
        config2, params2 = load_hf(d, dtype="bfloat16")
        jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_every_activation_a_config_accepts_is_one_the_decoder_has():
    from zsjax.models import config as C
    from zsjax.models import decoder as D
    assert set(C.ACTIVATIONS) == set(D.ACTIVATIONS)
