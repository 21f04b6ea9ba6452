"""TorchServe's adapter in step mode, on its own: the replies it writes through TorchServe's Context at each
call of continuous batching (a head first, then chunks, the body with the last step), whole answers for
what needs no step, and the requests the frontend stops sending."""

import base64
import io
import json
import time

import pytest
from PIL import Image
from pydantic import ValidationError

from handlers.core.config import HandlerConfig
from handlers.torchserve.handler import DiffusersHandler
from tests.conftest import SMALL
from tests.unit.torchserve_context import attach_requests, make_context


@pytest.fixture(scope="module")
def stepping(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, {**SMALL, "batching": "step"}, batch_size=4)
    context.model_yaml_config["continuousBatching"] = True
    handler = DiffusersHandler()
    handler.initialize(context)
    handler.steps.round_trip_share = 1.0  # one step per call, whatever the gaps between this test's calls
    return handler, context


def call(handler, context, rows: dict[str, dict]) -> list[tuple]:
    """One call of the frontend: new requests with their bodies, open ones as an empty row under their id.
    Each reply: (status, Content-Type, headers, body, what the stopping criterion says)."""
    attach_requests(context, ["application/json" if row else None for row in rows.values()])
    context.request_ids = dict(enumerate(rows))
    bodies = handler.handle(list(rows.values()), context)
    return [(context.get_response_status(index)[0] or 200, context.get_response_content_type(index),
             context.get_response_headers(index), body, context.stopping_criteria[index](body))
            for index, body in enumerate(bodies)]


def test_a_request_gets_its_head_first_and_its_image_with_its_last_step(stepping):
    handler, context = stepping
    long = {"body": {"prompt": "a cat", "num_inference_steps": 4, "seed": 3, "output_format": "png"}}
    [first] = call(handler, context, {"long": long})
    assert first[:2] == (200, "image/png") and first[2]["X-Seed"] == "3" and first[3] == "" and first[4] is False
    short = {"body": {"prompt": "a dog", "num_inference_steps": 2, "stream": True}}
    replies = call(handler, context, {"long": {}, "short": short})
    assert [reply[4] for reply in replies] == [False, False]
    assert replies[1][1] == "application/x-ndjson" and json.loads(replies[1][3]) == {**json.loads(replies[1][3]), "step": 1}
    long_reply, short_reply = call(handler, context, {"long": {}, "short": {}})
    assert long_reply[4] is False and long_reply[3] == ""
    *progress, document = short_reply[3].splitlines()
    assert short_reply[4] is True and json.loads(progress[0])["step"] == 2 and json.loads(document)["images"]
    [last] = call(handler, context, {"long": {}})
    assert last[4] is True and Image.open(io.BytesIO(last[3])).size == (64, 64)
    assert not handler.steps.open and len(handler.steps.running) == 0


def test_an_answer_ready_at_arrival_is_whole_with_its_own_status(stepping):
    handler, context = stepping
    [running] = call(handler, context, {"running": {"body": {"prompt": "a cat", "num_inference_steps": 3}}})
    refused, one_step, still_running = call(handler, context, {
        "refused": {"body": {"prompt": "a cat", "scheduler": "nope"}},
        "one step": {"body": {"prompt": "a dog", "num_inference_steps": 1, "output_format": "png"}},
        "running": {},
    })
    assert refused[0] == 400 and json.loads(refused[3])["field"] == "scheduler" and refused[4] is None
    assert one_step[0] == 200 and one_step[1] == "image/png" and one_step[4] is None
    assert still_running[4] is False
    call(handler, context, {"running": {}})
    assert not handler.steps.open


def test_a_request_the_frontend_stops_sending_is_dropped(stepping):
    handler, context = stepping
    call(handler, context, {"gone": {"body": {"prompt": "a cat", "num_inference_steps": 10}},
                            "stays": {"body": {"prompt": "a dog", "num_inference_steps": 2}}})
    [stays] = call(handler, context, {"stays": {}})
    assert stays[4] is True and "gone" not in handler.steps.open and len(handler.steps.running) == 0


def test_a_call_steps_on_while_the_frontends_round_trip_would_cost_more_than_its_share(tiny_pipeline_dir):
    context = make_context(tiny_pipeline_dir, {**SMALL, "batching": "step"}, batch_size=4)
    context.model_yaml_config["continuousBatching"] = True
    handler = DiffusersHandler()
    handler.initialize(context)
    streaming = {"body": {"prompt": "a cat", "num_inference_steps": 150, "stream": True}}
    [first] = call(handler, context, {"stream": streaming})
    time.sleep(0.1)  # a round trip of 100 ms, averaged in at a fifth: the next call steps for about a second
    [second] = call(handler, context, {"stream": {}})
    lines = [json.loads(line) for line in second[3].splitlines()]
    steps = [line["step"] for line in lines if "step" in line]
    assert len(steps) > 1 and steps == list(range(steps[0], steps[0] + len(steps)))
    assert second[4] is (len(lines) > len(steps))  # the stream's last chunk carries its document


def test_the_description_is_answered_whole_in_step_mode(stepping):
    handler, context = stepping
    attach_requests(context, [None], [{"describe": "True"}])
    [description] = handler.handle([{}], context)
    assert json.loads(description)["request"]["properties"]["prompt"] and context.stopping_criteria is None


@pytest.mark.parametrize("continuous, batching", [(True, "per_request"), (False, "step")])
def test_step_batching_and_continuous_batching_go_together(tiny_pipeline_dir, continuous, batching):
    context = make_context(tiny_pipeline_dir, {**SMALL, "batching": batching}, batch_size=4)
    context.model_yaml_config["continuousBatching"] = continuous
    with pytest.raises(ValueError, match="continuousBatching: true and the handler's batching: step together"):
        DiffusersHandler().initialize(context)


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_step_batching_serves_plain_requests_only(protocol):
    """A KServe body's instances share one answer, which a running set would hold back until the last."""
    with pytest.raises(ValidationError, match="batching: step serves plain requests only"):
        HandlerConfig(batching="step", kserve_protocol=protocol)


def test_a_request_that_cannot_step_streams_its_progress_in_its_whole_answer(stepping, tiny_pipeline_dir):
    """Inpainting runs through the pipeline's own call when it joins; a stream still gets a line per step."""
    handler, context = stepping
    image = base64.b64encode(png(Image.new("RGB", (64, 64), (200, 30, 30)))).decode()
    mask = base64.b64encode(png(Image.new("RGB", (64, 64), (255, 255, 255)))).decode()
    inpaint = {"prompt": "a cat", "image": image, "mask_image": mask, "num_inference_steps": 3, "stream": True}
    [reply] = call(handler, context, {"inpaint": {"body": inpaint}})
    *progress, document = reply[3].splitlines()
    assert reply[0] == 200 and reply[4] is None and json.loads(document)["images"]
    assert [json.loads(line)["step"] for line in progress] == [1, 2, 3]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
