#!/usr/bin/env bash
# Bring up TorchServe with the default model, wait until it is READY, and save one answer as a PNG.
# Safe to run again: it stops the running TorchServe and rebuilds the archive.
#   MODEL_SOURCE=runwayml/stable-diffusion-v1-5 scripts/serve.sh   # a real model (needs internet)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"

MODEL_SOURCE="${MODEL_SOURCE:-tiny}"
PROMPT="${PROMPT:-a photo of an astronaut riding a horse on mars}"

check_java
ensure_venv
export PATH="$VENV/bin:$PATH"

scripts/stop.sh

echo "==> building model-store/stable_diffusion.mar from '$MODEL_SOURCE'"
if [ "$MODEL_SOURCE" = tiny ]; then
    # The tiny model draws noise at any size; small defaults keep the demo quick on a CPU.
    BUILD_DEFAULTS=(--height 256 --width 256 --num-inference-steps 25)
else
    BUILD_DEFAULTS=()
fi
python -m archiver build --source "$MODEL_SOURCE" --model-name stable_diffusion "${BUILD_DEFAULTS[@]}" ${BUILD_ARGS:-}

echo "==> starting TorchServe (logs in logs/)"
mkdir -p logs
# The launcher leaves its output streams to the background Java process: keep them out of this terminal.
torchserve --start --ncs --ts-config config.properties --model-store model-store >logs/launcher.out 2>&1
python scripts/manage.py wait --timeout 600

mkdir -p outputs
python scripts/query.py "$PROMPT" --seed 42 --out outputs/sample.png

KEY=$(python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
cat <<USAGE

TorchServe is serving 'stable_diffusion' on 127.0.0.1:8080. Next:
  curl -X POST http://127.0.0.1:8080/predictions/stable_diffusion \\
       -H "Authorization: Bearer $KEY" -H "Content-Type: text/plain" -d "a red fox in the snow"
  curl -X POST http://127.0.0.1:8080/predictions/stable_diffusion \\
       -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d '{"prompt": "a red fox", "seed": 7}'
  python scripts/query.py "a red fox in the snow" --out fox.png
  python scripts/manage.py scale --workers 2
  scripts/stop.sh
USAGE
