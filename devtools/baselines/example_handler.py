"""BASELINE for scripts/bench.py, not for serving: the pytorch/serve examples/diffusers handler.

Rewritten from its description in shared/reference.md so the benchmark can serve it the same way
as ours. It keeps that example's behaviour on purpose, flaws included: it unzips model.zip in
every worker with no path checks, uses fixed parameters, loads in fp32, leaves the progress bar
on, and answers with `.tolist()`, which TorchServe serialises with json.dumps(indent=2). One
difference: the benchmark may set its fixed parameters (`fixed_parameters:` in its model-config.yaml),
so that it runs at the size and steps ours is measured at.
"""

import logging
import os
import zipfile

import numpy as np
import torch
from diffusers import DiffusionPipeline
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

# The example's fixed parameters.
FIXED_PARAMETERS = dict(guidance_scale=7.5, num_inference_steps=50, height=768, width=768)


class BaselineDiffusersHandler(BaseHandler):
    def initialize(self, ctx):
        properties = ctx.system_properties
        model_dir = properties.get("model_dir")
        self.device = torch.device(
            f"cuda:{properties.get('gpu_id')}" if torch.cuda.is_available() and properties.get("gpu_id") is not None else "cpu"
        )
        with zipfile.ZipFile(os.path.join(model_dir, "model.zip"), "r") as archive:
            archive.extractall(os.path.join(model_dir, "model"))
        self.pipe = DiffusionPipeline.from_pretrained(os.path.join(model_dir, "model"))
        self.pipe.to(self.device)
        self.parameters = {**FIXED_PARAMETERS, **(ctx.model_yaml_config or {}).get("fixed_parameters", {})}
        self.initialized = True

    def preprocess(self, requests):
        inputs = []
        for data in requests:
            text = data.get("data") or data.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            inputs.append(text)
        return inputs

    def inference(self, inputs):
        return self.pipe(inputs, **self.parameters).images

    def postprocess(self, inference_output):
        return [np.array(image).tolist() for image in inference_output]
