import base64
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler
from PIL import Image
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

from handlers.torchserve.handler import DiffusersHandler
from tests.conftest import SMALL, attach_requests, make_context, zip_directory
from tests.unit.helpers import UNetBatchSizes, decode_numpy_response, run, run_json, serve


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def served_combined(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir, batching="combined")


def test_initialize_loads_the_pipeline_on_cpu_in_float32(served):
    handler, _ = served
    assert handler.initialized
    assert handler.service.device.type == "cpu"
    assert str(handler.service.pipeline.unet.dtype) == "torch.float32"
    assert handler.service.pipeline._progress_bar_config == {"disable": True}
    assert handler.service.generator.combine_requests is False  # auto on CPU


def test_built_in_defaults_apply_when_the_model_config_sets_none(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, {})
    handler = DiffusersHandler()
    handler.initialize(context)
    defaults = handler.config.generation_defaults
    assert (defaults.guidance_scale, defaults.num_inference_steps, defaults.height, defaults.width) == (7.5, 50, 768, 768)


def test_response_is_the_compact_numpy_list(served):
    handler, context = served
    [body] = run(handler, context, [{"body": "a cat"}], ["text/plain"])
    assert isinstance(body, bytes) and b"\n" not in body and b", " not in body
    assert decode_numpy_response(body).shape == (64, 64, 3)
    assert context.get_response_content_type(0) == "application/json"
    assert int(context.get_response_headers(0)["X-Seed"]) >= 0


@pytest.mark.parametrize("output_format, content_type, pil_format", [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_image_formats_are_raw_bytes_with_their_content_type(served, output_format, content_type, pil_format):
    handler, context = served
    [body] = run_json(handler, context, {"prompt": "a cat", "output_format": output_format, "width": 96})
    assert context.get_response_content_type(0) == content_type
    image = Image.open(io.BytesIO(body))
    assert (image.format, image.size) == (pil_format, (96, 64))


def test_png_pixels_equal_the_numpy_pixels(served):
    handler, context = served
    [png] = run_json(handler, context, {"prompt": "a cat", "seed": 5, "output_format": "png"})
    [listed] = run_json(handler, context, {"prompt": "a cat", "seed": 5})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), decode_numpy_response(listed))


def test_jpeg_quality_changes_the_size(served):
    handler, context = served
    low, high = run_json(
        handler, context, {"prompt": "a cat", "seed": 1, "output_format": "jpeg", "quality": 10},
        {"prompt": "a cat", "seed": 1, "output_format": "jpeg", "quality": 95},
    )
    assert len(low) < len(high)


def test_json_format_carries_images_seeds_and_parameters(served):
    handler, context = served
    [body] = run_json(handler, context, {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "seed": 10, "output_format": "json"})
    document = json.loads(body)
    assert context.get_response_content_type(0) == "application/json"
    assert document["seeds"] == [10, 11, 12, 13]
    assert document["content_type"] == "image/png"
    assert document["parameters"]["prompt"] == ["a cat", "a dog"]
    assert document["parameters"]["num_inference_steps"] == 4
    images = [Image.open(io.BytesIO(base64.b64decode(image))) for image in document["images"]]
    assert [image.size for image in images] == [(64, 64)] * 4
    assert len({image.tobytes() for image in images}) == 4


def test_several_images_in_an_image_format_come_as_the_json_document(served):
    handler, context = served
    [body] = run_json(handler, context, {"prompt": "a cat", "num_images_per_prompt": 2, "output_format": "jpeg"})
    document = json.loads(body)
    assert document["content_type"] == "image/jpeg"
    assert all(Image.open(io.BytesIO(base64.b64decode(image))).format == "JPEG" for image in document["images"])


def test_several_images_in_numpy_format_are_a_list_of_images(served):
    handler, context = served
    [body] = run_json(handler, context, {"prompt": "a cat", "num_images_per_prompt": 3})
    assert decode_numpy_response(body).shape == (3, 64, 64, 3)


def test_accept_header_chooses_the_format(served):
    handler, context = served
    [body] = run_json(handler, context, {"prompt": "a cat"}, accept="image/webp")
    assert context.get_response_content_type(0) == "image/webp"
    assert Image.open(io.BytesIO(body)).format == "WEBP"


@pytest.mark.parametrize("position", range(4))
def test_same_seed_gives_identical_pixels_in_any_batch_position(served, position):
    handler, context = served
    target = {"prompt": "a lighthouse", "seed": 99, "output_format": "png"}
    [alone] = run_json(handler, context, target)
    neighbours = [{"prompt": f"neighbour {index}", "seed": index, "output_format": "png"} for index in range(3)]
    batch = neighbours[:position] + [target] + neighbours[position:]
    assert run_json(handler, context, *batch)[position] == alone


