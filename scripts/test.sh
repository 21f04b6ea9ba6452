#!/usr/bin/env bash
# Install the test dependencies into .venv if needed, then run pytest (arguments pass through).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
check_java
ensure_venv test,ray
exec "$PYTHON" -m pytest "$@"
