"""LoRA in training (`policy.lora` in zsjax.train, `model.lora` in zsjax.sft): only adapters move
and are checkpointed, a run killed after a checkpoint resumes to bit-identical adapters, and the
exports (a merged Hugging Face folder, a PEFT adapter folder) agree with transformers + peft."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import sft_simulator, tiny
from zsjax import sft, train
from zsjax.checkpointing import Checkpointer
from zsjax.data import tiny_fixture
from zsjax.errors import InputError
from zsjax.models import forward, load_hf
from zsjax.models import lora

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _lines(path):
    return [json.loads(x) for x in open(path)]


def _lora_config(steps=3, dropout=0.0):
    c = tiny.get_config()
    c.unlock()
    c.policy.lora.update(rank=4, alpha=8.0, dropout=dropout)
    c.train.update(steps=steps, checkpoint_every=1)
    c.rl.lr = 1e-2  # large enough that 3 steps move the adapters visibly
    c.lock()
    return c


def _peft_logits(base_dir, adapter_dir, ids):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora") / "run")
    history = train.run(_lora_config(), workdir)
    return workdir, history


@pytest.mark.slow
def test_rl_with_lora_trains_and_checkpoints_the_adapters_only(lora_run):
    workdir, history = lora_run
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["kl"]) for h in history)  # against the base (kl_coef > 0)
    base_dir = tiny_fixture.fixture_paths(os.path.join(workdir, "fixture"))["policy"]
    config, base = load_hf(base_dir)
    _, merged = load_hf(os.path.join(workdir, "policy_hf"))
    adapters = load_file(os.path.join(workdir, "policy_peft", "adapter_model.safetensors"))
    n_targets = len(lora.target_paths(base, lora.LoraConfig()))
    assert len(adapters) == 2 * n_targets
    assert any(np.abs(v).max() > 0 for k, v in adapters.items() if "lora_B" in k)

    # Only adapted kernels changed, each by exactly (alpha / rank) A @ B.
    def flat(tree):
        return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    flat_base, flat_merged = flat(base), flat(merged)
    changed = [k for k in flat_base if not np.array_equal(flat_base[k], flat_merged[k])]
    assert changed and all(k.endswith("['kernel']") and "embed" not in k for k in changed)
    assert "['embed']['embedding']" in flat_base
    assert np.array_equal(flat_base["['embed']['embedding']"],
                          flat_merged["['embed']['embedding']"])

    # The checkpoint holds the adapters and their optimizer state, not the base.
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = ckpt.restore_raw(3)["state"][0]
    assert set(saved["params"]) == set(lora.target_paths(base, lora.LoraConfig()))
    saved_size = sum(np.asarray(x).size for x in jax.tree.leaves(saved))
    base_size = sum(np.asarray(x).size for x in jax.tree.leaves(base))
    assert saved_size < 0.5 * base_size, (saved_size, base_size)
    assert ckpt.restore_meta(3)["lora"] == {"rank": 4, "alpha": 8.0,
                                            "targets": lora.DEFAULT_TARGETS}

    # The PEFT folder on the base, in transformers + peft, is the merged export.
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    theirs = _peft_logits(base_dir, os.path.join(workdir, "policy_peft"), ids)
    ours = np.asarray(forward(config, merged, ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(forward(config, base, ids))).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["merged", "dropout"])
def test_rl_with_lora_resumes_to_bit_identical_adapters(lora_run, tmp_path, dropout):
    """A run killed after step 2's checkpoint (its step-3 checkpoint and exports removed) and
    resumed ends with the uninterrupted run's adapters, bit for bit, and its rewards; with LoRA
    dropout too (its masks are drawn again, the same)."""
    if dropout:
        reference = str(tmp_path / "reference")
        train.run(_lora_config(dropout=dropout), reference)
    else:
        reference, _ = lora_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for name in ("checkpoints/3", "policy_hf", "policy_peft"):
        shutil.rmtree(os.path.join(workdir, name))
    history = train.run(_lora_config(dropout=dropout), workdir)
    assert [h["step"] for h in history] == [3]
    want = load_file(os.path.join(reference, "policy_peft", "adapter_model.safetensors"))
    got = load_file(os.path.join(workdir, "policy_peft", "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    assert ([r["reward_mean"] for r in _lines(os.path.join(workdir, "metrics.jsonl"))]
            == [r["reward_mean"] for r in _lines(os.path.join(reference, "metrics.jsonl"))])


@pytest.mark.slow
def test_lora_settings_errors(lora_run, tmp_path):
    reference, _ = lora_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "policy_hf"))
    c = _lora_config(steps=4)
    c.unlock()
    c.policy.lora.rank = 0
    with pytest.raises(InputError, match="written with LoRA rank 4.*this run is without LoRA"):
        train.run(c, workdir)
    for key, value, match in (("dropout", 1.0, r"dropout must be in \[0, 1\)"),
                              ("targets", "no_such_kernel", "matches no kernel"),
                              ("targets", "(", "not a regular expression")):
        c = _lora_config()
        c.unlock()
        c.policy.lora[key] = value
        with pytest.raises(InputError, match=match):
            train.run(c, str(tmp_path / f"{key}{len(str(value))}"))
    c = _lora_config()
    c.unlock()
    c.rl.freeze = "embed"
    with pytest.raises(InputError, match="rl.freeze.*policy.lora"):
        train.run(c, str(tmp_path / "freeze"))


def test_sft_with_lora_exports_merged_and_peft(tmp_path):
    fx = tiny_fixture.make(str(tmp_path / "fixture"), seed=0)
    rows = tmp_path / "pairs.jsonl"
    with open(rows, "w") as f:
        for i in range(8):
            f.write(json.dumps({"query": f"Zorland {i}", "question": "Where?",
                                "golden_answers": ["Vex"], "label": "useful",
                                "documents": f"Doc 1: Zorland {i} is in Vex."}) + "\n")
    c = sft_simulator.get_config(fx["simulator"])
    c.unlock()
    c.data.update(path=str(rows), max_length=128, use_chat_template="no", length_multiple=16)
    c.train.update(steps=3, batch_size=4, lr=1e-2, log_every=0, checkpoint_every=1)
    c.model.lora.update(rank=2, alpha=4.0)
    c.mesh.data = 1
    workdir = str(tmp_path / "sft")
    sft.run(c, workdir)
    config, base = load_hf(fx["simulator"])
    _, merged = load_hf(os.path.join(workdir, "simulator_hf"))
    saved = Checkpointer(os.path.join(workdir, "checkpoints")).restore_raw(3)["state"]
    assert set(saved["params"]) == set(lora.target_paths(base, lora.LoraConfig()))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    theirs = _peft_logits(fx["simulator"], os.path.join(workdir, "simulator_peft"), ids)
    ours = np.asarray(forward(config, merged, ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(forward(config, base, ids))).max() > 1e-3
