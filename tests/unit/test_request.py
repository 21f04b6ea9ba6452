import base64
import io
import json
import math

import pytest
from PIL import Image

from handlers.core.answers import answer_size_bound
from handlers.core.bodies import fields_from_body, fields_from_form, instance_fields, merge_v2_inputs
from handlers.core.config import load_handler_config
from handlers.core.errors import RequestError
from handlers.core.limits import Limits
from handlers.core.request import Adapters, parse_request
from handlers.core.samplers import SAMPLERS
from handlers.core.schema import MAX_SEED, GenerationDefaults

DEFAULTS = GenerationDefaults()
LIMITS = Limits()
ADAPTERS = Adapters(loras=("style", "ink"), controlnets=("canny",))


def parse(row, body_type=None, accept=None, defaults=DEFAULTS, limits=LIMITS):
    """A body ({"body": ...}), form fields, or a KServe v1 instance, read by the core's readers, then parsed."""
    if isinstance(row, str):
        fields = instance_fields(row)
    else:
        fields = fields_from_body(row["body"], body_type) if "body" in row else fields_from_form(row)
    return parse_request(fields, defaults, limits, answer_size_bound, accept=accept, adapters=ADAPTERS)


def parse_json(fields, **options):
    return parse({"body": fields}, "application/json", **options)


def rejection(fields, **options) -> RequestError:
    with pytest.raises(RequestError) as raised:
        parse_json(fields, **options)
    return raised.value


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
        pytest.param({"body": {"instances": [{"data": "a cat"}]}}, "application/json", id="kserve v1 posted directly"),
        pytest.param({"body": {"instances": ["a cat"]}}, "application/json", id="kserve v1 bare instance"),
        pytest.param(
            {"body": {"id": "1", "inputs": [{"name": "x", "shape": -1, "datatype": "BYTES", "data": "a cat"}]}},
            "application/json",
            id="kserve v2 posted directly",
        ),
        pytest.param({"body": {"inputs": "a cat"}}, "application/json", id="hugging face"),
        pytest.param("a cat", None, id="kserve v1 instance"),
    ],
)
def test_every_body_shape_yields_the_prompt(row, body_type):
    request = parse(row, body_type)
    assert request.prompt == "a cat"
    assert (request.height, request.width, request.num_inference_steps, request.guidance_scale) == (768, 768, 50, 7.5)
    assert request.output_format == "numpy"


def test_every_field_is_taken_from_json():
    fields = {
        "prompt": ["a cat", "a dog"],
        "negative_prompt": "blurry",
        "num_inference_steps": 12,
        "guidance_scale": 3.5,
        "height": 128,
        "width": 96,
        "seed": 7,
        "num_images_per_prompt": 2,
        "scheduler": "euler_a",
        "output_format": "jpeg",
        "quality": 70,
        "task": "txt2img",
        "strength": 0.5,
        "controlnet_conditioning_scale": 0.7,
        "use_refiner": False,
        "lora": {"style": 0.5, "ink": -0.25},
        "lora_weight": 1.5,
        "stream": True,
    }
    request = parse_json(fields)
    assert request.model_dump(exclude={"image", "mask_image", "control_image", "controlnet"}) == fields
    assert request.prompts == ["a cat", "a dog"]
    assert request.image_count == 4
    assert request.image_seeds == [7, 8, 9, 10]


def test_seeds_of_later_images_wrap_around():
    assert parse_json({"prompt": "a", "seed": MAX_SEED, "num_images_per_prompt": 2}).image_seeds == [MAX_SEED, 0]


def test_hugging_face_parameters_and_kserve_v2_named_inputs_become_fields():
    hugging_face = parse_json({"inputs": "a cat", "parameters": {"seed": 5, "num_inference_steps": 3}})
    assert (hugging_face.seed, hugging_face.num_inference_steps) == (5, 3)
    named = merge_v2_inputs(
        [
            {"name": "prompt", "datatype": "BYTES", "data": ["a cat"]},
            {"name": "seed", "datatype": "INT64", "data": [9]},
        ]
    )
    assert named == {"prompt": "a cat", "seed": 9}


