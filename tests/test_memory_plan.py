"""`zsjax.tools.memory_plan`: its parameter and LoRA-adapter counts against transformers + peft
on a small model of the same shape family, and the LoRA plan's totals."""

import pytest

from zsjax.tools import memory_plan as M

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab=512, d=64, ff=160, layers=3, heads=4, kv=2, hd=24)  # hd != d / heads


def _hf_model():
    config = transformers.Qwen2Config(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d"], intermediate_size=SHAPE["ff"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv"], head_dim=SHAPE["hd"], tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_counts_equal_transformers_and_peft():
    model = _hf_model()
    assert M.n_params(SHAPE) == sum(p.numel() for p in model.parameters())
    kernels = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert M.n_adapted(SHAPE) == sum(p.numel() for n, p in model.named_parameters()
                                     if any(k in n for k in kernels) and n.endswith("weight"))
    lora_model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=kernels))
    trained = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert M.n_lora(SHAPE, 16) == trained


def test_lora_plan_is_smaller_and_keeps_no_reference(capsys):
    full = M.plan("h100", devices=8, per_process=8, train_shards=8, rollout_tensor=4,
                  sim_tensor=4)
    lora = M.plan("h100", devices=8, per_process=8, train_shards=8, rollout_tensor=4,
                  sim_tensor=4, lora_rank=16)
    out = capsys.readouterr().out
    assert lora < full - 5
    assert out.count("reference params, bf16") == 1  # the full plan's; LoRA's is the base
    M.main(["--lora-rank", "16"])
    assert "LoRA adapters (rank 16" in capsys.readouterr().out
