import json

import pytest

from handlers.config import GenerationDefaults, load_handler_config
from handlers.errors import RequestError
from handlers.request import MAX_SEED, parse_request

DEFAULTS = GenerationDefaults()


@pytest.mark.parametrize(
    "row, body_type",
    [
        pytest.param({"body": bytearray(b"a cat")}, None, id="raw bytes"),
        pytest.param({"body": "a cat"}, "text/plain", id="text/plain"),
        pytest.param({"body": {"prompt": "a cat"}}, "application/json", id="json prompt"),
        pytest.param({"body": {"data": "a cat"}}, "application/json", id="json data"),
        pytest.param({"body": b'{"prompt": "a cat"}'}, None, id="json in raw bytes"),
        pytest.param({"prompt": "a cat"}, None, id="urlencoded prompt"),
        pytest.param({"data": "a cat"}, None, id="urlencoded data"),
        pytest.param({"data": bytearray(b"a cat")}, None, id="multipart data"),
        pytest.param({"prompt": bytearray(b"a cat")}, None, id="multipart prompt"),
    ],
)
def test_every_body_shape_yields_the_prompt(row, body_type):
    request = parse_request(row, DEFAULTS, body_type)
    assert request.prompt == "a cat"
    assert (request.height, request.width, request.num_inference_steps, request.guidance_scale) == (768, 768, 50, 7.5)


def test_form_fields_carry_parameters_as_text():
    request = parse_request({"prompt": b"a cat", "num_inference_steps": b"12", "seed": "42"}, DEFAULTS)
    assert (request.num_inference_steps, request.seed) == (12, 42)


def test_a_text_prompt_that_looks_like_json_stays_a_prompt():
    assert parse_request({"body": "{masterpiece} a cat"}, DEFAULTS, "text/plain").prompt == "{masterpiece} a cat"


@pytest.mark.parametrize(
    "row", [{}, {"body": {}}, {"body": {"seed": 3}}, {"seed": "3"}], ids=["form-encoded curl -d", "empty json", "json without prompt", "form without prompt"]
)
def test_a_missing_prompt_says_how_to_send_one(row):
    with pytest.raises(RequestError) as raised:
        parse_request(row, DEFAULTS)
    assert raised.value.status == 400
    assert raised.value.field == "prompt"
    assert "Content-Type: text/plain" in raised.value.message
    assert "prompt=a cat" in raised.value.message


def test_malformed_json_is_a_400_that_says_so():
    with pytest.raises(RequestError, match="not valid JSON") as raised:
        parse_request({"body": b'{"prompt": "a cat"'}, DEFAULTS, "application/json")
    assert raised.value.field == "body"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a cat", "height": 100}, "height"),
        ({"prompt": "a cat", "guidance_scale": 31}, "guidance_scale"),
        ({"prompt": "a cat", "seed": MAX_SEED + 1}, "seed"),
        ({"prompt": "a cat", "seed": -1}, "seed"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(fields, field):
    with pytest.raises(RequestError) as raised:
        parse_request({"body": fields}, DEFAULTS, "application/json")
    error = raised.value
    assert error.field == field
    body = json.loads(error.to_json())
    assert body["field"] == field and body["error"]
    if field != "prompt" or len(fields["prompt"]) > 1000:
        assert body["allowed"]


def test_unknown_fields_list_the_known_ones():
    with pytest.raises(RequestError) as raised:
        parse_request({"body": {"prompt": "a cat", "steps": 3}}, DEFAULTS, "application/json")
    assert raised.value.field == "steps"
    assert "num_inference_steps" in raised.value.allowed


def test_prompt_and_data_together_are_ambiguous():
    with pytest.raises(RequestError, match="not both"):
        parse_request({"body": {"prompt": "a", "data": "b"}}, DEFAULTS, "application/json")


def test_defaults_flow_built_in_then_model_config_then_request():
    config = load_handler_config({"handler": {"height": 64, "width": 128, "num_inference_steps": 4}})
    defaults = config.generation_defaults
    from_config = parse_request({"body": "a cat"}, defaults, "text/plain")
    assert (from_config.height, from_config.width, from_config.num_inference_steps) == (64, 128, 4)
    assert from_config.guidance_scale == 7.5  # not in the config: the built-in default
    from_request = parse_request({"body": {"prompt": "a cat", "width": 256}}, defaults, "application/json")
    assert (from_request.height, from_request.width) == (64, 256)


def test_a_bad_model_config_fails_loudly():
    with pytest.raises(ValueError, match="handler"):
        load_handler_config({"handler": {"hieght": 64}})


def test_missing_seed_is_drawn_per_request():
    seeds = {parse_request({"body": "a cat"}, DEFAULTS, "text/plain").seed for _ in range(5)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_SEED for seed in seeds)
