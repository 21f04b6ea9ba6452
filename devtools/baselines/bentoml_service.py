"""The second baseline: a diffusers pipeline served the way BentoML's own documentation serves one.

A service class loads the pipeline once, and a typed API method runs it and returns a PIL image,
which BentoML encodes as PNG. `scripts/bench.py` starts it on loopback with the same pipeline
directory as our archive:

  BENTO_PIPELINE_DIR=<dir> bentoml serve bentoml_service:DiffusersService --host 127.0.0.1 --port <port>
"""

import os

import bentoml
from annotated_types import Ge, Le
from PIL.Image import Image
from typing_extensions import Annotated

PIPELINE_DIR = os.environ["BENTO_PIPELINE_DIR"]


@bentoml.service(traffic={"timeout": 600}, workers=1)
class DiffusersService:
    def __init__(self) -> None:
        import torch
        from diffusers import DiffusionPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = DiffusionPipeline.from_pretrained(PIPELINE_DIR, torch_dtype=dtype, use_safetensors=True).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    @bentoml.api
    def txt2img(
        self,
        prompt: str,
        num_inference_steps: Annotated[int, Ge(1), Le(150)] = 25,
        guidance_scale: float = 7.5,
        height: int = 64,
        width: int = 64,
    ) -> Image:
        return self.pipe(
            prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width,
        ).images[0]
