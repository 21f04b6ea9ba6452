"""Calling the handler the way a TorchServe worker does, and watching the real pipeline run."""

import base64
import io
import json
import re
import socket

import numpy as np
import yaml
from PIL import Image

from handlers.handler import DiffusersHandler
from tests.conftest import SMALL, attach_requests, make_context


def decode_numpy_response(body: str) -> np.ndarray:
    """What the pytorch/serve example's client does with a response."""
    return np.array(json.loads(body), dtype="uint8")


def run(handler, context, rows, body_types=None, headers=None):
    attach_requests(context, body_types or [None] * len(rows), headers)
    return handler.handle(rows, context)


def run_json(handler, context, *bodies, accept=None):
    return run(handler, context, [{"body": body} for body in bodies], ["application/json"] * len(bodies),
               [{"Accept": accept}] * len(bodies) if accept else None)


def serve(pipeline_dir, gpu_id=None, **handler_section):
    context = make_context(pipeline_dir, {**SMALL, **handler_section}, batch_size=4, gpu_id=gpu_id)
    handler = DiffusersHandler()
    handler.initialize(context)
    return handler, context


class UNetBatchSizes:
    """Records the batch size of every UNet forward pass, through a real forward hook."""

    def __init__(self, handler, module=None):
        self.sizes = []
        self.hook = (module or handler.service.pipeline.unet).register_forward_pre_hook(self.record)

    def record(self, module, args):
        self.sizes.append(args[0].shape[0])

    def __enter__(self):
        return self.sizes

    def __exit__(self, *exc):
        self.hook.remove()


def png_base64(size=(64, 64), color=(200, 30, 30), mode="RGB") -> str:
    return image_base64(Image.new(mode, size, color))


def image_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)


def served_family(model_dir, **handler_section):
    """A handler on an archiver-built model directory, with its model-config.yaml handler section."""
    section = yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]
    return serve(model_dir, **{**section, **handler_section})


class WorkerSocket:
    """The socket a TorchServe worker writes intermediate responses to; the frontend end is readable."""

    def __init__(self, context):
        self.worker, self.frontend = socket.socketpair()
        context.cl_socket = self.worker
        self.frontend.setblocking(False)

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.frontend.recv(1 << 20))
            except BlockingIOError:
                return b"".join(chunks)

    def close(self):
        self.worker.close()
        self.frontend.close()


def progress_lines(sent: bytes) -> list[dict]:
    """The JSON progress lines inside TorchServe's binary response frames."""
    lines = re.findall(rb'\{"step":[^}]*\}\n', sent)
    return [json.loads(line) for line in lines]
