"""TorchServe's adapter on its own: the rows, statuses, Content-Types and headers it writes through
TorchServe's Context, KServe's envelopes, progress lines over the worker's socket, metric lines, and the
model description it answers for `GET /models/{name}?customized=true`."""

import base64
import io
import json
import logging
import re
import socket

import numpy as np
import pytest
from PIL import Image
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

from handlers.core.metrics import declared_metrics
from handlers.torchserve.handler import DiffusersHandler
from tests.conftest import SMALL
from tests.unit.helpers import png_base64, progress_lines
from tests.unit.torchserve_context import attach_requests, handler_on, make_context, run, run_json

METRIC_LINE = re.compile(r"\[METRICS\](?P<name>\w+)\.(?P<unit>\w+):(?P<value>[\d.]+)\|#(?P<labels>[^|]*)\|#type:(?P<type>\w+)")


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir):
    return handler_on(tiny_pipeline_dir)


def test_each_row_gets_its_status_content_type_and_headers(served):
    handler, context = served
    rows = [{"body": "a cat"}, {}, {"body": {"prompt": "a dog", "num_inference_steps": 999}},
            {"body": {"prompt": "a bird", "output_format": "png"}}]
    bodies = run(handler, context, rows, ["text/plain", None, "application/json", "application/json"])
    assert [context.get_response_status(index)[0] for index in range(4)] == [200, 400, 400, 200]
    assert [context.get_response_content_type(index) for index in range(4)] == [
        "application/json", "application/json", "application/json", "image/png"]
    assert json.loads(bodies[1])["field"] == "prompt" and json.loads(bodies[2])["field"] == "num_inference_steps"
    assert np.array(json.loads(bodies[0]), dtype="uint8").shape == (64, 64, 3)
    assert Image.open(io.BytesIO(bodies[3])).format == "PNG"
    assert int(context.get_response_headers(3)["X-Seed"]) >= 0


def test_the_accept_header_is_read_whatever_its_case(served):
    handler, context = served
    [body] = run(handler, context, [{"body": "a cat"}], ["text/plain"], [{"ACCEPT": "image/webp"}])
    assert context.get_response_content_type(0) == "image/webp"
    assert Image.open(io.BytesIO(body)).format == "WEBP"


def test_the_description_is_the_models_request_schema(served):
    handler, context = served
    attach_requests(context, [None], [{"describe": "True"}])
    [description] = handler.handle([{}], context)
    schema = json.loads(description)["request"]
    assert schema["properties"]["num_inference_steps"]["default"] == SMALL["num_inference_steps"]
    assert "prompt" in schema["required"]


def test_kserve_v1_envelope_answers_each_instance(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, service_envelope="kserve")
    attach_requests(context, [None])
    body = {"instances": [{"data": "a cat", "seed": 1}, "a dog", {"prompt": "x", "height": 5}]}
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    cat, dog, bad = response["predictions"]
    assert np.array(cat, dtype="uint8").shape == np.array(dog, dtype="uint8").shape == (64, 64, 3)
    assert bad["field"] == "height"
    json.dumps(response)  # TorchServe serialises it as JSON


