#!/usr/bin/env bash
# Stop the TorchServe that serve.sh started (no-op when none is running).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
if [ -x "$VENV/bin/torchserve" ]; then
    "$VENV/bin/torchserve" --stop
fi
