#!/usr/bin/env bash
# The test command of the README (and of .ci/run). Installs what the tests need, then runs pytest.
#   bash tests/run.sh              # default suite (skips tests marked slow)
#   bash tests/run.sh --slow       # everything, slow tests included
# A test is marked slow when it takes more than about half a minute on 2 cores and another
# default test covers the same code path more cheaply (a GRPO run of configs/tiny.py with
# resume and export, a PPO run and the demo's `--preset tiny` learning test stay; the others,
# such as the quick demo, resume after SIGKILL, meshes, bfloat16, the other algorithms, LoRA
# RL and SmolLM2 generation, are slow). CI runs the default suite.
#   bash tests/run.sh -k parity    # any other arguments go to pytest
#   bash tests/run.sh -s -k demo   # -s (show prints) runs in this process, not in 2 workers
set -euo pipefail
ZSJAX_EXTRAS="${ZSJAX_EXTRAS:-test}" source "$(dirname "${BASH_SOURCE[0]}")/../launch/env.sh"
cd "$ZSJAX_ROOT"
# JAX's persistent compilation cache in a fresh folder of this run's own (removed at the end):
# a program that one test compiled (the tiny models recur across files), another test or a
# CLI test's subprocess loads instead of compiling it again, and no earlier run's cache makes
# a run faster or slower. The default suite on 2 cores: 577 s against 669 s without the cache
# (docs/PERFORMANCE.md). JAX_ENABLE_COMPILATION_CACHE=false turns it off; =true uses
# JAX_COMPILATION_CACHE_DIR (launch/env.sh: ~/.cache/zsjax/jax_compile), kept between runs.
# XLA:CPU once crashed late in the suite's one long-lived process on
# test_bfloat16_compute_trains_float32_weights's program, with and without the cache; that
# test trains in a process of its own, and the suite runs in worker processes.
if [[ -z "${JAX_ENABLE_COMPILATION_CACHE:-}" ]]; then
  run_cache="$(mktemp -d "${TMPDIR:-/tmp}/zsjax_test_jax_cache.XXXXXX")"
  export JAX_ENABLE_COMPILATION_CACHE=true JAX_COMPILATION_CACHE_DIR="$run_cache"
  trap 'rm -rf "$run_cache"' EXIT
fi
args=()
workers="${ZSJAX_TEST_WORKERS:-2}"
for a in "$@"; do
  if [[ "$a" == "--slow" ]]; then args+=(-m "slow or not slow"); else args+=("$a"); fi
  # Worker processes' prints never reach the terminal: `-s` runs the tests in this process.
  if [[ "$a" == "-s" || "$a" == "--capture=no" ]]; then workers="${ZSJAX_TEST_WORKERS:-0}"; fi
done
# Two worker processes (pytest-xdist; ZSJAX_TEST_WORKERS=0 runs in this process), each taking
# whole test files in collection order (tests/conftest.py puts the longest first): the
# machine's 2 cores stay busy while one worker compiles, and no process lives through the whole
# suite (XLA:CPU has crashed late in one long-lived process). A worker that crashes fails its
# test, and pytest's exit code says so.
# pytest exits 5 when it collected nothing: that is a failure here, as is any other non-zero code.
# (Not exec: the EXIT trap removes this run's compilation cache; set -e exits with pytest's code.)
python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "${args[@]}"
