#!/bin/sh
# What pytorch/torchserve-kfs's entrypoint does: run the command KServe's TorchServe runtime passes
# (torchserve --start ... --ts-config /mnt/models/config/config.properties), which starts TorchServe in
# the background, then the KServe wrapper, which waits for the model to be READY and serves KServe's
# protocols on port 8080 (through diffusers_wrapper.py, which adds the request schema as KServe v2's model
# metadata). exec: the wrapper, not this shell, is what tini supervises.
set -e
"$@"
exec python /home/model-server/kserve_wrapper/diffusers_wrapper.py
