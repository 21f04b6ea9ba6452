# Sourced by serve.sh and test.sh: create .venv, install the project once, and check for Java.
# TORCH_SPEC picks the torch build, e.g. TORCH_SPEC="torch==2.13.0" (default) or a CUDA index's build.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON="$VENV/bin/python"

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$PYTHON" ]; then
        echo "==> creating $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml or the requested extras change.
    local stamp="$VENV/.installed-$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt" | sha256sum | cut -c1-16)${extras:+-$extras}"
    if [ -f "$stamp" ]; then
        return
    fi
    echo "==> installing torch (${TORCH_SPEC:-torch==2.13.0}) and the project into .venv (first run only)"
    "$PYTHON" -m pip install --quiet --upgrade pip
    "$PYTHON" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    # constraints.txt pins the tested set, so an install is reproducible; the floors stay in pyproject.toml.
    "$PYTHON" -m pip install --quiet -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT${extras:+[$extras]}"
    touch "$stamp"
}

check_java() {
    if ! command -v java >/dev/null 2>&1; then
        echo "error: Java is not installed; TorchServe's frontend needs Java 17 or newer." >&2
        echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jdk-headless" >&2
        echo "  macOS:         brew install openjdk@17" >&2
        return 1
    fi
    local major
    major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
    if [ -z "$major" ] || [ "$major" -lt 17 ]; then
        echo "error: TorchServe needs Java 17 or newer; found: $(java -version 2>&1 | head -n1)" >&2
        echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jdk-headless" >&2
        return 1
    fi
}