def test_several_kserve_instances_in_one_direct_request_are_refused():
    assert rejection({"instances": ["a", "b"]}).field == "instances"


def test_form_fields_carry_parameters_as_text():
    request = parse({"prompt": b"a cat", "num_inference_steps": b"12", "seed": "42", "output_format": b"png"})
    assert (request.num_inference_steps, request.seed, request.output_format) == (12, 42, "png")


def test_a_text_prompt_that_looks_like_json_stays_a_prompt():
    assert parse({"body": "{masterpiece} a cat"}, "text/plain").prompt == "{masterpiece} a cat"


@pytest.mark.parametrize(
    "accept, expected",
    [
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("image/webp;q=0.9, */*;q=0.1", "webp"),
        ("application/json", "json"),
        ("*/*", "numpy"),
        (None, "numpy"),
    ],
)
def test_accept_header_chooses_the_format(accept, expected):
    assert parse({"body": "a cat"}, "text/plain", accept=accept).output_format == expected


def test_an_explicit_format_beats_the_accept_header():
    assert parse_json({"prompt": "a cat", "output_format": "png"}, accept="image/jpeg").output_format == "png"


@pytest.mark.parametrize(
    "row", [{}, {"body": {}}, {"body": {"seed": 3}}, {"seed": "3"}], ids=["form-encoded curl -d", "empty json", "json without prompt", "form without prompt"]
)
def test_a_missing_prompt_says_how_to_send_one(row):
    with pytest.raises(RequestError) as raised:
        parse(row)
    assert raised.value.status == 400
    assert raised.value.field == "prompt"
    assert "Content-Type: text/plain" in raised.value.message
    assert "prompt=a cat" in raised.value.message


