#!/bin/sh
# What pytorch/torchserve-kfs's entrypoint does: run the command KServe's TorchServe runtime passes
# (torchserve --start ... --ts-config /mnt/models/config/config.properties), which starts TorchServe in
# the background, then the KServe wrapper, which waits for the model to be READY and serves KServe's
# protocols on port 8080. exec: the wrapper, not this shell, is what tini supervises.
set -e
"$@"
exec python /home/model-server/kserve_wrapper/__main__.py
