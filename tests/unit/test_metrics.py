"""The handler's metrics: declared in handlers/metrics.yaml, emitted as TorchServe metric lines per request."""

import logging
import re

import pytest
import yaml

from handlers.metrics import DECLARATIONS
from tests.unit.helpers import png_base64, run_json, serve

METRIC_LINE = re.compile(r"\[METRICS\](?P<name>\w+)\.(?P<unit>\w+):(?P<value>[\d.]+)\|#(?P<labels>[^|]*)\|#type:(?P<type>\w+)")


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir):
    return serve(tiny_pipeline_dir)


def emitted(caplog) -> list[dict]:
    lines = [METRIC_LINE.search(record.getMessage()) for record in caplog.records]
    return [
        {**match.groupdict(), "value": float(match["value"]), "labels": dict(pair.split(":", 1) for pair in match["labels"].split(","))}
        for match in lines
        if match
    ]


def test_metrics_yaml_declares_the_six_metrics_all_counters():
    declared = yaml.safe_load(DECLARATIONS.read_text())["model_metrics"]
    names = {spec["name"]: kind for kind, specs in declared.items() for spec in specs}
    assert names == {
        "diffusion_images_generated": "counter",
        "diffusion_pixels_generated": "counter",
        "diffusion_errors": "counter",
        "diffusion_requests": "counter",
        "diffusion_denoising_steps": "counter",
        "diffusion_generation_seconds": "counter",
    }


def test_each_request_emits_its_images_steps_time_pixels_and_errors(served, caplog):
    handler, context = served
    caplog.set_level(logging.INFO)
    run_json(
        handler,
        context,
        {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "width": 96, "num_inference_steps": 3},
        {"prompt": "a cat", "num_inference_steps": 1000},
        {"prompt": "a cat", "width": 2048, "height": 2048},  # over max_pixels: 413
        {"prompt": "a red square", "image": png_base64(), "strength": 0.5, "num_inference_steps": 4},
    )
    metrics = emitted(caplog)
    by_name = {}
    for metric in metrics:
        by_name.setdefault(metric["name"], []).append(metric)

    txt2img, img2img = by_name["diffusion_images_generated"]
    assert (txt2img["value"], txt2img["labels"]) == (4, {"ModelName": "tiny", "Task": "txt2img"})
    assert (img2img["value"], img2img["labels"]["Task"]) == (1, "img2img")
    assert [metric["value"] for metric in by_name["diffusion_pixels_generated"]] == [4 * 96 * 64, 64 * 64]
    assert [metric["value"] for metric in by_name["diffusion_requests"]] == [1, 1]
    assert [metric["value"] for metric in by_name["diffusion_denoising_steps"]] == [3, 2]  # img2img runs 4 x 0.5
    seconds = [metric["value"] for metric in by_name["diffusion_generation_seconds"]]
    assert all(value > 0 for value in seconds)
    assert {metric["type"] for metric in by_name["diffusion_generation_seconds"]} == {"COUNTER"}
    errors = sorted((metric["labels"]["Kind"], metric["value"]) for metric in by_name["diffusion_errors"])
    assert errors == [("invalid_request", 1), ("too_large", 1)]
