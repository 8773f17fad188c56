#!/usr/bin/env bash
# Training on one machine (all its devices, one process).
#
#   bash launch/local.sh --config configs/tiny.py --workdir runs/tiny [--config.KEY=VALUE ...]
#
# Installs zsjax into ./.venv (or the active virtualenv) if needed; on a GPU or TPU machine
# install the matching JAX first (README: "Installing for GPU or TPU"). Arguments go to
# `python -m zsjax.train`; the mesh comes from the config (e.g. --config.mesh.fsdp=-1).
# Relative paths (config, workdir, data) are taken from the folder you run it in.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m zsjax.train "$@"
