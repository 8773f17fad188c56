"""Decode throughput: zsjax.sampling.generate vs transformers' generate, side by side, one run.

    python benchmarks/decode.py [--model DIR] [--batches 1 8 32] [--new-tokens 64]
                                [--dtype float32|bfloat16] [--out FILE]

Same SmolLM2-135M-Instruct weights, same chat prompts, greedy, EOS disabled so every row makes
exactly --new-tokens tokens; --dtype sets both sides' weights and compute (default float32).
zsjax's first call (compile + run) is reported apart from the timed calls. The same run
measures this machine's matmul rate and memory bandwidth and derives the roofline bound of a
decode step: max(FLOPs / matmul rate, bytes read / bandwidth).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name three colours.",
             "Explain photosynthesis in one sentence.", "What is 12 times 7?",
             "Give me a synonym for happy.", "Where is Mount Everest?", "What do bees make?"]


def _best(fn, repeats=5) -> float:
    """The fastest of `repeats` timed calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_rate(n=None, dtype="float32") -> float:
    """Matmul FLOP/s of the default device (an n x n x n product; in bfloat16, with a float32
    result, as the model's CPU products run)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)  # 2048 underfills a GPU
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: jax.lax.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / _best(lambda: f(x).block_until_ready())


def ceilings(n=None, copy_mb=512, dtype="float32"):
    """Matmul FLOP/s (in `dtype`) and memory bandwidth (read + write): the accelerator's own
    memory through a jitted copy, or host memory on a CPU."""
    flops = matmul_rate(n, dtype)
    if jax.default_backend() != "cpu":
        y = jnp.ones((copy_mb * 2 ** 20 // 4,), jnp.float32)
        g = jax.jit(lambda a: a + 1.0)
        return flops, 2 * y.nbytes / _best(lambda: g(y).block_until_ready())
    a = np.ones(copy_mb * 2 ** 20 // 4, np.float32)
    b = np.empty_like(a)
    return flops, 2 * a.nbytes / _best(lambda: np.copyto(b, a))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="write JSON here (and FILE.md)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip transformers (e.g. JAX on a GPU with a CPU-only torch)")
    args = parser.parse_args()

    import torch
    import transformers
    from zsjax.models import load_hf
    from zsjax.sampling import generate
    from zsjax.tools.fetch_smollm2 import fetch
    torch.set_num_threads(os.cpu_count())
    model_dir = args.model or fetch()
    name = (os.path.basename(os.path.normpath(args.model)) if args.model
            else "SmolLM2-135M-Instruct")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:  # some transformers versions convert the GGUF without one
        tok.pad_token = tok.eos_token
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # JAX runs float32 matmuls on a GPU with TF32; let torch do the same
        torch.backends.cuda.matmul.allow_tf32 = True
    if not args.no_reference:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                dtype=getattr(torch, args.dtype))
        hf = hf.to(device).eval()
        hf.generation_config.eos_token_id = None
    config, params = load_hf(model_dir, dtype=args.dtype)
    width = jnp.dtype(args.dtype).itemsize

    flops_s, bytes_s = ceilings(dtype=args.dtype)
    n_params = config.num_params()
    rows = []
    for batch in args.batches:
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8]}],
                                         tokenize=False, add_generation_prompt=True)
                 for i in range(batch)]
        prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
        new = args.new_tokens

        t = time.perf_counter()
        out = generate(config, params, prompts, max_new_tokens=new, eos_token_ids=[])
        first = time.perf_counter() - t
        assert all(len(x) == new for x in out.tokens)
        zs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            generate(config, params, prompts, max_new_tokens=new, eos_token_ids=[])
            zs.append(time.perf_counter() - t)

        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        hfs = []
        for _ in range(0 if args.no_reference else args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                res = hf.generate(**enc, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
            if device == "cuda":
                torch.cuda.synchronize()
            hfs.append(time.perf_counter() - t)
            assert res.shape[1] - enc["input_ids"].shape[1] == new

        # Roofline for one decode step: params read once, the KV cache read, 2 flops/param/row.
        prompt_len = max(map(len, prompts))
        kv_bytes = (2 * config.n_layers * batch * config.n_kv_heads * config.head_dim
                    * (prompt_len + new / 2) * width)
        step_bound = max(2 * n_params * batch / flops_s, (n_params * width + kv_bytes) / bytes_s)
        bound_tps = batch / step_bound
        z_tps = batch * new / statistics.median(zs)
        h_tps = batch * new / statistics.median(hfs) if hfs else float("nan")
        rows.append({"batch": batch, "new_tokens": new, "zsjax_tokens_s": round(z_tps, 1),
                     "transformers_tokens_s": round(h_tps, 1) if hfs else None,
                     "speedup": round(z_tps / h_tps, 2) if hfs else None,
                     "zsjax_first_call_s": round(first, 2),
                     "zsjax_compile_s_est": round(first - statistics.median(zs), 2),
                     "roofline_tokens_s": round(bound_tps, 1),
                     "fraction_of_roofline": round(z_tps / bound_tps, 2)})
        print(json.dumps(rows[-1]), flush=True)

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"jax {jax.__version__} ({jax.default_backend()}), "
                         f"torch {torch.__version__} ({'skipped' if args.no_reference else device})",
              "matmul_gflop_s": round(flops_s / 1e9, 1),
              "copy_bandwidth_gb_s": round(bytes_s / 1e9, 1),
              "model": f"{name} {args.dtype}", "rows": rows,
              "command": " ".join(["python"] + sys.argv)}
    lines = [f"{report['model']}. Machine: {report['machine']}; matmul "
             f"{report['matmul_gflop_s']} GFLOP/s, copy "
             f"bandwidth {report['copy_bandwidth_gb_s']} GB/s (same run).", "",
             "| batch | zsjax tok/s | transformers tok/s | speedup | zsjax compile s | "
             "roofline tok/s | zsjax / roofline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = (f"{r['transformers_tokens_s']} | {r['speedup']}x" if r["speedup"] is not None
               else "- | -")
        lines.append(f"| {r['batch']} | {r['zsjax_tokens_s']} | {ref} | "
                     f"{r['zsjax_compile_s_est']} | {r['roofline_tokens_s']} "
                     f"| {r['fraction_of_roofline']} |")
    print("\n".join(lines))
    if args.out:
        write_report(args.out, report, lines)


if __name__ == "__main__":
    main()
