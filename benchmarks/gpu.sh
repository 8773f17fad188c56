#!/usr/bin/env bash
# The GPU suite: decode, multi-turn rollouts (KV reuse vs re-prefill) and the GRPO update in
# bfloat16, on SmolLM2-135M and a random-weight Qwen2.5-1.5B-shaped model; one JSON and one
# Markdown report (OUT/report.json, OUT/report.md), about 8 minutes of an H100 or H200.
#
#   bash benchmarks/gpu.sh [--cpu] [OUT]      # OUT defaults to runs/bench_gpu
#
# --cpu: the same benchmarks on tiny shapes and sizes, on the CPU: check the script end to end
# here before a lent device's minutes are spent on it. Runs with the Python on PATH (a device
# machine's own, with JAX for its accelerator); each benchmark is cut off after
# ZSJAX_GPU_BENCH_TIMEOUT seconds (default 150), so one that hangs cannot eat the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--gpu)
if [ "${1:-}" = "--cpu" ]; then
  args+=(--smoke)
  export JAX_PLATFORMS=cpu
  shift
fi
out="${1:-runs/bench_gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/run.py "${args[@]}" --out "$out" --timeout "${ZSJAX_GPU_BENCH_TIMEOUT:-150}"
