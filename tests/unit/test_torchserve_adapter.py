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

from handlers.core.metrics import declared_metrics
from handlers.core.schema import GenerationRequest
from handlers.torchserve.handler import DiffusersHandler
from handlers.torchserve.kserve import MAX_ECHOED, KServeRow, v2_size_bound
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


def test_kserve_v1_answers_each_instance(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v1")
    body = {"instances": [{"data": "a cat", "seed": 1}, "a dog", {"prompt": "x", "height": 5}]}
    [answer] = run_json(handler, context, body)
    cat, dog, bad = json.loads(answer)["predictions"]
    assert np.array(cat, dtype="uint8").shape == np.array(dog, dtype="uint8").shape == (64, 64, 3)
    assert bad["field"] == "height"
    assert context.get_response_status(0)[0] == 200 and context.get_response_content_type(0) == "application/json"


def test_kserve_v2_merges_named_inputs_and_echoes_the_id(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v2")
    body = {
        "id": "42",
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
            {"name": "output_format", "shape": [1], "datatype": "BYTES", "data": ["json"]},
        ],
    }
    [answer] = run_json(handler, context, body)
    document = json.loads(answer)
    assert (document["id"], document["model_name"]) == ("42", "tiny")
    [output] = document["outputs"]
    assert output["name"] == "prompt" and output["datatype"] == "BYTES"
    assert Image.open(io.BytesIO(base64.b64decode(output["data"][0]["images"][0]))).size == (64, 64)


def test_kserve_answers_are_per_request_in_a_batch(tiny_pipeline_dir):
    """The handler answers every KServe request of a batch, not only the first (TorchServe's envelopes did)."""
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v1")
    answers = run_json(handler, context, {"instances": ["a cat"]}, {"instances": [{"prompt": ""}]}, {"instances": ["a dog"]})
    assert [context.get_response_status(index)[0] for index in range(3)] == [200, 400, 200]
    assert [len(json.loads(answer)["predictions"]) for answer in answers] == [1, 1, 1]


def test_kserve_instances_share_the_per_request_caps(tiny_pipeline_dir):
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v1")
    [answer] = run_json(handler, context, {"instances": [{"prompt": "a cat", "num_images_per_prompt": 4}] * 5})
    [error] = json.loads(answer)["predictions"]
    assert error["field"] == "instances" and "ask for 20 together" in error["error"]
    assert context.get_response_status(0)[0] == 413


def test_kserve_v1_instances_are_capped_in_work_together(tiny_pipeline_dir):
    """Each instance within max_work, all of them together past it: refused before any work."""
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v1", max_work=64 * 64 * 4 * 2 * 3)
    [answer] = run_json(handler, context, {"instances": [{"prompt": "a cat"}] * 4})  # 4 images of 4 steps, guided
    [error] = json.loads(answer)["predictions"]
    assert error["allowed"] == {"max_work": 64 * 64 * 4 * 2 * 3} and context.get_response_status(0)[0] == 413


def test_the_echoed_id_counts_in_the_answers_size(tiny_pipeline_dir):
    request = GenerationRequest(prompt="a cat", seed=0, output_format="png", **SMALL)
    fitting = v2_size_bound(KServeRow(request_id="short"), request, "tiny", "")
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v2", output_format="png", max_response_bytes=fitting)
    inputs = [V2_PROMPT, {"name": "seed", "shape": [1], "datatype": "INT64", "data": [0]}]  # the bound counts its digits
    [fits] = run_json(handler, context, {"id": "short", "inputs": inputs})
    assert context.get_response_status(0)[0] == 200, fits
    [longer] = run_json(handler, context, {"id": "x" * 200, "inputs": inputs})  # within MAX_ECHOED, past the bound
    assert context.get_response_status(0)[0] == 413
    assert json.loads(longer)["outputs"][0]["data"][0]["allowed"] == {"max_response_bytes": fitting}
    [too_long] = run_json(handler, context, {"id": "x" * (MAX_ECHOED + 1), "inputs": inputs})
    assert context.get_response_status(0)[0] == 400 and json.loads(too_long)["outputs"][0]["data"][0]["field"] == "id"


V2_PROMPT = {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}


@pytest.mark.parametrize("bad_input", [
    pytest.param({"name": 5, "shape": [1], "datatype": "BYTES", "data": ["a cat"]}, id="name not text"),
    pytest.param({"name": "seed", "shape": [1], "data": [3]}, id="no datatype"),
    pytest.param({"name": "seed", "shape": [1], "datatype": "INT64"}, id="no data"),
    pytest.param({"name": "seed", "shape": [20000000, 0], "datatype": "INT64", "data": []}, id="a huge empty shape"),
])
def test_a_malformed_kserve_v2_input_is_its_own_400_beside_a_good_request(tiny_pipeline_dir, bad_input):
    handler, context = handler_on(tiny_pipeline_dir, kserve_protocol="v2")
    bad, good = run_json(handler, context, {"id": "bad", "inputs": [V2_PROMPT, bad_input]}, {"id": "good", "inputs": [V2_PROMPT]})
    assert [context.get_response_status(index)[0] for index in range(2)] == [400, 200]
    assert json.loads(bad)["outputs"][0]["data"][0]["field"] in ("inputs", "seed")
    assert json.loads(good)["id"] == "good"


@pytest.mark.parametrize("collision", [
    pytest.param({"body": "text/plain"}, id="a body header"),
    pytest.param({"body": {"content-type": 5}}, id="a body entry of the wrong type"),
    pytest.param({"Accept": ["image/png"]}, id="an accept header that is not text"),
])
def test_headers_named_like_torchserves_entries_cost_no_neighbour_its_answer(served, collision):
    """TorchServe lets a client's headers overwrite the entries it makes per request parameter."""
    handler, context = served
    rows = [{"body": {"prompt": "a cat", "output_format": "png"}}, {"body": {"prompt": "a dog", "output_format": "png"}}]
    attach_requests(context, ["application/json", "application/json"])
    context.request_processor[0].get_request_properties().update(collision)  # after TorchServe's own entries
    answers = handler.handle(rows, context)
    assert context.get_response_status(1)[0] == 200 and Image.open(io.BytesIO(answers[1])).format == "PNG"
    assert context.get_response_status(0)[0] in (200, 400)


def test_a_describe_header_and_an_explanation_request_change_only_their_own_answer(served):
    """TorchServe marks a row of /explanations with explain: True; a client's describe header rides along."""
    handler, context = served
    rows = [{"body": "a cat"}, {"body": "a dog"}, {"body": "a bird"}]
    headers = [{"describe": "True"}, {"explain": "True"}, {}]
    answers = run(handler, context, rows, ["text/plain"] * 3, headers)
    assert [context.get_response_status(index)[0] for index in range(3)] == [200, 400, 200]
    assert np.array(json.loads(answers[0]), dtype="uint8").shape == (64, 64, 3)  # an image, not the schema
    assert json.loads(answers[1])["field"] == "explain"


def test_a_worker_refuses_to_start_when_a_full_batch_could_outlive_response_timeout(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, {**SMALL, "request_timeout_s": 100}, batch_size=4)
    context.model_yaml_config["responseTimeout"] = 399
    with pytest.raises(ValueError, match=r"responseTimeout \(399 s\) is less than batchSize \(4\) x"):
        DiffusersHandler().initialize(context)
    context.model_yaml_config["responseTimeout"] = 400
    DiffusersHandler().initialize(context)


class LoggingHandler(DiffusersHandler):
    """A user's subclass that overrides handle, as TorchServe's docs suggest for logging or auth."""

    def handle(self, data, context):
        self.calls = getattr(self, "calls", 0) + 1
        return super().handle(data, context)


@pytest.mark.parametrize("protocol", ["none", "v1"])
def test_the_protocol_setting_holds_for_a_subclass_that_overrides_handle(tiny_pipeline_dir, protocol):
    context = make_context(tiny_pipeline_dir, {**SMALL, "kserve_protocol": protocol, "output_format": "png"})
    handler = LoggingHandler()
    handler.initialize(context)
    if protocol == "v1":
        [answer] = run_json(handler, context, {"instances": ["a cat"]})
        [document] = json.loads(answer)["predictions"]
        assert Image.open(io.BytesIO(base64.b64decode(document["images"][0]))).format == "PNG"
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
    from handlers.torchserve.kserve import v2_metadata

    inputs, outputs = v2_metadata()
    by_name = {tensor["name"]: tensor for tensor in inputs}
    assert set(by_name) == set(GenerationRequest.model_fields)
    assert by_name["prompt"] == {"name": "prompt", "datatype": "BYTES", "shape": [-1]}  # text, or a list of texts
    assert by_name["num_inference_steps"]["datatype"] == "INT64" and by_name["guidance_scale"]["datatype"] == "FP64"
    assert by_name["stream"]["datatype"] == "BOOL" and by_name["image"]["datatype"] == "BYTES"
    assert outputs == [{"name": "prompt", "datatype": "INT64", "shape": [-1]}]
