"""Turn one request's fields into a validated GenerationRequest: built-in defaults, then the model's,
then the request's, checked against the schema, the model's limits and its adapters."""

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from handlers.core.errors import RequestError, excerpt
from handlers.core.formats import FORMATS_BY_MEDIA_TYPE
from handlers.core.images import HOW_TO_SEND_AN_IMAGE, IMAGE_FIELDS, decode_image
from handlers.core.limits import Limits, SizeBound, check_limits
from handlers.core.schema import GenerationDefaults, GenerationRequest

MAX_FIELD_NAME = 60  # an unknown field's name is echoed back; a client may send a megabyte of it
# The most items a list or object field may hold (prompts, LoRA adapters), checked before pydantic, which
# builds an error object per bad item: a body of a million empty lists cost seconds and gigabytes to refuse.
MAX_ITEMS = 64


@dataclass(frozen=True)
class Adapters:
    """The LoRA adapters and ControlNets a model was configured with, by name."""

    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()


def parse_request(
    fields: dict[str, Any],
    defaults: GenerationDefaults,
    limits: Limits,
    size_bound: SizeBound,
    accept: str | None = None,
    adapters: Adapters = Adapters(),
    own_sampler_order: int = 1,
) -> GenerationRequest:
    """Validate a request's fields; accept is the Accept header, size_bound the most bytes the answer can
    take as the engine sends it, own_sampler_order the evaluations per step of the pipeline's own sampler."""
    check_shapes(fields)
    fields = dict(fields)
    if "output_format" not in fields and (chosen := format_from_accept(accept)):
        fields["output_format"] = chosen
    for name in IMAGE_FIELDS:
        if fields.get(name) is not None:
            fields[name] = decode_image(fields[name], name, limits.max_input_pixels)
    if fields.get("image") is not None:
        # Without an explicit size, img2img and inpaint keep the input image's size.
        fields.setdefault("width", _multiple_of_8(fields["image"].width))
        fields.setdefault("height", _multiple_of_8(fields["image"].height))
    if fields.get("task") is None:
        fields["task"] = infer_task(fields)
    try:
        request = GenerationRequest(**{**defaults.model_dump(), **fields})
    except ValidationError as error:
        raise _as_request_error(error) from None
    check_limits(request, limits, size_bound, own_sampler_order)
    check_task_inputs(request)
    check_adapters(request, adapters)
    for name in IMAGE_FIELDS:
        image = getattr(request, name)
        if image is not None and image.size != (request.width, request.height):
            setattr(request, name, image.resize((request.width, request.height)))
    return request


def check_shapes(fields: dict[str, Any]) -> None:
    """What validation will cost, bounded before it runs: only known fields, and in them scalars, or a list
    of texts (prompt) or an object of names to numbers (lora) of at most MAX_ITEMS items."""
    unknown = next((name for name in fields if name not in GenerationRequest.model_fields), None)
    if unknown is not None:
        name = str(unknown)[:MAX_FIELD_NAME]
        raise RequestError(f"unknown field {excerpt(name)}", field=name, allowed=sorted(GenerationRequest.model_fields))
    for name, value in fields.items():
        if isinstance(value, (list, dict)):
            check_container(name, value)


def check_container(name: str, value: list | dict) -> None:
    kind = "list" if isinstance(value, list) else "object"
    expected = {"prompt": ("list", (str,)), "lora": ("object", (int, float))}.get(name)
    if expected is None or expected[0] != kind:
        raise RequestError(f"{name}: a {kind} is not a value this field takes", field=name, allowed=allowed_values(name))
    if len(value) > MAX_ITEMS:
        raise RequestError(f"{name}: {len(value)} items; at most {MAX_ITEMS}", field=name, allowed={"max_items": MAX_ITEMS})
    items = value if kind == "list" else value.values()
    if not all(isinstance(item, expected[1]) and not isinstance(item, bool) for item in items):
        what = "texts" if name == "prompt" else "numbers"
        raise RequestError(f"{name}: every item must be one of the {what}", field=name, allowed=allowed_values(name))
    if kind == "object" and not all(isinstance(key, str) for key in value):
        raise RequestError(f"{name}: every name must be text", field=name, allowed=allowed_values(name))


