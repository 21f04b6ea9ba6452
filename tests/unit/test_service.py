"""The core's DiffusionService on a tiny real pipeline: loading, answers in every format, seeds, batching,
samplers, and a bad request among good ones."""

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler
from PIL import Image

from handlers.core.config import HandlerConfig
from handlers.core.service import DiffusionService
from tests.conftest import SMALL, zip_directory
from tests.unit.helpers import UNetBatchSizes, document_images, numpy_image, serve


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def served_combined(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir, batching="combined")


def test_the_service_loads_the_pipeline_on_cpu_in_float32(served):
    service = served.service
    assert service.device.type == "cpu"
    assert str(service.pipeline.unet.dtype) == "torch.float32"
    assert service.pipeline._progress_bar_config == {"disable": True}
    assert service.generator.combine_requests is False  # auto on CPU


def test_built_in_defaults_apply_when_the_model_config_sets_none():
    defaults = HandlerConfig().generation_defaults
    assert (defaults.guidance_scale, defaults.num_inference_steps, defaults.height, defaults.width) == (7.5, 50, 768, 768)


def test_the_answer_is_the_compact_numpy_list(served):
    [answer] = served.post("a cat", content_type="text/plain")
    assert isinstance(answer.body, bytes) and b"\n" not in answer.body and b", " not in answer.body
    assert numpy_image(answer).shape == (64, 64, 3)
    assert answer.content_type == "application/json"
    assert int(answer.headers["X-Seed"]) >= 0


@pytest.mark.parametrize("output_format, content_type, pil_format",
                         [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_image_formats_are_raw_bytes_with_their_content_type(served, output_format, content_type, pil_format):
    [answer] = served.post({"prompt": "a cat", "output_format": output_format, "width": 96})
    assert answer.content_type == content_type
    image = Image.open(io.BytesIO(answer.body))
    assert (image.format, image.size) == (pil_format, (96, 64))


def test_png_pixels_equal_the_numpy_pixels(served):
    [png] = served.post({"prompt": "a cat", "seed": 5, "output_format": "png"})
    [listed] = served.post({"prompt": "a cat", "seed": 5})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.body))), numpy_image(listed))


def test_jpeg_quality_changes_the_size(served):
    low, high = served.post({"prompt": "a cat", "seed": 1, "output_format": "jpeg", "quality": 10},
                            {"prompt": "a cat", "seed": 1, "output_format": "jpeg", "quality": 95})
    assert len(low.body) < len(high.body)


