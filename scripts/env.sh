# Sourced by scripts/run and scripts/test: create or reuse .venv and install what is needed.
# torch is pinned to 2.13.0 first: on these machines that takes the local CPU build, and the
# project's looser "torch>=2.4" is then already satisfied (no CUDA wheels are ever pulled).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOETIER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[moetier] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.moetier-install-stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-${MOETIER_EXTRAS:-dev}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[moetier] installing dependencies into $VENV" >&2
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e "$ROOT[${MOETIER_EXTRAS:-dev}]"
  echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
