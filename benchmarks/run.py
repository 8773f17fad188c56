"""The benchmark suite: every benchmark side by side in one run, with a JSON and a Markdown report.

    python benchmarks/run.py [--quick] [--out runs/bench] [--only decode rollout ...]

Runs, each in its own process (so one's memory and compiled programs do not affect the next):
  ceilings     matmul FLOP/s and memory copy bandwidth of this machine (the roofline inputs)
  decode       zsjax.sampling.generate vs transformers' generate, SmolLM2, batch 1 / 8 / 32
  rollout      multi-turn rollouts, KV reuse vs re-prefill vs never-shrinking batches, scripted
  rollout_sim  multi-turn rollouts against the in-process simulator, with the time breakdown
  update       the GRPO step vs a PyTorch eager reference: tokens/s, MFU, peak memory
  update_small the same on a random 5.3M-param Llama
  serve        zsjax.serve under 32 concurrent openai-client requests vs one direct batch
  lora         the GRPO step with LoRA rank 16 vs full fine-tuning: time, peak memory,
               checkpoint size; the adapters' merge vs the decode it precedes
  tunix        decode and the GRPO step vs Tunix on the same weights, in the Python of the
               environment ZSJAX_TUNIX_PYTHON names (Tunix pins packages zsjax pins otherwise;
               see benchmarks/tunix_peer.py); skipped where Tunix is not installed

--quick fits a 2-core machine in a few minutes (smaller batches, fewer repeats). On a GPU or
TPU the same suite runs with the accelerator's ceilings; the PyTorch/transformers reference
runs only where torch sees the same kind of device (a CPU-only torch is skipped there rather
than compared). Results go to OUT/report.json and OUT/report.md, and each benchmark's own
JSON and Markdown to OUT/NAME.json / .md.
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
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), default=None)
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
    plan = dict(QUICK if args.quick else FULL)
    if accelerated and not args.quick:
        plan.update(ACCELERATOR)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only}
    print(f"[bench] {ceil}", file=sys.stderr, flush=True)

    results, failed = {}, []
    no_reference = accelerated and not _torch_has_accelerator()
    for name, cmd in plan.items():
        out = os.path.join(args.out, f"{name}.json")
        python = sys.executable
        env = dict(os.environ)
        if cmd[0] == "tunix_peer.py":  # Tunix's own environment, with this checkout on the path
            python = os.environ.get("ZSJAX_TUNIX_PYTHON", sys.executable)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        full = [python, os.path.join(HERE, cmd[0]), *cmd[1:], "--out", out]
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
    lines = [f"# Benchmark report ({'quick' if args.quick else 'full'})", "",
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
