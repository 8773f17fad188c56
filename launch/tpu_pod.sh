#!/usr/bin/env bash
# Training on a Cloud TPU VM slice: creates the slice (or reuses it), copies this checkout to
# every worker, installs, and runs the same `python -m zsjax.train` on all workers at once,
# streaming their logs here. JAX finds the other workers itself (zsjax.distributed).
#
#   TPU_NAME=zs-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 \
#     bash launch/tpu_pod.sh configs/zerosearch.py:qwen2.5-7b-base,grpo \
#       --workdir /mnt/runs/7b --config.rl.micro_batches=8 --config.rollout_mesh.tensor=4 \
#       --config.policy.path=... [--config.KEY=VALUE ...]
#
# The first argument is the config; the rest go to zsjax.train on every worker. The workdir
# must be one shared directory on every worker (NFS, Filestore, or a bucket mounted with
# gcsfuse): checkpoints are written by all workers, metrics by worker 0. Model folders must be
# readable on every worker (same path). With fsdp over all 32 chips of a v5p-64, the recipe's
# mini-batches (256 + 64 trajectories) need rl.micro_batches=8 (32 rows, one per chip).
# Environment: TPU_NAME, ZONE, ACCELERATOR (when creating), RUNTIME (TPU software version),
# PROJECT (gcloud project; default: gcloud's), SPOT=1 (spot capacity), DRY_RUN=1 (print the
# gcloud commands instead of running them).
set -euo pipefail
if (($# < 1)); then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
CONFIG="$1"
shift
: "${TPU_NAME:?set TPU_NAME (the TPU VM slice to create or reuse)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_args=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project "$PROJECT")

quote() {  # one word for a remote shell: 'it'\''s' style
  local s="${1//\'/\'\\\'\'}"
  printf "'%s'" "$s"
}

run() {  # prints, then runs (unless DRY_RUN=1)
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,~+-]+$ ]]; then line+=" $arg"; else line+=" $(quote "$arg")"; fi
  done
  echo "$line" >&2
  [[ "${DRY_RUN:-0}" == "1" ]] || "$@"
}

if [[ "${DRY_RUN:-0}" == "1" ]] || ! gcloud compute tpus tpu-vm describe "$TPU_NAME" \
    "${gcloud_args[@]}" > /dev/null 2>&1; then
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}"
          --accelerator-type "$ACCELERATOR" --version "$RUNTIME")
  [[ "${SPOT:-0}" == "1" ]] && create+=(--spot)
  run "${create[@]}"
fi

# This checkout (tracked files, as committed) to ~/zsjax on every worker.
tmp_dir="$(mktemp -d)"
archive="$tmp_dir/zsjax.tar.gz"
trap 'rm -rf "$tmp_dir"' EXIT
git -C "$ROOT" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/zsjax.tar.gz" --worker=all \
  "${gcloud_args[@]}"

install='mkdir -p ~/zsjax && tar -xzf ~/zsjax.tar.gz -C ~/zsjax && cd ~/zsjax &&
python3 -m pip install --quiet "jax[tpu]>=0.10.2,<0.11" -e .'
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" \
  --command "$install"

# ZSJAX_CLUSTER=tpu: join the slice's workers (JAX finds them through the TPU metadata).
train="cd ~/zsjax && ZSJAX_CLUSTER=tpu python3 -m zsjax.train --config $(quote "$CONFIG")"
for arg in "$@"; do train+=" $(quote "$arg")"; done
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" \
  --command "$train"