def test_malformed_json_is_a_400_that_says_so():
    with pytest.raises(RequestError, match="not valid JSON") as raised:
        parse({"body": b'{"prompt": "a cat"'}, "application/json")
    assert raised.value.field == "body"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a cat", ""]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a cat", "negative_prompt": 5}, "negative_prompt"),
        ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a cat", "num_inference_steps": 151}, "num_inference_steps"),
        ({"prompt": "a cat", "num_inference_steps": "many"}, "num_inference_steps"),
        ({"prompt": "a cat", "height": 100}, "height"),
        ({"prompt": "a cat", "width": 4096}, "width"),
        ({"prompt": "a cat", "height": 56}, "height"),
        ({"prompt": "a cat", "guidance_scale": 31}, "guidance_scale"),
        ({"prompt": "a cat", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a cat", "guidance_scale": math.nan}, "guidance_scale"),
        ({"prompt": "a cat", "seed": MAX_SEED + 1}, "seed"),
        ({"prompt": "a cat", "seed": -1}, "seed"),
        ({"prompt": "a cat", "num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"prompt": "a cat", "num_images_per_prompt": 9}, "num_images_per_prompt"),
        ({"prompt": "a cat", "scheduler": "magic"}, "scheduler"),
        ({"prompt": "a cat", "output_format": "gif"}, "output_format"),
        ({"prompt": "a cat", "quality": 101}, "quality"),
    ],
)
def test_invalid_values_are_400s_naming_the_field_and_what_is_allowed(fields, field):
    error = rejection(fields)
    assert error.status == 400
    body = json.loads(error.to_json())
    assert body["field"] == field
    assert body["error"]
    assert body["allowed"]


def test_unknown_schedulers_and_formats_list_the_known_ones():
    assert set(rejection({"prompt": "a", "scheduler": "magic"}).allowed["enum"]) == set(SAMPLERS)
    assert rejection({"prompt": "a", "output_format": "gif"}).allowed["enum"] == ["numpy", "png", "jpeg", "webp", "json"]


def test_unknown_fields_list_the_known_ones():
    error = rejection({"prompt": "a cat", "steps": 3})
    assert error.field == "steps"
    assert "num_inference_steps" in error.allowed


def test_prompt_and_data_together_are_ambiguous():
    assert "not both" in rejection({"prompt": "a", "data": "b"}).message


def test_requests_past_the_model_limits_are_413s():
    limits = Limits(max_pixels=128 * 128, max_images_per_request=4, max_images_per_prompt=3)
    too_big = rejection({"prompt": "a", "height": 256, "width": 128}, limits=limits)
    assert (too_big.status, too_big.allowed) == (413, {"max_pixels": 128 * 128})
    too_many = rejection({"prompt": ["a", "b"], "num_images_per_prompt": 3, "height": 64, "width": 64}, limits=limits)
    assert (too_many.status, too_many.field) == (413, "num_images_per_prompt")
    over_configured_max = rejection({"prompt": "a", "num_images_per_prompt": 4, "height": 64, "width": 64}, limits=limits)
    assert (over_configured_max.status, over_configured_max.allowed["maximum"]) == (400, 3)


def test_defaults_flow_built_in_then_model_config_then_request():
    config = load_handler_config({"handler": {"height": 64, "width": 128, "num_inference_steps": 4, "scheduler": "euler"}})
    defaults = config.generation_defaults
    from_config = parse({"body": "a cat"}, "text/plain", defaults=defaults)
    assert (from_config.height, from_config.width, from_config.num_inference_steps) == (64, 128, 4)
    assert from_config.scheduler == "euler"
    assert from_config.guidance_scale == 7.5  # not in the config: the built-in default
    from_request = parse_json({"prompt": "a cat", "width": 256, "scheduler": "ddim"}, defaults=defaults)
    assert (from_request.height, from_request.width, from_request.scheduler) == (64, 256, "ddim")


def test_a_bad_model_config_fails_loudly():
    with pytest.raises(ValueError, match="handler"):
        load_handler_config({"handler": {"hieght": 64}})


def test_missing_seed_is_drawn_per_request():
    seeds = {parse({"body": "a cat"}, "text/plain").seed for _ in range(5)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_SEED for seed in seeds)


def png_text(size=(64, 64), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_images_arrive_as_base64_or_data_urls_and_set_the_size():
    request = parse_json({"prompt": "a cat", "image": "data:image/png;base64," + png_text((96, 72)), "strength": 0.4})
    assert request.task == "img2img" and request.image.size == (96, 72) and (request.width, request.height) == (96, 72)
    sized = parse_json({"prompt": "a cat", "image": png_text((96, 72)), "width": 64, "height": 64})
    assert sized.image.size == (64, 64)


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"image": "not base64!"}, 400, "not valid base64"),
        ({"image": base64.b64encode(b"plain text, not a picture").decode()}, 400, "not a PNG, JPEG or WebP file"),
        ({"image": png_text((5000, 5000))}, 413, "at most"),
        ({"task": "img2img"}, 400, "needs an `image`"),
        ({"task": "inpaint", "image": png_text()}, 400, "needs a `mask_image`"),
        ({"task": "txt2img", "image": png_text()}, 400, "task is txt2img"),
        ({"image": png_text(), "mask_image": png_text((32, 64), "L")}, 400, "mask_image is 32x64 but image is 64x64"),
        ({"image": png_text(), "strength": 1.5}, 400, "strength"),
        ({"controlnet": "canny"}, 400, "go together"),
        ({"controlnet": "depth", "control_image": png_text()}, 400, "unknown controlnet"),
        ({"lora": "missing"}, 400, "unknown LoRA"),
        ({"lora": {"style": 3}}, 400, "outside -2..2"),
        ({"task": "upscale"}, 400, "task"),
    ],
)
def test_bad_image_inputs_are_refused_clearly(fields, status, message):
    error = rejection({"prompt": "a cat", **fields})
    assert error.status == status and message in error.message


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded():
    """A 20000x20000 PNG of zeros is about 400 kB; decoded it would take 1.2 GB."""
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    error = rejection({"prompt": "a cat", "image": base64.b64encode(buffer.getvalue()).decode()})
    assert error.status == 413 and error.field == "image"


def test_the_input_pixel_cap_comes_from_the_config():
    limits = Limits(max_input_pixels=64 * 64)
    assert parse_json({"prompt": "a cat", "image": png_text((64, 64))}, limits=limits).image.size == (64, 64)
    assert rejection({"prompt": "a cat", "image": png_text((72, 64))}, limits=limits).status == 413
