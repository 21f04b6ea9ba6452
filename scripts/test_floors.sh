#!/usr/bin/env bash
# The unit tests on the oldest versions pyproject.toml admits: every floor (`>=X`) is installed as
# `==X` into .venv-floors (torch's floor from PyPI is a CUDA build, several GB). CI runs this after
# scripts/test.sh. Arguments pass through to pytest (default: tests/unit); --install-only installs and stops.
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
    # The dependencies alone, each at its floor; the tests import this checkout (PYTHONPATH below), so this
    # install never writes into the source tree while scripts/test.sh installs from it.
    "$FLOORS_PYTHON" -m pip install --quiet -r "$FLOORS_VENV/floors.txt"
    touch "$stamp"
fi
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
"$FLOORS_PYTHON" - <<'PY'
import diffusers, huggingface_hub, torch, transformers
print(f"==> on the floors: torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")
PY
# By default, two of the three torch.compile tests stay with the main run: each compiles the digits model
# whole (70-80 s on 2 cores), and the third (regional compilation) already runs compile_denoiser on the floors.
LEFT_OUT=(
    "tests/unit/test_options.py::test_a_new_compiled_worker_loads_the_graphs_instead_of_compiling"
    "tests/unit/test_speed_guards.py::test_torch_compile_keeps_the_digits[whole denoiser]"
)
if [ $# -eq 0 ]; then
    echo "==> left out on the floors (run by scripts/test.sh): ${LEFT_OUT[*]}"
    set -- tests/unit "${LEFT_OUT[@]/#/--deselect=}"
fi
PYTHONPATH="$REPO_ROOT" exec "$FLOORS_PYTHON" -m pytest -p no:cacheprovider "$@"
