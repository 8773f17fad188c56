"""The benchmark suite's plumbing (`benchmarks/run.py`): one small benchmark end to end and its
report files (slow: it runs PyTorch and JAX steps), the rollout benchmark's bound, the decode
profiler's attribution of traced op times, and the attention benchmark on a tiny shape."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_suite_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only",
                           "update_small", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    assert report["quick"] and report["ceilings"]["matmul_gflop_s"] > 0
    result = report["results"]["update_small"]["result"]
    assert result["zsjax_step_s"] > 0 and result["torch_step_s"] > 0
    # the two implementations compute the same loss on the same batch
    assert result["policy_loss_zsjax"] == pytest.approx(result["policy_loss_torch"], abs=1e-4)
    md = open(out / "report.md").read()
    assert "## update_small" in md and "MFU" in md


def test_tunix_peer_is_skipped_where_tunix_is_not_installed(tmp_path):
    """Tunix lives in an environment of its own (benchmarks/tunix_peer.py): without it the
    suite reports the peer benchmark as skipped and still succeeds."""
    if importlib.util.find_spec("tunix") is not None:
        pytest.skip("Tunix is installed here")
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "ZSJAX_TUNIX_PYTHON"}
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only", "tunix",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    assert "Tunix is not installed" in report["results"]["tunix"]["skipped"]
    assert "skipped: Tunix is not installed" in open(out / "report.md").read()


def test_rollout_bound_by_hand():
    bench = _load("rollout")
    config = SimpleNamespace(num_params=lambda: 1000, n_layers=2, n_kv_heads=1, head_dim=4)
    bound = bench.Bound(config, flops_s=1e6, bytes_s=1e5)
    # two rows: 3 and 5 new tokens on contexts of 10 and 20; they generate 2 and 1 tokens
    bound.add([3, 5], [10, 20], [2, 1])
    kv = 2 * 2 * 1 * 4 * 4  # bytes per cached token: k and v, layers, heads, head_dim, fp32
    prefill = 2 * 1000 * 8 / 1e6
    step0 = max(2 * 1000 * 2 / 1e6, (4000 + kv * (10 + 20)) / 1e5)
    step1 = max(2 * 1000 * 1 / 1e6, (4000 + kv * 11) / 1e5)  # only the first row is left
    assert bound.seconds == pytest.approx(prefill + step0 + step1)


def test_profile_rows_group_loop_ops_per_step_by_shape_and_kind():
    prof = _load("profile_decode")
    hlo = ("\n  %dot.1 = f32[32,1536]{1,0} dot(%a, %b)\n  %dot.2 = f32[32,1536]{1,0} dot(%c, %d)"
           "\n  %fusion.7 = f32[32]{0} fusion(%e), kind=kLoop\n"
           "  %fusion.9 = s32[32]{0} fusion(%e), kind=kLoop\n"
           "  ROOT %reduce.4 = (f32[32]{0}, s32[32]{0}) reduce(%a, %b)\n"
           "  %dot.3 = f32[1536,576]{1,0} dot(%f, %g)\n")
    events = []
    for _ in range(4):  # a 4-step loop: two gate-like dots and a fusion per step
        events += [{"ph": "X", "dur": 100, "args": {"hlo_op": "dot.1", "hlo_module": "jit__g"}},
                   {"ph": "X", "dur": 300, "args": {"hlo_op": "dot.2", "hlo_module": "jit__g"}},
                   {"ph": "X", "dur": 50, "args": {"hlo_op": "fusion.7", "hlo_module": "jit__g"}}]
        events += [{"ph": "X", "dur": 10, "args": {"hlo_op": "fusion.9", "hlo_module": "jit__g"}}
                   ] * 3  # a nested loop: 3 times a step
        events += [{"ph": "X", "dur": 20, "args": {"hlo_op": "reduce.4", "hlo_module": "jit__g"}}]
    events += [{"ph": "X", "dur": 9000, "args": {"hlo_op": "dot.3", "hlo_module": "jit__g"}},
               {"ph": "X", "dur": 7, "args": {"hlo_op": "dot.1", "hlo_module": "jit__other"}},
               {"ph": "X", "dur": 5, "name": "no args"}]
    total, count = prof.op_times(events, "jit__g")
    assert total["dot.1"] == 400 and count["dot.2"] == 4 and count["dot.3"] == 1
    rows = prof.per_step_rows(total, count, hlo, steps=4)
    # dot.3 ran once (prefill): not a loop op; dot.1 and dot.2 share a shape and kind
    assert rows == [{"shape": "f32[32,1536]", "op": "dot", "ms_per_step": 0.4, "n_ops": 2},
                    {"shape": "f32[32]", "op": "fusion", "ms_per_step": 0.05, "n_ops": 1},
                    {"shape": "s32[32]", "op": "fusion", "ms_per_step": 0.03, "n_ops": 1},
                    {"shape": "(f32[32], s32[32])", "op": "reduce", "ms_per_step": 0.02,
                     "n_ops": 1}]


def test_weight_stream_times_the_chained_product_numpy_computes():
    bench = _load("weight_stream")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    ws = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3)]
    want = x
    for w in ws:
        want = np.tanh(want @ w)[:, :4]
    np.testing.assert_allclose(np.asarray(bench.chain(x, ws)), want, rtol=1e-5, atol=1e-6)
    row = bench.measure(rows=2, layers=8, k=64, n=512, repeats=1, inner=1)
    # 8 float32 [64, 512] matrices, each applied once to 2 rows
    assert row["weight_bytes"] == 8 * 64 * 512 * 4 and row["weight_mb"] == 1.0
    assert row["flops"] == 8 * 2 * 2 * 64 * 512
    t = row["seconds"]
    assert min(t.values()) > 0
    assert row["chained_over_read"] == round(t["read"] / t["chained"], 2)
    assert row["chained_gb_s"] == round(8 * 64 * 512 * 4 / t["chained"] / 1e9, 1)
    with pytest.raises(ValueError, match="--n"):
        bench.measure(rows=2, layers=1, k=16, n=8)


def test_attention_benchmark_runs_and_blocks_agree():
    proc = subprocess.run([sys.executable, "benchmarks/attention.py", "--batch", "2", "--length",
                           "24", "--kv-heads", "2", "--group", "2", "--head-dim", "8",
                           "--layers", "1", "--blocks", "8", "32", "--no-reference"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["attention"] for r in rows] == ["whole", "8-row blocks"]  # 32 >= T: skipped
    assert rows[1]["max_rel_diff"] < 1e-5 and rows[0]["ms"] > 0


def test_lora_benchmark_variants_run_on_a_tiny_model(tmp_path):
    """benchmarks/lora.py's variants end to end on the tiny fixture's policy: both LoRA passes
    compute the same loss, train far fewer params than full fine-tuning and checkpoint less."""
    from zsjax.data import tiny_fixture
    model = tiny_fixture.make(str(tmp_path / "fixture"))["policy"]
    bench = _load("lora")
    kwargs = dict(rank=2, batch=2, length=32, dtype="float32", steps=1, decode_batch=1,
                  new_tokens=4)
    rows = {name: bench.variant(model, name, **kwargs) for name in bench.VARIANTS}
    assert rows["lora"]["policy_loss"] == pytest.approx(rows["lora_unmerged"]["policy_loss"],
                                                        abs=1e-5)
    assert rows["lora"]["trained_params"] < rows["full"]["trained_params"] / 5
    assert rows["lora"]["checkpoint_mb"] < rows["full"]["checkpoint_mb"]
    assert 0 < rows["lora"]["merge_s"] and 0 < rows["lora"]["decode_s"]


def test_random_model_has_the_named_shape_and_loads_in_transformers(tmp_path):
    """benchmarks/random_model.py: the real model's config.json values (smoke: the family and
    flags, small widths), readable by transformers, with a chat template that applies."""
    import transformers
    bench = _load("random_model")
    path = bench.write(str(tmp_path / "qwen"), "qwen2.5-1.5b", smoke=True)
    hf = transformers.AutoConfig.from_pretrained(path)
    assert hf.architectures == ["Qwen2ForCausalLM"] and hf.tie_word_embeddings
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == 1e6 and hf.num_key_value_heads == 2 and hf.hidden_size == 64
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) < hf.vocab_size
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    full = bench.SHAPES["qwen2.5-1.5b"]  # Qwen2.5-1.5B's published config.json
    assert (full["d_model"], full["n_layers"], full["d_ff"], full["vocab_size"]) == (
        1536, 28, 8960, 151936)


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu.sh --cpu`: every benchmark of the GPU suite, on tiny shapes, writes
    its report, so a lent device's minutes are not spent on a broken script."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    names = {"decode_smollm2", "decode_qwen1.5b", "rollout_smollm2", "update_smollm2",
             "update_qwen1.5b"}
    assert set(report["results"]) == names
    assert all("result" in r for r in report["results"].values()), report["results"]
    rollout = {r["mode"] for r in report["results"]["rollout_smollm2"]["result"]["rows"]}
    assert rollout == {"kv_reuse", "re_prefill"}
    assert "GPU suite, smoke" in open(out / "report.md").read()
