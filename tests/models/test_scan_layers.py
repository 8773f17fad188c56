"""`ModelConfig.scan_layers`: the layers as one scan over stacked params compute what the
unrolled loop computes (logits, gradients with and without remat, sampled tokens over two
turns of a shrinking batch), and the layouts convert both ways through Hugging Face folders."""

import dataclasses
import filecmp
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax.models import ModelConfig, forward, init_params, load_hf, save_hf
from zsjax.models.decoder import Decoder, stack_layers, unstack_layers
from zsjax.sampling import continue_generate, generate

FAMILIES = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


def _pair(family="qwen2", n_layers=3):
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                         head_dim=16, d_ff=128, family=family, tie_embeddings=family != "llama",
                         **FAMILIES[family])
    params = init_params(config, jax.random.key(0))
    return config, params, dataclasses.replace(config, scan_layers=True), stack_layers(
        params, n_layers)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_logits_equal_the_unrolled_ones(family):
    config, params, scanned, stacked = _pair(family)
    tokens = np.random.default_rng(0).integers(0, 256, (3, 20))
    mask = np.ones((3, 20), bool)
    mask[1, 15:] = False  # right padding
    np.testing.assert_allclose(forward(scanned, stacked, tokens, attention_mask=mask),
                               forward(config, params, tokens, attention_mask=mask), atol=2e-6)


def test_scanned_params_have_the_unrolled_ones_stacked():
    config, params, scanned, stacked = _pair()
    fresh = init_params(scanned, jax.random.key(1))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 64, 4, 16)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_gradients_equal_the_unrolled_ones(remat):
    config, params, scanned, stacked = _pair()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)))
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)

    def loss(cfg, p):
        logits, _ = Decoder(cfg, remat=remat).apply({"params": p}, tokens, positions)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    l_unrolled, g_unrolled = jax.value_and_grad(lambda p: loss(config, p))(params)
    l_scanned, g_scanned = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
    np.testing.assert_allclose(l_scanned, l_unrolled, rtol=1e-6)
    want = stack_layers(g_unrolled, config.n_layers)
    for path, a in jax.tree_util.tree_leaves_with_path(g_scanned):
        b = want
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scanned_decode_samples_the_same_tokens_over_two_turns():
    """A ragged batch whose rows finish apart (the batch shrinks), then a second turn on the
    moved rows' caches: tokens and logprobs as the unrolled decoder gives them."""
    config, params, scanned, stacked = _pair()
    prompts = [list(range(1 + i % 5, 4 + i % 7 + i % 5)) for i in range(12)]
    kw = dict(max_new_tokens=20, temperature=1.0, eos_token_ids=list(range(0, 256, 7)), seed=3,
              shrink_above=4)
    first, s_unrolled = continue_generate(config, params, prompts, session=None, **kw)
    first_s, s_scanned = continue_generate(scanned, stacked, prompts, session=None, **kw)
    lengths = [len(t) for t in first.tokens]
    assert min(lengths) < 8 and max(lengths) > 12, lengths  # the rows finish apart
    assert first_s.tokens == first.tokens
    assert s_scanned.cache.k[0].shape[0] == 3  # one stacked array: [L, B, KVH, S, Dh]
    chunk = [[40, 41, 42]] * len(prompts)
    second, _ = continue_generate(config, params, chunk, session=s_unrolled, **dict(kw, seed=4))
    second_s, _ = continue_generate(scanned, stacked, chunk, session=s_scanned,
                                    **dict(kw, seed=4))
    assert second_s.tokens == second.tokens
    for a, b in zip(second_s.logprobs, second.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    greedy = dict(max_new_tokens=8, eos_token_ids=[])
    assert generate(scanned, stacked, prompts[:3], **greedy).tokens == \
        generate(config, params, prompts[:3], **greedy).tokens


def test_load_and_save_convert_between_layouts(tmp_path):
    config, params, _, _ = _pair("llama")
    save_hf(config, params, str(tmp_path / "unrolled"))
    scanned, stacked = load_hf(str(tmp_path / "unrolled"), scan_layers=True)
    assert scanned.scan_layers and "layers" in stacked and "layers_0" not in stacked
    save_hf(scanned, stacked, str(tmp_path / "scanned"))
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tmp_path / "unrolled" / name, tmp_path / "scanned" / name,
                           shallow=False), name
    assert "scan_layers" not in open(os.path.join(tmp_path, "scanned", "config.json")).read()