def test_kserve_v2_envelope_merges_named_inputs(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, service_envelope="kservev2")
    attach_requests(context, [None])
    body = {
        "id": "42",
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
            {"name": "output_format", "shape": [1], "datatype": "BYTES", "data": ["json"]},
        ],
    }
    [response] = KServev2Envelope(handler.handle).handle([{"body": body}], context)
    assert response["id"] == "42"
    [output] = response["outputs"]
    document = output["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(document["images"][0]))).size == (64, 64)
    json.dumps(response)


def test_kserve_instances_share_the_per_request_caps(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, service_envelope="kserve")
    attach_requests(context, [None])
    body = {"instances": [{"prompt": "a cat", "num_images_per_prompt": 4}] * 5}  # 20 images over 5 instances
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    [error] = response["predictions"]
    assert error["field"] == "instances" and "20 images" in error["error"]
    assert context.get_response_status(0)[0] == 413


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


def test_progress_lines_go_out_as_intermediate_responses(served):
    handler, context = served
    worker_socket = WorkerSocket(context)
    try:
        [final, plain] = run_json(handler, context, {"prompt": "a cat", "stream": True, "output_format": "png"},
                                  {"prompt": "a cat", "output_format": "png"})
        sent = worker_socket.received()
    finally:
        worker_socket.close()
    assert [(line["step"], line["total"]) for line in progress_lines(sent)] == [(step, 4) for step in range(1, 5)]
    assert sent.count(b'{"step"') == 4  # only the streaming request got progress lines
    assert final.endswith("\n") and json.loads(final)["content_type"] == "image/png"
    assert context.get_response_content_type(0) == "application/x-ndjson"
    assert context.get_response_content_type(1) == "image/png"


def emitted(caplog) -> list[dict]:
    lines = [METRIC_LINE.search(record.getMessage()) for record in caplog.records]
    return [
        {**match.groupdict(), "value": float(match["value"]),
         "labels": dict(pair.split(":", 1) for pair in match["labels"].split(","))}
        for match in lines
        if match
    ]


def test_the_six_declared_metrics_are_counters():
    assert {(declaration.name, declaration.kind) for declaration in declared_metrics()} == {
        ("diffusion_images_generated", "counter"), ("diffusion_pixels_generated", "counter"),
        ("diffusion_errors", "counter"), ("diffusion_requests", "counter"),
        ("diffusion_denoising_steps", "counter"), ("diffusion_generation_seconds", "counter"),
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
    by_name = {}
    for metric in emitted(caplog):
        by_name.setdefault(metric["name"], []).append(metric)
    txt2img, img2img = by_name["diffusion_images_generated"]
    assert (txt2img["value"], txt2img["labels"]) == (4, {"ModelName": "tiny", "Task": "txt2img"})
    assert (img2img["value"], img2img["labels"]["Task"]) == (1, "img2img")
    assert [metric["value"] for metric in by_name["diffusion_pixels_generated"]] == [4 * 96 * 64, 64 * 64]
    assert [metric["value"] for metric in by_name["diffusion_requests"]] == [1, 1]
    assert [metric["value"] for metric in by_name["diffusion_denoising_steps"]] == [3, 2]  # img2img runs 4 x 0.5
    assert all(metric["value"] > 0 for metric in by_name["diffusion_generation_seconds"])
    assert {metric["type"] for metric in by_name["diffusion_generation_seconds"]} == {"COUNTER"}
    errors = sorted((metric["labels"]["Kind"], metric["value"]) for metric in by_name["diffusion_errors"])
    assert errors == [("invalid_request", 1), ("too_large", 1)]


def test_a_failing_metric_costs_no_answer(served, monkeypatch):
    handler, context = served

    def broken(*args, **kwargs):
        raise RuntimeError("metrics cache is gone")

    monkeypatch.setattr(handler.metrics, "record", broken)
    bodies = run_json(handler, context, {"prompt": "a cat", "seed": 1}, {"prompt": "a cat", "num_inference_steps": 0})
    assert [context.get_response_status(index)[0] for index in range(2)] == [200, 400]
    assert np.array(json.loads(bodies[0]), dtype="uint8").shape == (64, 64, 3)


def test_a_lost_progress_line_costs_neither_the_stream_nor_its_neighbours(served):
    handler, context = served
    worker_socket = WorkerSocket(context)
    worker_socket.worker.close()  # the frontend's end of the socket is gone: every send fails
    try:
        bodies = run_json(handler, context, {"prompt": "a cat", "stream": True, "seed": 1}, {"prompt": "a cat", "seed": 2})
    finally:
        worker_socket.close()
    assert [context.get_response_status(index)[0] for index in range(2)] == [200, 200]
    assert json.loads(bodies[0])["images"]


def test_kserve_v2_metadata_lists_every_request_field_as_an_input():
    from handlers.core.schema import GenerationRequest
    from handlers.torchserve.envelopes import v2_metadata

    inputs, outputs = v2_metadata()
    by_name = {tensor["name"]: tensor for tensor in inputs}
    assert set(by_name) == set(GenerationRequest.model_fields)
    assert by_name["prompt"] == {"name": "prompt", "datatype": "BYTES", "shape": [-1]}  # text, or a list of texts
    assert by_name["num_inference_steps"]["datatype"] == "INT64" and by_name["guidance_scale"]["datatype"] == "FP64"
    assert by_name["stream"]["datatype"] == "BOOL" and by_name["image"]["datatype"] == "BYTES"
    assert outputs == [{"name": "prompt", "datatype": "INT64", "shape": [-1]}]
