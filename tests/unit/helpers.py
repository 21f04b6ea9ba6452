"""Calling the core the way an engine does (read, generate, answer), and watching the real pipeline run."""

import base64
import io
import json
import re
import sys
import weakref
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from handlers.core.answers import Answer, progress_line
from handlers.core.bodies import fields_from_body, fields_from_form
from handlers.core.config import HandlerConfig
from handlers.core.service import DiffusionService
from tests.conftest import SMALL


class Client:
    """Sends bodies through one DiffusionService as one batch, and collects each one's Answer."""

    def __init__(self, service: DiffusionService):
        self.service = service

    def post(self, *bodies, content_type: str = "application/json", accept: str | None = None,
             stream_to: list | None = None) -> list[Answer]:
        """Bodies as an engine hands them over: dicts are parsed JSON, str is text, bytes are raw.
        stream_to collects each streaming request's progress lines."""
        return self.answer([lambda body=body: fields_from_body(body, content_type) for body in bodies], accept, stream_to)

    def post_form(self, *forms: dict) -> list[Answer]:
        return self.answer([lambda form=form: fields_from_form(form) for form in forms])

    def answer(self, readers, accept: str | None = None, stream_to: list | None = None) -> list[Answer]:
        requests = [self.service.read(read, accept, f"request-{index}") for index, read in enumerate(readers)]

        def on_step(group, step, total, elapsed):
            stream_to.extend(json.loads(progress_line(step, total, elapsed)) for request in group if request.stream)

        results = self.service.generate(requests, on_step if stream_to is not None else None)
        return [self.service.answer(request, result, f"request-{index}")
                for index, (request, result) in enumerate(zip(requests, results))]


def serve(model_dir: Path, gpu_id: int | None = None, **handler_section) -> Client:
    """A service on a model directory, with small defaults unless handler_section says otherwise."""
    return Client(DiffusionService(model_dir, HandlerConfig(**{**SMALL, **handler_section}), gpu_id, model_name="tiny"))


def served_family(model_dir: Path, **handler_section) -> Client:
    """A service on an archiver-built model directory, with its model-config.yaml handler section."""
    section = yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]
    return serve(model_dir, **{**section, **handler_section})


def numpy_image(answer: Answer) -> np.ndarray:
    """What the pytorch/serve example's client does with a response."""
    assert answer.status == 200, answer.body
    return np.array(json.loads(answer.body), dtype="uint8")


def pixels(image: Answer | bytes) -> np.ndarray:
    """An image answer's (or an encoded image's) pixels."""
    if isinstance(image, Answer):
        assert image.status == 200, image.body
        image = image.body
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(int)


def document_images(answer: Answer) -> list[Image.Image]:
    """The images of a json document (or of a stream's last line)."""
    document = json.loads(answer.body)
    return [Image.open(io.BytesIO(base64.b64decode(image))) for image in document["images"]]


class UNetBatchSizes:
    """Records the batch size of every UNet forward pass, through a real forward hook."""

    def __init__(self, client: Client, module=None):
        self.sizes = []
        self.hook = (module or client.service.pipeline.unet).register_forward_pre_hook(self.record)

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


def progress_lines(sent: bytes) -> list[dict]:
    """The JSON progress lines inside TorchServe's binary response frames."""
    lines = re.findall(rb'\{"step":[^}]*\}\n', sent)
    return [json.loads(line) for line in lines]


class OutOfMemoryAbove:
    """Makes the real UNet raise an out-of-memory error for batches larger than `limit`.

    At every call it lets through, it records whether an exception was being handled and whether
    the refused call's input still lived: a retry inside the `except` block keeps both.
    """

    def __init__(self, unet, limit, error=torch.OutOfMemoryError):
        self.limit, self.error = limit, error
        self.refused: list[weakref.ref] = []
        self.handling: list[type | None] = []
        self.refused_alive: list[bool] = []
        self.hook = unet.register_forward_pre_hook(self.check)

    def check(self, module, args):
        if args[0].shape[0] > self.limit:
            self.refused.append(weakref.ref(args[0]))
            raise self.error("out of memory (simulated)")
        self.handling.append(sys.exc_info()[0])
        self.refused_alive.append(any(reference() is not None for reference in self.refused))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def fine_tuned(weights: Path, target: Path) -> None:
    """weights with every value moved a little: the same tensors, header and size, as a fine-tune saves them."""
    with safe_open(weights, "pt") as stored:
        tensors = {name: stored.get_tensor(name) + 0.01 for name in stored.keys()}
        metadata = stored.metadata()
    save_file(tensors, target, metadata)
