"""The benchmark suite: every benchmark side by side in one run, with a JSON and a Markdown report.

    python benchmarks/run.py [--quick] [--out runs/bench] [--only decode rollout ...]
    python benchmarks/run.py --gpu [--smoke] [--out runs/bench_gpu]   # what benchmarks/gpu.sh runs

Runs, each in its own process (so one's memory and compiled programs do not affect the next):
  ceilings     matmul FLOP/s and memory copy bandwidth of this machine (the roofline inputs)
  decode       zsjax.sampling.generate vs transformers' generate, SmolLM2, batch 1 / 8 / 32
  rollout      multi-turn rollouts, KV reuse vs re-prefill vs never-shrinking batches, scripted
  rollout_sim  multi-turn rollouts against the in-process simulator, with the time breakdown
  update       the GRPO step vs a PyTorch eager reference: tokens/s, MFU, peak memory
  update_small the same on a random 5.3M-param Llama
  serve        zsjax.serve under 32 concurrent openai-client requests vs one direct batch and
               vs llama.cpp's server on the same GGUF (llama-cpp-python[server] in the Python
               ZSJAX_LLAMACPP_PYTHON names; those rows skipped where it is not installed)
  lora         the GRPO step with LoRA rank 16 vs full fine-tuning: time, peak memory,
               checkpoint size; the adapters' merge vs the decode it precedes
  scan_layers  compile and run time of the forward, a decode step and the update at Qwen2.5-3B's
               depth (36 layers, narrowed), layers unrolled vs scanned (model.scan_layers)
  tunix        decode and the GRPO step vs Tunix on the same weights, in the Python of the
               environment ZSJAX_TUNIX_PYTHON names (Tunix pins packages zsjax pins otherwise;
               see benchmarks/tunix_peer.py); skipped where Tunix is not installed

--quick fits a 2-core machine in a few minutes (smaller batches, fewer repeats). On a GPU or
TPU the same suite runs with the accelerator's ceilings; the PyTorch/transformers reference
runs only where torch sees the same kind of device (a CPU-only torch is skipped there rather
than compared). Results go to OUT/report.json and OUT/report.md, and each benchmark's own
JSON and Markdown to OUT/NAME.json / .md.

--gpu runs the GPU suite instead (benchmarks/gpu.sh): decode, multi-turn rollouts (KV reuse vs
re-prefill) and the GRPO update in bfloat16, on SmolLM2-135M and on a random-weight
Qwen2.5-1.5B-shaped model (benchmarks/random_model.py; the SmolLM2 fixture's weights where they
are cached, else random weights of its shape), sized for about 8 minutes of an H100 or H200.
--smoke runs the same benchmarks on tiny shapes and sizes: the CPU check that the suite runs end
to end before a lent device's minutes are spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = {
    "decode": ["decode.py", "--batches", "1", "8", "32", "--new-tokens", "64"],
    "rollout": ["rollout.py", "--questions", "16", "--turns", "2"],
    "rollout_sim": ["rollout.py", "--questions", "16", "--turns", "2", "--backend", "simulator",
                    "--modes", "kv_reuse"],
    "update": ["update.py", "--batch", "8", "--length", "128"],
    "update_small": ["update.py", "--small", "--batch", "16", "--length", "256"],
    "serve": ["serve.py", "--clients", "32", "--new-tokens", "64"],
    "lora": ["lora.py", "--batch", "8", "--length", "256"],
    "tunix": ["tunix_peer.py", "--batches", "1", "8", "32", "--new-tokens", "128"],
    "scan_layers": ["scan_layers.py", "--layers", "36", "--d-model", "256"],
}
QUICK = {
    "decode": ["decode.py", "--batches", "1", "8", "--new-tokens", "32", "--repeats", "1"],
    "rollout": ["rollout.py", "--questions", "8", "--turns", "2", "--response-tokens", "32",
                "--warmup", "1", "--repeats", "1"],
    "rollout_sim": ["rollout.py", "--questions", "8", "--turns", "2", "--response-tokens", "32",
                    "--warmup", "1", "--repeats", "1", "--backend", "simulator",
                    "--sim-tokens", "32", "--modes", "kv_reuse"],
    "update": ["update.py", "--batch", "4", "--length", "128", "--steps", "2"],
    "update_small": ["update.py", "--small", "--batch", "8", "--length", "128", "--steps", "2"],
    "serve": ["serve.py", "--clients", "8", "--new-tokens", "16", "--repeats", "1"],
    "lora": ["lora.py", "--batch", "2", "--length", "128", "--steps", "1", "--new-tokens", "16"],
    "tunix": ["tunix_peer.py", "--batches", "1", "8", "--new-tokens", "32", "--repeats", "1",
              "--update-batch", "2", "--update-length", "128", "--steps", "1"],
    "scan_layers": ["scan_layers.py", "--layers", "8", "--d-model", "64"],
}
GPU = {  # {smollm2}, {qwen1_5b}: model folders made by `_gpu_models`
    "decode_smollm2": ["decode.py", "--model", "{smollm2}", "--batches", "1", "64", "256",
                       "--new-tokens", "128", "--dtype", "bfloat16"],
    "decode_qwen1.5b": ["decode.py", "--model", "{qwen1_5b}", "--batches", "1", "128",
                        "--new-tokens", "128", "--dtype", "bfloat16", "--no-reference"],
    "rollout_smollm2": ["rollout.py", "--model", "{smollm2}", "--dtype", "bfloat16",
                        "--questions", "64", "--turns", "2", "--response-tokens", "128",
                        "--modes", "kv_reuse", "re_prefill", "--warmup", "1", "--repeats", "2"],
    "update_smollm2": ["update.py", "--model", "{smollm2}", "--dtype", "bfloat16", "--batch",
                       "16", "--length", "1024", "--steps", "3"],
    "update_qwen1.5b": ["update.py", "--model", "{qwen1_5b}", "--dtype", "bfloat16", "--batch",
                        "8", "--length", "1024", "--steps", "3", "--remat", "--no-reference"],
}
GPU_SMOKE = {  # the same benchmarks, tiny: runs in a few minutes on 2 CPU cores
    "decode_smollm2": ["decode.py", "--model", "{smollm2}", "--batches", "1", "4",
                       "--new-tokens", "8", "--repeats", "1", "--dtype", "bfloat16"],
    "decode_qwen1.5b": ["decode.py", "--model", "{qwen1_5b}", "--batches", "4",
                        "--new-tokens", "8", "--repeats", "1", "--dtype", "bfloat16",
                        "--no-reference"],
    "rollout_smollm2": ["rollout.py", "--model", "{smollm2}", "--dtype", "bfloat16",
                        "--questions", "4", "--turns", "2", "--response-tokens", "16",
                        "--modes", "kv_reuse", "re_prefill", "--warmup", "1", "--repeats", "1"],
    "update_smollm2": ["update.py", "--model", "{smollm2}", "--dtype", "bfloat16", "--batch",
                       "2", "--length", "64", "--steps", "1"],
    "update_qwen1.5b": ["update.py", "--model", "{qwen1_5b}", "--dtype", "bfloat16", "--batch",
                        "2", "--length", "64", "--steps", "1", "--remat", "--no-reference"],
}
ACCELERATOR = {  # larger sizes where there is a GPU or TPU
    "decode": ["decode.py", "--batches", "1", "8", "32", "128", "--new-tokens", "128"],
    "update": ["update.py", "--batch", "16", "--length", "512"],
}


def ceilings() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = 8192 if jax.default_backend() != "cpu" else 2048
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    copy = jax.jit(lambda a: a + 1.0)  # reads and writes every element once
    y = jnp.ones((64 * 2 ** 20,), jnp.float32)  # 256 MB
    copy(y).block_until_ready()
    best_copy = min(_timed(lambda: copy(y).block_until_ready()) for _ in range(5))
    host = np.ones(64 * 2 ** 20, np.float32)
    out = np.empty_like(host)
    best_host = min(_timed(lambda: np.copyto(out, host)) for _ in range(5))
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "matmul_gflop_s": round(2 * n ** 3 / best / 1e9, 1),
            "device_copy_gb_s": round(2 * y.nbytes / best_copy / 1e9, 1),
            "host_copy_gb_s": round(2 * host.nbytes / best_host / 1e9, 1)}


def _gpu_models(out: str, smoke: bool) -> dict[str, str]:
    """The GPU suite's model folders, by placeholder: the SmolLM2 fixture where it is cached
    (a device machine reaches no package index), else random weights of its shape; a random
    Qwen2.5-1.5B-shaped model. Made in child processes (JAX here would hold the device)."""
    sys.path.insert(0, ROOT)
    from zsjax.tools import fetch_smollm2
    models = {}
    cached = fetch_smollm2.default_dir()
    # smoke shapes have small vocabularies: a tokenizer trained on the spot, as on a device
    tokenizer = cached if not smoke and fetch_smollm2.is_complete(cached) else ""
    for key, shape in (("smollm2", "smollm2-135m"), ("qwen1_5b", "qwen2.5-1.5b")):
        if key == "smollm2" and not smoke and fetch_smollm2.is_complete(cached):
            models[key] = cached
            continue
        path = os.path.join(out, "models", shape + ("-smoke" if smoke else ""))
        cmd = [sys.executable, os.path.join(HERE, "random_model.py"), path, "--shape", shape]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--tokenizer", tokenizer] if tokenizer else []
        print(f"[bench] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        models[key] = path
    return models


def _torch_has_accelerator() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench"))
    parser.add_argument("--only", nargs="+", choices=sorted(set(FULL) | set(GPU)), default=None)
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (benchmarks/gpu.sh)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --gpu: tiny shapes and sizes, a CPU check of the suite")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    parser.add_argument("--ceilings-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ceilings_only:
        print(json.dumps(ceilings()))
        return 0
    os.makedirs(args.out, exist_ok=True)

    # The ceilings run in a child process too: JAX in this process would hold the accelerator's
    # memory (it preallocates) for the whole suite.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ceilings-only"],
                          cwd=ROOT, text=True, stdout=subprocess.PIPE, check=True)
    ceil = json.loads(proc.stdout.strip().splitlines()[-1])
    accelerated = ceil["backend"] != "cpu"
    if args.gpu:
        plan = dict(GPU_SMOKE if args.smoke else GPU)
    else:
        plan = dict(QUICK if args.quick else FULL)
        if accelerated and not args.quick:
            plan.update(ACCELERATOR)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only}
    print(f"[bench] {ceil}", file=sys.stderr, flush=True)
    models = _gpu_models(args.out, args.smoke) if args.gpu else {}

    results, failed = {}, []
    no_reference = accelerated and not _torch_has_accelerator()
    for name, cmd in plan.items():
        out = os.path.join(args.out, f"{name}.json")
        python = sys.executable
        env = dict(os.environ)
        if cmd[0] == "tunix_peer.py":  # Tunix's own environment, with this checkout on the path
            python = os.environ.get("ZSJAX_TUNIX_PYTHON", sys.executable)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        full = [python, os.path.join(HERE, cmd[0]), *(a.format(**models) for a in cmd[1:]),
                "--out", out]
        if no_reference and cmd[0] in ("decode.py", "update.py"):
            full.append("--no-reference")
        print(f"[bench] {name}: {' '.join(full[1:])}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if accelerated and not no_reference and cmd[0] in ("decode.py", "update.py"):
            # JAX and torch share the device there: split its memory
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        proc = subprocess.run(full, cwd=ROOT, timeout=args.timeout, text=True, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t
        if cmd[0] == "tunix_peer.py" and proc.returncode == 3:  # tunix_peer.NOT_INSTALLED
            results[name] = {"skipped": "Tunix is not installed (set ZSJAX_TUNIX_PYTHON)",
                             "seconds": round(seconds, 1)}
            continue
        if proc.returncode != 0 or not os.path.exists(out):
            print(proc.stdout[-3000:], file=sys.stderr)
            failed.append(name)
            results[name] = {"error": f"exit {proc.returncode}", "seconds": round(seconds, 1)}
            continue
        with open(out) as f:
            results[name] = {"result": json.load(f), "seconds": round(seconds, 1)}

    import jax
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
              "ceilings": ceil, "quick": args.quick,
              "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)]
                                  + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    kind = ("GPU suite, smoke" if args.smoke else "GPU suite") if args.gpu else (
        "quick" if args.quick else "full")
    lines = [f"# Benchmark report ({kind})", "",
             f"`{report['command']}`, {report['date']}", "",
             f"Machine: {report['machine']}; backend {ceil['backend']} ({ceil['device']}); "
             f"matmul {ceil['matmul_gflop_s']} GFLOP/s, device copy {ceil['device_copy_gb_s']} "
             f"GB/s, host copy {ceil['host_copy_gb_s']} GB/s (same run).", ""]
    for name in plan:
        lines.append(f"## {name} ({results[name]['seconds']} s)")
        lines.append("")
        md = os.path.join(args.out, f"{name}.md")
        if "error" in results[name]:
            lines.append(f"failed: {results[name]['error']}")
        elif "skipped" in results[name]:
            lines.append(f"skipped: {results[name]['skipped']}")
        elif os.path.exists(md):
            lines.append(open(md).read().strip())
        lines.append("")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"[bench] wrote {args.out}/report.json and report.md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
