#!/usr/bin/env bash
# The main job of the README's quick start: the synthetic demo, from scratch on the CPU.
# A world of fictional facts, a simulator fine-tuned on it, a policy warm-started on the
# format, GRPO with the noise curriculum, evaluation before and after (times measured on
# 2 cores: docs/DEMO.md). Arguments go to `python -m zsjax.demo` (e.g. --quick, --algorithm ppo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${WORKDIR:-$ZSJAX_ROOT/runs/demo}"
python -m zsjax.demo --workdir "$WORKDIR" "$@"