def test_per_request_batching_runs_one_pipeline_call_per_request(served):
    handler, context = served
    with UNetBatchSizes(handler) as sizes:
        run_json(handler, context, *({"prompt": f"p{index}", "seed": index} for index in range(3)))
    assert set(sizes) == {2}  # one prompt, doubled for classifier-free guidance


def test_combined_batching_shares_pipeline_calls_between_compatible_requests(served_combined):
    handler, context = served_combined
    bodies = [
        {"prompt": "a", "seed": 1},
        {"prompt": "b", "seed": 2, "width": 96},
        {"prompt": "c", "seed": 3, "num_images_per_prompt": 2},
        {"prompt": "d", "seed": 4, "scheduler": "euler"},
    ]
    with UNetBatchSizes(handler) as sizes:
        responses = run_json(handler, context, *bodies)
    steps = SMALL["num_inference_steps"]
    # a and c share one call (3 images, x2 for guidance); b (size) and d (scheduler) run alone.
    assert sorted(sizes) == sorted([6] * steps + [2] * steps + [2] * steps)
    shapes = [decode_numpy_response(body).shape for body in responses]
    assert shapes == [(64, 64, 3), (64, 96, 3), (2, 64, 64, 3), (64, 64, 3)]


class SamplerSteps:
    """Records which scheduler class takes each denoising step, through a wrapper on the real `step`."""

    def __init__(self, monkeypatch, *scheduler_classes):
        self.classes: list[str] = []
        for scheduler_class in scheduler_classes:
            monkeypatch.setattr(scheduler_class, "step", self.recording(scheduler_class.step))

    def recording(self, step):
        def recorded(scheduler, *args, **kwargs):
            self.classes.append(type(scheduler).__name__)
            return step(scheduler, *args, **kwargs)

        return recorded


def test_a_scheduler_choice_runs_that_sampler_and_does_not_leak(served, monkeypatch):
    handler, context = served
    base_scheduler = type(handler.service.pipeline.scheduler)
    steps = SamplerSteps(monkeypatch, base_scheduler, EulerDiscreteScheduler)
    [default_before] = run_json(handler, context, {"prompt": "a cat", "seed": 3})
    assert steps.classes == [base_scheduler.__name__] * SMALL["num_inference_steps"]
    steps.classes.clear()
    [euler] = run_json(handler, context, {"prompt": "a cat", "seed": 3, "scheduler": "euler"})
    assert steps.classes == ["EulerDiscreteScheduler"] * SMALL["num_inference_steps"]
    steps.classes.clear()
    [default_after] = run_json(handler, context, {"prompt": "a cat", "seed": 3})
    assert steps.classes == [base_scheduler.__name__] * SMALL["num_inference_steps"]
    assert euler != default_before
    assert default_after == default_before
    assert type(handler.service.pipeline.scheduler) is base_scheduler


def test_negative_prompt_changes_the_image(served):
    handler, context = served
    plain, negative = run_json(
        handler, context, {"prompt": "a cat", "seed": 3}, {"prompt": "a cat", "seed": 3, "negative_prompt": "dark"}
    )
    assert plain != negative


def test_one_bad_request_does_not_fail_its_batch(served):
    handler, context = served
    rows = [{"body": "a cat"}, {}, {"body": {"prompt": "a dog", "num_inference_steps": 999}}, {"body": "a bird"}]
    bodies = run(handler, context, rows, ["text/plain", None, "application/json", "text/plain"])
    assert len(bodies) == 4
    assert [context.get_response_status(index)[0] for index in range(4)] == [200, 400, 400, 200]
    assert json.loads(bodies[1])["field"] == "prompt"
    assert json.loads(bodies[2])["field"] == "num_inference_steps"
    assert decode_numpy_response(bodies[0]).shape == decode_numpy_response(bodies[3]).shape == (64, 64, 3)


def test_kserve_v1_envelope_answers_each_instance(tiny_pipeline_dir):
    handler, context = serve(tiny_pipeline_dir, service_envelope="kserve")
    envelope = KServeEnvelope(handler.handle)
    attach_requests(context, [None])
    body = {"instances": [{"data": "a cat", "seed": 1}, "a dog", {"prompt": "x", "height": 5}]}
    [response] = envelope.handle([{"body": body}], context)
    cat, dog, bad = response["predictions"]
    assert np.array(cat, dtype="uint8").shape == np.array(dog, dtype="uint8").shape == (64, 64, 3)
    assert bad["field"] == "height"
    json.dumps(response)  # TorchServe serialises it as JSON


