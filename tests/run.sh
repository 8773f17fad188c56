#!/usr/bin/env bash
# The test command of the README (and of .ci/run). Installs what the tests need, then runs pytest.
#   bash tests/run.sh              # default suite (skips tests marked slow)
#   bash tests/run.sh --slow       # everything, slow tests included
#   bash tests/run.sh -k parity    # any other arguments go to pytest
set -euo pipefail
ZSJAX_EXTRAS="${ZSJAX_EXTRAS:-test}" source "$(dirname "${BASH_SOURCE[0]}")/../launch/env.sh"
cd "$ZSJAX_ROOT"
args=()
for a in "$@"; do
  if [[ "$a" == "--slow" ]]; then args+=(-m "slow or not slow"); else args+=("$a"); fi
done
# pytest exits 5 when it collected nothing: that is a failure here, as is any other non-zero code.
exec python -m pytest "${args[@]}"
