#!/usr/bin/env bash
# A multi-host run on one machine: NPROC processes on 127.0.0.1, each with DEVICES fake CPU
# devices, joined into one JAX program. This is how multi-host code is tested without a pod.
#
#   NPROC=2 DEVICES=2 bash launch/multiprocess_cpu.sh --config configs/tiny.py \
#       --workdir runs/mp --config.mesh.data=4
#
# Arguments go to every process's `python -m zsjax.train`. Each process's output is prefixed
# with [pI]. If any process fails, the others are stopped; the exit code is the first failure's
# (143, a process stopped by SIGTERM after its checkpoint, lets the others finish theirs).
# PORT picks the coordinator port (default: a free one); TIMEOUT bounds the start-up (seconds).
# Needs bash 5.1 or later (`wait -n -p`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
NPROC="${NPROC:-2}"
DEVICES="${DEVICES:-2}"
TIMEOUT="${TIMEOUT:-120}"
PORT="${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[zsjax] $NPROC processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT" >&2
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
    python -u -m zsjax.train "$@" --coordinator_address "127.0.0.1:$PORT" \
      --num_processes "$NPROC" --process_id "$i" --initialization_timeout "$TIMEOUT" \
      > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

rc=0
running=("${pids[@]}")
while ((${#running[@]})); do
  code=0
  wait -n -p done_pid "${running[@]}" || code=$?
  left=()
  for pid in "${running[@]}"; do [[ "$pid" != "$done_pid" ]] && left+=("$pid"); done
  running=("${left[@]}")
  if ((code == 143)); then  # stopped by SIGTERM after a checkpoint: the others stop too
    rc=143
  elif ((code != 0)); then
    echo "[zsjax] process $done_pid exited with status $code; stopping the others" >&2
    rc=$code
    break
  fi
done
exit "$rc"
