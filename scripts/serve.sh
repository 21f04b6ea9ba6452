#!/usr/bin/env bash
# Bring up TorchServe with the default model, wait until it is READY, and save one answer as a PNG.
# Safe to run again: it stops the running TorchServe and rebuilds the archive.
#   MODEL_SOURCE=stable-diffusion-v1-5/stable-diffusion-v1-5 scripts/serve.sh   # a real model (needs internet)
#   MODEL_SOURCE=tiny scripts/serve.sh                                          # random weights, draws noise
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"

MODEL_SOURCE="${MODEL_SOURCE:-digits}"
PROMPT="${PROMPT:-digit 3}"

check_java
ensure_venv
export PATH="$VENV/bin:$PATH"

scripts/stop.sh

echo "==> building model-store/stable_diffusion.mar from '$MODEL_SOURCE'"
# Shipped models bring their own defaults (digits: 64x64, 25 steps); BUILD_ARGS adds any archiver flag.
# --force: serve.sh rebuilds the archive from whatever MODEL_SOURCE names now.
python -m archiver build --source "$MODEL_SOURCE" --model-name stable_diffusion --batch-size 4 --force ${BUILD_ARGS:-}

echo "==> starting TorchServe (logs in logs/)"
mkdir -p logs
# The launcher leaves its output streams to the background Java process: keep them out of this terminal.
torchserve --start --ncs --ts-config config.properties --model-store model-store >logs/launcher.out 2>&1
python scripts/manage.py wait --timeout 600

mkdir -p outputs
python scripts/query.py "$PROMPT" --seed 3 --out outputs/sample.png

KEY=$(python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
cat <<USAGE

TorchServe is serving 'stable_diffusion' on 127.0.0.1:8080. Next:
  curl -X POST http://127.0.0.1:8080/predictions/stable_diffusion \\
       -H "Authorization: Bearer $KEY" -H "Content-Type: text/plain" -H "Accept: image/png" -d "digit 7" -o seven.png
  curl -X POST http://127.0.0.1:8080/predictions/stable_diffusion \\
       -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d '{"prompt": "a handwritten four", "seed": 7, "output_format": "png"}' -o four.png
  python scripts/query.py "digit 5" "a handwritten nine" --num-images-per-prompt 2 --out digits.png
  python scripts/manage.py scale --workers 2
  scripts/stop.sh
USAGE
