import json

import numpy as np
import pytest

from handlers.handler import DiffusersHandler
from tests.conftest import attach_requests, make_context, zip_directory

SMALL = {"height": 64, "width": 64, "num_inference_steps": 4}


def decode_numpy_response(body: str) -> np.ndarray:
    """What the pytorch/serve example's client does with a response."""
    return np.array(json.loads(body), dtype="uint8")


def run(handler, context, rows, body_types=None):
    attach_requests(context, body_types or [None] * len(rows))
    return handler.handle(rows, context)


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, SMALL, batch_size=4)
    handler = DiffusersHandler()
    handler.initialize(context)
    return handler, context


def test_initialize_loads_the_pipeline_on_cpu_in_float32(served):
    handler, _ = served
    assert handler.initialized
    assert handler.device.type == "cpu"
    assert handler.pipeline.unet.dtype.is_floating_point and str(handler.pipeline.unet.dtype) == "torch.float32"
    assert handler.pipeline._progress_bar_config == {"disable": True}


def test_built_in_defaults_apply_when_the_model_config_sets_none(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, {})
    handler = DiffusersHandler()
    handler.initialize(context)
    defaults = handler.config.generation_defaults
    assert (defaults.guidance_scale, defaults.num_inference_steps, defaults.height, defaults.width) == (7.5, 50, 768, 768)


def test_response_is_the_compact_numpy_list(served):
    handler, context = served
    [body] = run(handler, context, [{"body": "a cat"}], ["text/plain"])
    assert isinstance(body, str) and "\n" not in body and ", " not in body
    assert decode_numpy_response(body).shape == (64, 64, 3)
    assert context.get_response_content_type(0) == "application/json"
    assert int(context.get_response_headers(0)["X-Seed"]) >= 0


def test_batch_answers_each_request_in_order(served):
    handler, context = served
    rows = [{"body": {"prompt": prompt, "seed": seed}} for prompt, seed in [("a cat", 1), ("a dog", 2), ("a house", 3)]]
    batched = [decode_numpy_response(body).astype(int) for body in run(handler, context, rows, ["application/json"] * 3)]
    alone = [decode_numpy_response(run(handler, context, [row], ["application/json"])[0]).astype(int) for row in rows]
    assert len(batched) == 3
    for index, image in enumerate(batched):
        distances = [np.abs(image - solo).max() for solo in alone]
        # CPU kernels are not bit-identical across batch sizes: one grey level of rounding is tolerated,
        # while another request's image differs by far more.
        assert distances[index] <= 1
        assert all(distance > 20 for other, distance in enumerate(distances) if other != index)


def test_one_bad_request_does_not_fail_its_batch(served):
    handler, context = served
    rows = [{"body": "a cat"}, {}, {"body": {"prompt": "a dog", "num_inference_steps": 999}}, {"body": "a bird"}]
    bodies = run(handler, context, rows, ["text/plain", None, "application/json", "text/plain"])
    assert len(bodies) == 4
    assert [context.get_response_status(index)[0] for index in range(4)] == [200, 400, 400, 200]
    assert json.loads(bodies[1])["field"] == "prompt"
    assert json.loads(bodies[2])["field"] == "num_inference_steps"
    assert decode_numpy_response(bodies[0]).shape == decode_numpy_response(bodies[3]).shape == (64, 64, 3)


def test_example_layout_with_model_zip_is_served(tmp_path, tiny_pipeline_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    zip_directory(tiny_pipeline_dir, model_dir / "model.zip")
    context = make_context(model_dir, SMALL)
    handler = DiffusersHandler()
    handler.initialize(context)
    [body] = run(handler, context, [{"body": bytearray(b"a cat")}])
    assert decode_numpy_response(body).shape == (64, 64, 3)
    assert list((model_dir / ".unpacked").glob("*/model_index.json"))
