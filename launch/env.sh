# Sourced by the launch and test scripts: makes sure a Python environment with zsjax exists.
#
# Uses the active virtualenv if there is one, else creates ./.venv. Installs the package
# (editable) with the extras named in ZSJAX_EXTRAS. Set ZSJAX_SKIP_INSTALL=1 to skip pip.
set -euo pipefail
ZSJAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x "$ZSJAX_ROOT/.venv/bin/python" ]]; then
    echo "[zsjax] creating virtualenv $ZSJAX_ROOT/.venv" >&2
    "${PYTHON:-python3}" -m venv "$ZSJAX_ROOT/.venv"
  fi
  # shellcheck disable=SC1091
  source "$ZSJAX_ROOT/.venv/bin/activate"
fi
if [[ "${ZSJAX_SKIP_INSTALL:-0}" != "1" ]]; then
  extras="${ZSJAX_EXTRAS:-}"
  spec="$ZSJAX_ROOT"
  [[ -n "$extras" ]] && spec="$ZSJAX_ROOT[$extras]"
  echo "[zsjax] pip install -e $spec" >&2
  python -m pip install --quiet --disable-pip-version-check -e "$spec" 2>&1 \
    | grep -vE "^WARNING: Location|^\s*$" >&2 || true
  python -c "import zsjax" || { echo "[zsjax] installation failed" >&2; exit 1; }
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${ZSJAX_CACHE:-$HOME/.cache/zsjax}/jax_compile}"
