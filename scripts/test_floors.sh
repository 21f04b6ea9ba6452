#!/usr/bin/env bash
# The unit tests on the oldest versions pyproject.toml admits: every floor (`>=X`) is installed as
# `==X` into .venv-floors (torch's floor from PyPI is a CUDA build, several GB). CI runs this after
# scripts/test.sh. Arguments pass through to pytest (default: tests/unit).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
check_java

FLOORS_VENV="$REPO_ROOT/.venv-floors"
FLOORS_PYTHON="$FLOORS_VENV/bin/python"
if [ ! -x "$FLOORS_PYTHON" ]; then
    echo "==> creating $FLOORS_VENV"
    python3 -m venv "$FLOORS_VENV"
fi
stamp="$FLOORS_VENV/.installed-$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    python3 scripts/floors.py test > "$FLOORS_VENV/floors.txt"
    echo "==> installing the floors into $FLOORS_VENV: $(paste -sd ' ' "$FLOORS_VENV/floors.txt")"
    "$FLOORS_PYTHON" -m pip install --quiet --upgrade pip
    "$FLOORS_PYTHON" -m pip install --quiet -c "$FLOORS_VENV/floors.txt" -e "$REPO_ROOT[test]"
    touch "$stamp"
fi
"$FLOORS_PYTHON" - <<'PY'
import diffusers, huggingface_hub, torch, transformers
print(f"==> on the floors: torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")
PY
exec "$FLOORS_PYTHON" -m pytest -p no:cacheprovider "${@:-tests/unit}"