def infer_task(fields: dict[str, Any]) -> str:
    if fields.get("mask_image") is not None:
        return "inpaint"
    return "img2img" if fields.get("image") is not None else "txt2img"


def check_task_inputs(request: GenerationRequest) -> None:
    """Each task gets exactly the images it uses; nothing sent is silently ignored."""
    if request.task in ("img2img", "inpaint") and request.image is None:
        raise RequestError(f"task {request.task} needs an `image`", field="image", allowed=HOW_TO_SEND_AN_IMAGE)
    if request.task == "inpaint" and request.mask_image is None:
        raise RequestError("task inpaint needs a `mask_image` (white where the image is repainted)", field="mask_image")
    if request.task == "txt2img" and request.image is not None:
        raise RequestError("an `image` was sent but task is txt2img; use img2img or inpaint", field="task")
    if request.task != "inpaint" and request.mask_image is not None:
        raise RequestError(f"a `mask_image` was sent but task is {request.task}; use inpaint", field="task")
    if request.mask_image is not None and request.mask_image.size != request.image.size:
        mask, image = request.mask_image.size, request.image.size
        raise RequestError(
            f"mask_image is {mask[0]}x{mask[1]} but image is {image[0]}x{image[1]}; they must be the same size",
            field="mask_image",
        )
    if (request.controlnet is None) != (request.control_image is None):
        raise RequestError("`controlnet` and `control_image` go together: send both or neither", field="controlnet")


def check_adapters(request: GenerationRequest, adapters: Adapters) -> None:
    if request.controlnet is not None and request.controlnet not in adapters.controlnets:
        raise RequestError(
            f"unknown controlnet {excerpt(request.controlnet)}", field="controlnet", allowed=list(adapters.controlnets)
        )
    for name, weight in request.lora_weights.items():
        if name not in adapters.loras:
            raise RequestError(f"unknown LoRA adapter {excerpt(name)}", field="lora", allowed=list(adapters.loras))
        if not -2 <= weight <= 2:
            raise RequestError(
                f"LoRA weight {weight} for {excerpt(name)} is outside -2..2", field="lora", allowed={"minimum": -2, "maximum": 2}
            )


def format_from_accept(accept: str | None) -> str | None:
    for media_range in (accept or "").split(","):
        media_type = media_range.split(";")[0].strip().lower()
        if media_type in FORMATS_BY_MEDIA_TYPE:
            return FORMATS_BY_MEDIA_TYPE[media_type]
    return None


def _multiple_of_8(pixels: int) -> int:
    return max(64, pixels // 8 * 8)


def _as_request_error(error: ValidationError) -> RequestError:
    first = error.errors()[0]
    field = str(first["loc"][0])[:MAX_FIELD_NAME] if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return RequestError(f"unknown field {excerpt(field)}", field=field, allowed=sorted(GenerationRequest.model_fields))
    message = first["msg"].removeprefix("Value error, ")
    got = excerpt(first.get("input"))
    return RequestError(f"{field}: {message} (got {got})", field=field, allowed=allowed_values(field))


@functools.cache
def _field_schemas() -> dict[str, dict]:
    # Built once: pydantic builds the whole schema on every call, about 1 ms, paid by every refused request.
    return GenerationRequest.model_json_schema()["properties"]


def allowed_values(field: str | None) -> Any:
    """What a field accepts, read from the model's own declaration."""
    schema = _field_schemas().get(field or "", {})
    if "anyOf" in schema:  # optional fields: the constraints sit on the non-null branch
        schema = {**schema, **next(branch for branch in schema["anyOf"] if branch.get("type") != "null")}
    keys = ("type", "minimum", "maximum", "multipleOf", "maxLength", "enum")
    return {key: schema[key] for key in keys if key in schema} or schema.get("description")