def test_json_format_carries_images_seeds_and_parameters(served):
    [answer] = served.post({"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "seed": 10, "output_format": "json"})
    document = json.loads(answer.body)
    assert answer.content_type == "application/json"
    assert document["seeds"] == [10, 11, 12, 13]
    assert document["content_type"] == "image/png"
    assert document["parameters"]["prompt"] == ["a cat", "a dog"]
    assert document["parameters"]["num_inference_steps"] == 4
    images = document_images(answer)
    assert [image.size for image in images] == [(64, 64)] * 4
    assert len({image.tobytes() for image in images}) == 4


def test_several_images_in_an_image_format_come_as_the_json_document(served):
    [answer] = served.post({"prompt": "a cat", "num_images_per_prompt": 2, "output_format": "jpeg"})
    assert json.loads(answer.body)["content_type"] == "image/jpeg"
    assert all(image.format == "JPEG" for image in document_images(answer))


def test_several_images_in_numpy_format_are_a_list_of_images(served):
    [answer] = served.post({"prompt": "a cat", "num_images_per_prompt": 3})
    assert numpy_image(answer).shape == (3, 64, 64, 3)


def test_the_accept_header_chooses_the_format(served):
    [answer] = served.post({"prompt": "a cat"}, accept="image/webp")
    assert answer.content_type == "image/webp"
    assert Image.open(io.BytesIO(answer.body)).format == "WEBP"


@pytest.mark.parametrize("position", range(4))
def test_same_seed_gives_identical_pixels_in_any_batch_position(served, position):
    target = {"prompt": "a lighthouse", "seed": 99, "output_format": "png"}
    [alone] = served.post(target)
    neighbours = [{"prompt": f"neighbour {index}", "seed": index, "output_format": "png"} for index in range(3)]
    batch = neighbours[:position] + [target] + neighbours[position:]
    assert served.post(*batch)[position].body == alone.body


def test_per_request_batching_runs_one_pipeline_call_per_request(served):
    with UNetBatchSizes(served) as sizes:
        served.post(*({"prompt": f"p{index}", "seed": index} for index in range(3)))
    assert set(sizes) == {2}  # one prompt, doubled for classifier-free guidance


def test_combined_batching_shares_pipeline_calls_between_compatible_requests(served_combined):
    bodies = [
        {"prompt": "a", "seed": 1},
        {"prompt": "b", "seed": 2, "width": 96},
        {"prompt": "c", "seed": 3, "num_images_per_prompt": 2},
        {"prompt": "d", "seed": 4, "scheduler": "euler"},
    ]
    with UNetBatchSizes(served_combined) as sizes:
        answers = served_combined.post(*bodies)
    steps = SMALL["num_inference_steps"]
    # a and c share one call (3 images, x2 for guidance); b (size) and d (scheduler) run alone.
    assert sorted(sizes) == sorted([6] * steps + [2] * steps + [2] * steps)
    assert [numpy_image(answer).shape for answer in answers] == [(64, 64, 3), (64, 96, 3), (2, 64, 64, 3), (64, 64, 3)]


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
    base_scheduler = type(served.service.pipeline.scheduler)
    steps = SamplerSteps(monkeypatch, base_scheduler, EulerDiscreteScheduler)
    [default_before] = served.post({"prompt": "a cat", "seed": 3})
    assert steps.classes == [base_scheduler.__name__] * SMALL["num_inference_steps"]
    steps.classes.clear()
    [euler] = served.post({"prompt": "a cat", "seed": 3, "scheduler": "euler"})
    assert steps.classes == ["EulerDiscreteScheduler"] * SMALL["num_inference_steps"]
    steps.classes.clear()
    [default_after] = served.post({"prompt": "a cat", "seed": 3})
    assert steps.classes == [base_scheduler.__name__] * SMALL["num_inference_steps"]
    assert euler.body != default_before.body
    assert default_after.body == default_before.body
    assert type(served.service.pipeline.scheduler) is base_scheduler


def test_a_negative_prompt_changes_the_image(served):
    plain, negative = served.post({"prompt": "a cat", "seed": 3}, {"prompt": "a cat", "seed": 3, "negative_prompt": "dark"})
    assert plain.body != negative.body


def test_one_bad_request_does_not_fail_its_batch(served):
    answers = served.answer([
        lambda: {"prompt": "a cat"},
        lambda: {},
        lambda: {"prompt": "a dog", "num_inference_steps": 999},
        lambda: {"prompt": "a bird"},
    ])
    assert [answer.status for answer in answers] == [200, 400, 400, 200]
    assert answers[1].error["field"] == "prompt"
    assert answers[2].error["field"] == "num_inference_steps"
    assert numpy_image(answers[0]).shape == numpy_image(answers[3]).shape == (64, 64, 3)


def test_the_examples_layout_with_model_zip_is_served(tmp_path, tiny_pipeline_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    zip_directory(tiny_pipeline_dir, model_dir / "model.zip")
    [answer] = serve(model_dir).post(b"a cat", content_type=None)
    assert numpy_image(answer).shape == (64, 64, 3)
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
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors"):
        serve(model_dir)
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
    with pytest.raises(ValueError, match=message):
        serve(tiny_pipeline_dir, **{setting: value})


def test_a_link_inside_the_archive_that_leads_out_is_refused(tmp_path, tiny_pipeline_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model_dir)
    (model_dir / "loras").mkdir()
    (model_dir / "loras" / "style").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="leads outside the archive"):
        serve(model_dir, loras={"style": "loras/style"})


def test_defaults_that_break_the_models_own_limits_stop_it_at_start_up(tiny_pipeline_dir):
    # TorchServe's own default max_response_size cannot hold one 768x768 image as a numpy list.
    with pytest.raises(ValueError, match="defaults break its own limits.*max_response_size"):
        DiffusionService(tiny_pipeline_dir, HandlerConfig(max_response_bytes=6_553_500))


def test_the_description_is_the_request_schema_with_the_models_defaults(served):
    description = served.service.describe()
    properties = description["request"]["properties"]
    assert properties["num_inference_steps"]["default"] == SMALL["num_inference_steps"]
    assert properties["num_inference_steps"]["maximum"] == 150
    assert description["request"]["required"] == ["prompt"]
    assert description["limits"]["max_pixels"] == 1536 * 1536
    json.dumps(description)
