#!/usr/bin/env bash
# Bring up a local Ray cluster and deploy the Ray Serve app from scripts/ray-serve.yaml (as KubeRay deploys
# its serveConfigV2), with the default model, and save one answer as a PNG:
# the same request API as serve.sh's TorchServe, on 127.0.0.1:8000 (Ray Serve's default) at the same path.
# Safe to run again: it stops whichever engine is running and rebuilds the archive.
#   MODEL_SOURCE=stable-diffusion-v1-5/stable-diffusion-v1-5 scripts/serve_ray.sh   # a real model (needs internet)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"

MODEL_SOURCE="${MODEL_SOURCE:-digits}"
PROMPT="${PROMPT:-digit 3}"

ensure_venv ray
export PATH="$VENV/bin:$PATH" RAY_USAGE_STATS_ENABLED=0

scripts/stop.sh

echo "==> building model-store/stable_diffusion.mar from '$MODEL_SOURCE'"
# The same archive TorchServe serves: Ray Serve reads its handler: section and batch settings.
python -m archiver build --source "$MODEL_SOURCE" --model-name stable_diffusion --batch-size 4 --force ${BUILD_ARGS:-}

echo "==> starting a local Ray cluster (head node on 127.0.0.1, token authentication on) and the app"
# Ray's token authentication on its control plane (GCS, dashboard, the Serve REST API): the token is made
# once, in ~/.ray/auth_token, and every ray and serve command here reads it.
export RAY_AUTH_MODE=token
# Serve's HTTP proxy stops reading a body at the limit (handlers/ray/proxy.py), through Serve's own hook.
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=handlers.ray.proxy:middlewares
ray get-auth-token --generate >/dev/null
ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --disable-usage-stats >/dev/null
# The archive's path, absolute: the application is built in the cluster's own processes.
RAY_CONFIG="$(mktemp -d)/ray-serve.yaml"
sed "s|source: model-store/|source: $REPO_ROOT/model-store/|" scripts/ray-serve.yaml > "$RAY_CONFIG"
serve deploy "$RAY_CONFIG"
for _ in $(seq 300); do
    serve status | grep -q "status: RUNNING" && break
    sleep 2
done

mkdir -p outputs
python scripts/query.py "$PROMPT" --seed 3 --url http://127.0.0.1:8000 --out outputs/sample.png

cat <<USAGE

Ray Serve is serving 'stable_diffusion' on 127.0.0.1:8000 (Ray's token covers its control plane, not Serve's
HTTP port: put authentication in front of it, see docs/ray.md). Next:
  curl -X POST http://127.0.0.1:8000/predictions/stable_diffusion \\
       -H "Content-Type: text/plain" -H "Accept: image/png" -d "digit 7" -o seven.png
  python scripts/query.py "digit 5" --url http://127.0.0.1:8000 --out five.png
  ray status; serve status
  scripts/stop.sh
USAGE
