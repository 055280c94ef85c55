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
  # say what is happening (a first install takes one to several minutes): steps always, pip's
  # own progress on a terminal, quiet pip otherwise (CI logs)
  if [ -t 2 ]; then PIPQ=(); else PIPQ=(-q); fi
  T0=$SECONDS
  echo "[moetier] installing into $VENV (first run: 1-3 minutes)" >&2
  echo "[moetier] 1/3 upgrading pip" >&2
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[moetier] 2/3 installing torch 2.13.0 (CPU build)" >&2
    python -m pip install "${PIPQ[@]}" "torch==2.13.0" >&2
  else
    echo "[moetier] 2/3 torch already installed" >&2
  fi
  echo "[moetier] 3/3 installing moetier and its dependencies (pip install -e .[${MOETIER_EXTRAS:-dev}])" >&2
  python -m pip install "${PIPQ[@]}" -e "$ROOT[${MOETIER_EXTRAS:-dev}]" >&2
  echo "$WANT" > "$STAMP"
  echo "[moetier] installed in $((SECONDS - T0)) s" >&2
fi
cd "$ROOT"
