"""Each way a checkpoint folder can be wrong gives an error naming the file and the tensor."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from zsjax.models import CheckpointError, ConfigError, load_hf
from zsjax.models.safetensors_io import SafetensorsError


@pytest.fixture
def folder(hf_model_dir, tmp_path):
    src, _ = hf_model_dir(family="qwen2", tied=False)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.load(open(folder / "config.json"))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(folder / "config.json", "w"))


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))


def test_missing_config(folder):
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json.*Hugging Face model folder"):
        load_hf(str(folder))


def test_unsupported_architecture(folder):
    _edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json: architecture.*GPT2LMHeadModel.*"
                                          r"not supported.*Qwen2ForCausalLM"):
        load_hf(str(folder))


def test_qwen3_moe_is_a_clear_error(folder):
    _edit_config(folder, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    with pytest.raises(ConfigError, match="Qwen3-MoE .* is not supported.*dense Qwen3"):
        load_hf(str(folder))


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope type 'yarn' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    # gelu and gelu_pytorch_tanh are supported (test_parity.py); an unknown one is not
    ({"hidden_act": "xielu"}, "hidden_act='xielu'; zsjax supports silu, gelu"),
    ({"num_hidden_layers": None}, "missing required field 'num_hidden_layers'"),
])
def test_unsupported_config_fields(folder, change, message):
    _edit_config(folder, **change)
    with pytest.raises(ConfigError, match=message):
        load_hf(str(folder))


def test_no_weights(folder):
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        load_hf(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert them with transformers"):
        load_hf(str(folder))


def test_missing_shard_file(hf_model_dir, tmp_path):
    src, _ = hf_model_dir(family="qwen2", tied=True, max_shard_size="40KB")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    index = json.load(open(dst / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(dst / victim)
    with pytest.raises(FileNotFoundError, match=rf"lists shard {victim}.*does not exist"):
        load_hf(str(dst))


def test_shape_mismatch_names_file_and_tensor(folder):
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                              r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        load_hf(str(folder))


def test_vocab_mismatch(folder):
    _edit_config(folder, vocab_size=300)
    with pytest.raises(CheckpointError, match=r"'(model\.embed_tokens|lm_head)\.weight'.*vocab mismatch: "
                                              r"config\.json vocab_size=300, the checkpoint has "
                                              r"257 rows"):
        load_hf(str(folder))


def test_unexpected_tensor(folder):
    _edit_tensors(folder, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.extra\.weight' has no entry in the "
                                              r"qwen2 mapping table"):
        load_hf(str(folder))


def test_missing_tensor(folder):
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*"
                                              r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(str(folder))


def test_bias_in_checkpoint_but_not_in_config(hf_model_dir, tmp_path):
    src, _ = hf_model_dir(family="llama", tied=False, bias=True)
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    _edit_config(dst, attention_bias=False)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.\w_proj\.bias' "
                                              r"exists but config\.json implies"):
        load_hf(str(dst))


def test_corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: header is not valid JSON"):
        load_hf(str(folder))
