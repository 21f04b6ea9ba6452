"""Turn one request's body into a validated GenerationRequest. What an engine delivers (TorchServe's
rows, KServe's envelopes) is read by that engine's adapter; this module sees a body or its fields."""

import functools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from PIL.Image import Image
from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from handlers.core.codecs import answer_size_bound
from handlers.core.config import GenerationDefaults, Limits
from handlers.core.errors import PayloadTooLarge, RequestError, excerpt
from handlers.core.images import HOW_TO_SEND_AN_IMAGE, IMAGE_FIELDS, decode_image

MAX_SEED = 2**32 - 1
MAX_PROMPT_LENGTH = 1000
MAX_FIELD_NAME = 60  # an unknown field's name is echoed back; a client may send a megabyte of it

HOW_TO_SEND_A_PROMPT = (
    "no prompt found. Send it as text (-H 'Content-Type: text/plain' -d 'a cat'), "
    "as JSON (-H 'Content-Type: application/json' -d '{\"prompt\": \"a cat\"}'), "
    "or as a form field (-d 'prompt=a cat' or -F 'prompt=a cat'). "
    "A bare curl -d 'a cat' is sent form-urlencoded and its text never reaches the model."
)

# Accept header values that choose an output format when the request names none.
FORMATS_BY_MEDIA_TYPE = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "application/json": "json"}

Task = Literal["txt2img", "img2img", "inpaint"]
InputImage = Annotated[Image, WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


@dataclass(frozen=True)
class Adapters:
    """The LoRA adapters and ControlNets a model was configured with, by name."""

    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()


class GenerationRequest(GenerationDefaults):
    """One generation: the prompt(s) plus every parameter a client may set."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt: str | list[str] = Field(
        description=f"non-empty text of at most {MAX_PROMPT_LENGTH} characters, or a non-empty list of such prompts"
    )
    seed: int = Field(
        default_factory=lambda: secrets.randbelow(MAX_SEED + 1),
        ge=0,
        le=MAX_SEED,
        description="random when absent; returned in the X-Seed header; image i uses seed + i",
    )
    task: Task = Field(
        "txt2img", description="absent: inpaint when a mask_image is sent, img2img when an image is, else txt2img"
    )
    image: InputImage | None = Field(None, description="img2img and inpaint: the starting image")
    mask_image: InputImage | None = Field(None, description="inpaint: white where the image is repainted")
    control_image: InputImage | None = Field(None, description="the ControlNet's conditioning image (an edge map for canny)")
    controlnet: str | None = Field(None, description="which of the model's ControlNets steers the generation")
    lora: str | dict[str, float] | None = Field(
        None, description="a LoRA adapter's name, or adapter names mapped to their weights"
    )
    lora_weight: float = Field(1.0, ge=-2, le=2, allow_inf_nan=False, description="the weight of a `lora` given by name")
    stream: bool = Field(False, description="stream one JSON line per denoising step, then the image")

    @field_validator("prompt")
    @classmethod
    def prompts_are_usable(cls, prompt: str | list[str]) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts:
            raise ValueError("the prompt list is empty")
        for text in prompts:
            if not text.strip():
                raise ValueError("prompt is empty")
            if len(text) > MAX_PROMPT_LENGTH:
                raise ValueError(f"prompt has {len(text)} characters; at most {MAX_PROMPT_LENGTH} are allowed")
            check_unicode(text)
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def image_seeds(self) -> list[int]:
        return [(self.seed + offset) % (MAX_SEED + 1) for offset in range(self.image_count)]

    @property
    def lora_weights(self) -> dict[str, float]:
        if self.lora is None:
            return {}
        return {self.lora: self.lora_weight} if isinstance(self.lora, str) else dict(self.lora)

    @property
    def effective_strength(self) -> float:
        if self.strength is not None:
            return self.strength
        return 1.0 if self.task == "inpaint" else 0.8

    @property
    def work(self) -> int:
        """What the request costs, in pixel-steps: denoising steps x height x width x images."""
        return self.denoising_steps * self.height * self.width * self.image_count

    @property
    def denoising_steps(self) -> int:
        """The steps that run: img2img and inpaint skip the first (1 - strength) of the schedule."""
        if self.task == "txt2img":
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.effective_strength), self.num_inference_steps)


def check_unicode(text: str) -> None:
    """JSON escapes can carry lone surrogates, which are not text: tokenizers and encoders fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text is not valid Unicode: a lone surrogate {text[error.start]!r} at character {error.start}"
        ) from None


AnswerBound = Callable[[GenerationRequest], int]


def parse_request(
    fields: dict[str, Any],
    defaults: GenerationDefaults,
    limits: Limits,
    accept: str | None = None,
    adapters: Adapters = Adapters(),
    answer_bound: AnswerBound = answer_size_bound,
) -> GenerationRequest:
    """Validate a request's fields against GenerationRequest: built-in defaults, then the model's, then
    the request's.

    accept is the Accept header; answer_bound, the most bytes the answer can take as the engine sends it.
    """
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
    check_limits(request, limits, answer_bound)
    check_task_inputs(request)
    check_adapters(request, adapters)
    for name in IMAGE_FIELDS:
        image = getattr(request, name)
        if image is not None and image.size != (request.width, request.height):
            setattr(request, name, image.resize((request.width, request.height)))
    return request


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


