"""Sharded load and forward on 8 fake CPU devices (data=2, fsdp=2, tensor=2)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zsjax import sharding
from zsjax.models import forward, init_params, load_hf, param_shardings


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])


def test_sharded_load_and_forward_match_single_device(hf_model_dir, mesh):
    path, _ = hf_model_dir(family="qwen2", tied=False)
    config, params = load_hf(path)
    _, sharded = load_hf(path, mesh=mesh)

    layer = sharded["layers_0"]
    # The params really are sharded, the way the rules say.
    expect = {
        ("attn", "q_proj", "kernel"): (P("fsdp", "tensor", None), (32, 2, 16)),
        ("attn", "k_proj", "kernel"): (P("fsdp", "tensor", None), (32, 1, 16)),
        ("attn", "q_proj", "bias"): (P("tensor", None), (2, 16)),
        ("attn", "o_proj", "kernel"): (P("tensor", None, "fsdp"), (2, 16, 32)),
        ("mlp", "gate_proj", "kernel"): (P("fsdp", "tensor"), (32, 64)),
        ("mlp", "down_proj", "kernel"): (P("tensor", "fsdp"), (64, 32)),
        ("attn_norm", "scale"): (P(None), (64,)),
    }
    for path_, (spec, shard) in expect.items():
        x = layer
        for k in path_:
            x = x[k]
        assert x.sharding.spec == spec, (path_, x.sharding.spec)
        assert sharding.shard_shape(x) == shard, path_
        assert len(x.sharding.device_set) == 8
    # vocab 257 is odd: it cannot be split over tensor=2, so only the embed dim is sharded.
    assert sharded["embed"]["embedding"].sharding.spec == P(None, "fsdp")
    assert sharded["lm_head"]["kernel"].sharding.spec == P("fsdp", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, sharded)

    tokens = np.random.RandomState(0).randint(0, 257, (4, 24))
    mask = np.arange(24)[None] < np.array([24, 10, 17, 3])[:, None]
    ref = np.asarray(forward(config, params, tokens, attention_mask=mask))
    out = forward(config, sharded, tokens, attention_mask=mask)
    assert out.sharding.spec[0] == ("data", "fsdp")  # batch split over data x fsdp
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_init_params_on_mesh(mesh):
    from zsjax.models import ModelConfig
    config = ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=64)
    params = init_params(config, jax.random.key(0), mesh=mesh)
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert sharding.shard_shape(params["embed"]["embedding"]) == (64, 16)
    shardings = param_shardings(config, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 params, shardings)


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=4, fsdp=4, tensor=1, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    # -1 takes the rest: none is left for it on 1 device with fsdp=4, 6 do not split by 4
    for n in (1, 6):
        with pytest.raises(ValueError, match=f"the rest of {n} devices, which the other axes' 4"):
            sharding.make_mesh(data=-1, fsdp=4, devices=jax.devices()[:n])


def test_rules_from_a_config_file(mesh):
    """Rules as nested lists (the form an ml-collections config holds) work and are validated."""
    from configs import model as model_config
    rules = model_config.get_config("").rules
    assert sharding.as_rules(rules) == sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp",
                                                                                     "tensor")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.as_rules([["embed", "model"]])
