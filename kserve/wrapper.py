"""TorchServe's KServe wrapper (fetched at build time beside this file), with the model's request schema as
KServe v2's model metadata: `GET /v2/models/<name>` lists every request field as an input, instead of
nothing. The entrypoint runs this in place of the wrapper's own __main__.py."""

import runpy
import sys
from pathlib import Path

WRAPPER = Path(__file__).resolve().parent
sys.path.insert(0, str(WRAPPER))

import TorchserveModel  # noqa: E402 - the wrapper's module, beside this file in the image

from handlers.torchserve.kserve import v2_metadata  # noqa: E402

INPUTS, OUTPUTS = v2_metadata()
TorchserveModel.TorchserveModel.get_input_types = lambda self: INPUTS
TorchserveModel.TorchserveModel.get_output_types = lambda self: OUTPUTS

if __name__ == "__main__":
    runpy.run_path(str(WRAPPER / "__main__.py"), run_name="__main__")