def test_kserve_v2_envelope_merges_named_inputs(tiny_pipeline_dir):
    handler, context = serve(tiny_pipeline_dir, service_envelope="kservev2")
    envelope = KServev2Envelope(handler.handle)
    attach_requests(context, [None])
    body = {
        "id": "42",
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
            {"name": "output_format", "shape": [1], "datatype": "BYTES", "data": ["json"]},
        ],
    }
    [response] = envelope.handle([{"body": body}], context)
    assert response["id"] == "42"
    [output] = response["outputs"]
    document = output["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(document["images"][0]))).size == (64, 64)
    json.dumps(response)


class LoggingHandler(DiffusersHandler):
    """A user's subclass that overrides handle, as TorchServe's docs suggest for logging or auth."""

    def handle(self, data, context):
        self.calls = getattr(self, "calls", 0) + 1
        return super().handle(data, context)


@pytest.mark.parametrize("envelope", ["none", "kserve"])
def test_the_envelope_setting_holds_for_a_subclass_that_overrides_handle(tiny_pipeline_dir, envelope):
    context = make_context(tiny_pipeline_dir, {**SMALL, "service_envelope": envelope, "output_format": "png"})
    handler = LoggingHandler()
    handler.initialize(context)
    if envelope == "kserve":
        attach_requests(context, [None])
        [response] = KServeEnvelope(handler.handle).handle([{"body": {"instances": ["a cat"]}}], context)
        [document] = response["predictions"]
        assert Image.open(io.BytesIO(base64.b64decode(document["images"][0]))).format == "PNG"
        json.dumps(response)
    else:
        [body] = run(handler, context, [{"body": "a cat"}], ["text/plain"])
        assert Image.open(io.BytesIO(body)).format == "PNG"  # raw bytes, not a JSON value
    assert handler.calls == 1


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


class WritesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_weights_are_never_opened_by_default(tmp_path, tiny_pipeline_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model_dir)
    marker = tmp_path / "pickle-ran"
    for weights in (model_dir / "vae").glob("*.safetensors"):
        weights.unlink()
        (weights.with_suffix(".bin")).write_bytes(pickle.dumps(WritesAFileWhenUnpickled(marker)))
    handler = DiffusersHandler()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors"):
        handler.initialize(make_context(model_dir, SMALL))
    assert not marker.exists()


@pytest.mark.parametrize(
    "setting, reference, message",
    [
        ("loras", "/etc", "leads outside the archive"),
        ("loras", "../../outside", "leads outside the archive"),
        ("controlnets", "lllyasviel/sd-controlnet-canny", "is not in the archive"),
        ("refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", "is not in the archive"),
    ],
)
def test_handler_section_paths_must_stay_inside_the_archive(tiny_pipeline_dir, setting, reference, message):
    value = reference if setting == "refiner" else {"extra": reference}
    handler = DiffusersHandler()
    with pytest.raises(ValueError, match=message):
        handler.initialize(make_context(tiny_pipeline_dir, {**SMALL, setting: value}))


def test_a_link_inside_the_archive_that_leads_out_is_refused(tmp_path, tiny_pipeline_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model_dir)
    (model_dir / "loras").mkdir()
    (model_dir / "loras" / "style").symlink_to(tmp_path)
    handler = DiffusersHandler()
    with pytest.raises(ValueError, match="leads outside the archive"):
        handler.initialize(make_context(model_dir, {**SMALL, "loras": {"style": "loras/style"}}))


def test_kserve_instances_share_the_per_request_caps(tiny_pipeline_dir):
    handler, context = serve(tiny_pipeline_dir, service_envelope="kserve")
    attach_requests(context, [None])
    body = {"instances": [{"prompt": "a cat", "num_images_per_prompt": 4}] * 5}  # 20 images over 5 instances
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    [error] = response["predictions"]
    assert error["field"] == "instances" and "20 images" in error["error"]
    assert context.get_response_status(0)[0] == 413


def test_defaults_that_break_the_models_own_limits_stop_it_at_start_up(tiny_pipeline_dir):
    handler = DiffusersHandler()
    # TorchServe's own default max_response_size cannot hold one 768x768 image as a numpy list.
    with pytest.raises(ValueError, match="defaults break its own limits.*max_response_size"):
        handler.initialize(make_context(tiny_pipeline_dir, {"max_response_bytes": 6_553_500}))
