"""LoRA adapters (zsjax/models/lora.py) against transformers + peft on the same adapter weights:
logits through the exported PEFT folder, and gradients through torch autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax.models import forward, load_hf
from zsjax.models import lora
from zsjax.models.decoder import Decoder
from zsjax.rl.logprobs import positions

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def _random_adapters(params, config, seed=0):
    """Adapters with A and B both random (a fresh B is zero and would test nothing)."""
    adapters = lora.init(params, config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {p: {"a": ad["a"], "b": jnp.asarray(rng.normal(0, 0.05, ad["b"].shape), jnp.float32)}
            for p, ad in adapters.items()}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, hf_model_dir, tmp_path_factory):
    path, _ = hf_model_dir(request.param, tied=False)
    config, params = load_hf(path)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(params, lcfg)
    adapter_dir = str(tmp_path_factory.mktemp(f"peft_{request.param}"))
    lora.save_peft(adapters, lcfg, adapter_dir, base_model=path)
    import transformers
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    return config, params, lcfg, adapters, model


def test_targets_and_a_fresh_adapter_changes_nothing(hf_model_dir):
    config, params = load_hf(hf_model_dir("llama", tied=False)[0])
    lcfg = lora.LoraConfig(rank=2)
    paths = lora.target_paths(params, lcfg)
    assert len(paths) == 7 * config.n_layers
    assert all(p.endswith("/kernel") and "norm" not in p for p in paths)
    merged = lora.merge(params, lora.init(params, lcfg, jax.random.key(0)), lcfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(merged)))
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.target_paths(params, lora.LoraConfig(targets="no_such"))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)


def test_merged_logits_equal_peft(tiny):
    config, params, lcfg, adapters, model = tiny
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24))
    ours = np.asarray(forward(config, lora.merge(params, adapters, lcfg), ids))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    base = np.asarray(forward(config, params, ids))
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def _logits(config, params, adapters, lcfg, ids, merged: bool):
    """Logits through `lora.apply` (what training differentiates): the merged weights, or
    un-merged projections."""
    mask = jnp.ones(ids.shape, bool)
    lp = lora.LoraParams(params, adapters, lcfg.scale, unmerged=not merged)
    logits, _ = lora.apply(Decoder(config), lp, jnp.asarray(ids), positions(mask), None, mask)
    return logits


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_training_forward_equals_peft(tiny, merged):
    config, params, lcfg, adapters, model = tiny
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 24))
    ours = np.asarray(_logits(config, params, adapters, lcfg, ids, merged))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_gradients_equal_torch_autograd(tiny, merged):
    """d loss / d (A, B) through the training forward (`lora.apply`: the merged weights, or
    un-merged projections), against torch autograd on PEFT's lora_A / lora_B (mapped with the
    export's own reshapes)."""
    config, params, lcfg, adapters, model = tiny
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, (2, 16))
    weights = rng.normal(size=(2, 16, config.vocab_size)).astype(np.float32)

    def loss(ad):
        logits = _logits(config, params, ad, lcfg, ids, merged)
        return jnp.sum(jax.nn.log_softmax(logits, -1) * weights) / ids.size
    grads = jax.grad(loss)(adapters)
    ours = lora.peft_state(grads, lcfg)

    for name, p in model.named_parameters():  # loaded for inference: make the adapters train
        p.requires_grad_("lora_" in name)
    model.zero_grad()
    logits = model(torch.tensor(ids)).logits
    (torch.log_softmax(logits, -1) * torch.tensor(weights)).sum().div(ids.size).backward()
    theirs = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight")
            theirs[key] = p.grad.numpy()
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=2e-5, rtol=1e-3, err_msg=key)


def test_dropout_drops_the_adapter_input_and_averages_to_no_dropout():
    """LoRA dropout on one Dense layer: each draw differs from the no-dropout output only in the
    adapter's term, the same tokens and key give the same draw, and the mean over many keys is
    the no-dropout output (inverted dropout keeps the expectation)."""
    import flax.linen as nn
    layer = nn.Dense(6, use_bias=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    adapters = {"kernel": {"a": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
                           "b": jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)}}
    want = np.asarray(x @ (params["kernel"] + 0.5 * adapters["kernel"]["a"]
                           @ adapters["kernel"]["b"]))

    def run(key, p=0.3):
        lp = lora.LoraParams(params, adapters, 0.5, dropout=p, dropout_seed=key)
        return np.asarray(lora.apply(layer, lp, x))
    np.testing.assert_allclose(run(0, p=0.0), want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(run(7), run(7)) and not np.allclose(run(7), want)
    base = np.asarray(x @ params["kernel"])
    for key in range(3):  # the base's term is untouched: the difference is rank-2 at most
        assert 1 <= np.linalg.matrix_rank(run(key) - base, tol=1e-4) <= 2
    assert not np.array_equal(run(1), run(2))  # another key, another mask
    mean = np.mean([run(k) for k in range(2000)], axis=0)
    np.testing.assert_allclose(mean, want, atol=0.1 * np.abs(want).max())
