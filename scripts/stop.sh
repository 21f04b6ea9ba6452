#!/usr/bin/env bash
# Stop whichever engine serve.sh or serve_ray.sh started: TorchServe, and the local Ray cluster with its
# Ray Serve app (no-op for an engine that is not running).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
if [ -x "$VENV/bin/torchserve" ]; then
    "$VENV/bin/torchserve" --stop
fi
if [ -x "$VENV/bin/ray" ]; then
    "$VENV/bin/ray" stop >/dev/null && echo "Ray stopped (if it was running)"
fi