def _multiple_of_8(pixels: int) -> int:
    return max(64, pixels // 8 * 8)



def body_fields(raw: Any, content_type: str | None = None) -> dict[str, Any]:
    """One request's body as fields: a JSON object, or plain text that is the prompt."""
    body = as_text(raw)
    is_raw_bytes = isinstance(raw, (bytes, bytearray))
    if is_raw_bytes and (content_type or "").startswith("application/json"):
        body = _load_json(body)
    if isinstance(body, str):
        # Raw bytes may arrive without a Content-Type, so a JSON object may hide in them.
        body = (_json_object(body) if is_raw_bytes else None) or {"prompt": body}
    if not isinstance(body, dict):
        raise RequestError('the JSON body must be an object such as {"prompt": "a cat"}', field="body")
    return dict(body)


def form_fields(items: dict[str, Any]) -> dict[str, Any]:
    """Form fields (urlencoded or multipart) as request fields: image parts stay bytes, the rest is text."""
    return {key: value if key in IMAGE_FIELDS else as_text(value) for key, value in items.items()}


def request_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a request means: Hugging Face's {"inputs", "parameters"} and the example's `data` name
    the prompt, and there must be one."""
    if "inputs" in fields:
        parameters = fields.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError("`parameters` must be an object of request fields", field="parameters")
        fields = {"prompt": fields["inputs"], **parameters}
    if "data" in fields:
        if "prompt" in fields:
            raise RequestError("send the prompt as `prompt` or as `data`, not both", field="data")
        fields = {**fields, "prompt": fields["data"]}
        del fields["data"]
    if fields.get("prompt") is None:
        raise RequestError(HOW_TO_SEND_A_PROMPT, field="prompt")
    return fields


def format_from_accept(accept: str | None) -> str | None:
    for media_range in (accept or "").split(","):
        media_type = media_range.split(";")[0].strip().lower()
        if media_type in FORMATS_BY_MEDIA_TYPE:
            return FORMATS_BY_MEDIA_TYPE[media_type]
    return None


def check_defaults_fit(defaults: GenerationDefaults, limits: Limits, answer_bound: AnswerBound = answer_size_bound) -> None:
    """At start-up: a request that sets nothing must pass the model's own limits."""
    try:
        check_limits(GenerationRequest(**{**defaults.model_dump(), "prompt": "x", "seed": 0}), limits, answer_bound)
    except RequestError as error:
        raise ValueError(
            f"the handler: section's defaults break its own limits, so every request that relies on them would "
            f"be refused: {error.message}. Raise the limit (max_response_size in config.properties, then "
            "rebuild the archive) or change the default"
        ) from None


def check_limits(request: GenerationRequest, limits: Limits, answer_bound: AnswerBound = answer_size_bound) -> None:
    if request.num_images_per_prompt > limits.max_images_per_prompt:
        raise RequestError(
            f"num_images_per_prompt: at most {limits.max_images_per_prompt} (got {request.num_images_per_prompt})",
            field="num_images_per_prompt",
            allowed={"minimum": 1, "maximum": limits.max_images_per_prompt},
        )
    pixels = request.height * request.width
    if pixels > limits.max_pixels:
        raise PayloadTooLarge(
            f"{request.width}x{request.height} is {pixels} pixels; this model allows at most {limits.max_pixels} per image",
            field="height",
            allowed={"max_pixels": limits.max_pixels},
        )
    if request.image_count > limits.max_images_per_request:
        raise PayloadTooLarge(
            f"the request asks for {request.image_count} images (prompts x num_images_per_prompt); "
            f"at most {limits.max_images_per_request} are allowed",
            field="num_images_per_prompt",
            allowed={"max_images_per_request": limits.max_images_per_request},
        )
    if request.work > limits.max_work:
        raise PayloadTooLarge(
            f"the request asks for {request.denoising_steps} steps x {request.width}x{request.height} pixels x "
            f"{request.image_count} images = {request.work} pixel-steps; this model allows {limits.max_work} per "
            "request: ask for fewer steps, fewer images or smaller images",
            field="num_inference_steps",
            allowed={"max_work": limits.max_work},
        )
    answer_bytes = answer_bound(request)
    if answer_bytes > limits.max_response_bytes:
        raise PayloadTooLarge(
            f"the answer could take {answer_bytes} bytes as {request.output_format}, over the server's limit of "
            f"{limits.max_response_bytes}: ask for a compressed output_format (png, jpeg, webp), fewer images, "
            "or smaller images",
            field="output_format",
            allowed={"max_response_bytes": limits.max_response_bytes, "output_format": ["png", "jpeg", "webp"]},
        )


def as_text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the request body is not UTF-8 text", field="prompt") from None
    return value


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"the body is not valid JSON: {error}", field="body") from None


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


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
