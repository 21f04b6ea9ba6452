"""The request schema: every field a client may send, declared once with its type, bounds, default and
description, and whether batch-mates may differ in it and still share one pipeline call.

README's tables, query.py's flags, the archiver's default options and the JSON Schema each engine
publishes are generated from these models; nothing lists the fields by hand.
"""

import functools
import json
import secrets
from typing import Annotated, Any, Literal

from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from handlers.core.formats import OUTPUT_FORMATS
from handlers.core.samplers import SAMPLERS, Sampler

MAX_SEED = 2**32 - 1
MAX_PROMPT_LENGTH = 1000

# Declared on a field whose value batch-mates may differ in and still share one pipeline call (each
# image gets its own prompt, seed and input images; each answer its own encoding). Every other field
# splits a batch: requests that differ in it run in separate calls.
SHARED_IN_BATCH = "x-shared-in-batch"

SamplerName = Literal[tuple(SAMPLERS)]
OutputFormat = Literal[tuple(OUTPUT_FORMATS)]
Task = Literal["txt2img", "img2img", "inpaint"]
InputImage = Annotated[Image, WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


def shared(default: Any = ..., **field_options) -> Any:
    """A Field that batch-mates may differ in (see SHARED_IN_BATCH)."""
    return Field(default, json_schema_extra={SHARED_IN_BATCH: True}, **field_options)


class GenerationDefaults(BaseModel):
    """Generation parameters a request may leave out; the model's config may change their defaults."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = shared(
        None, max_length=1000, description="what to steer away from (acts when guidance_scale > 1)"
    )
    num_inference_steps: int = Field(50, ge=1, le=150, description="denoising steps")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=30.0, allow_inf_nan=False,
        description="classifier-free guidance, as diffusers means it: 1 or less turns it off (Turbo models use 0)",
    )
    height: int = Field(768, ge=64, le=2048, multiple_of=8, description="pixels, a multiple of 8")
    width: int = Field(768, ge=64, le=2048, multiple_of=8, description="pixels, a multiple of 8")
    num_images_per_prompt: int = shared(1, ge=1, le=64, description="images for each prompt, up to max_images_per_prompt")
    scheduler: SamplerName | None = Field(None, description="the sampler; absent: the pipeline's own")
    output_format: OutputFormat = shared(
        "numpy",
        description="; ".join(f"{name}: {what}" for name, what in OUTPUT_FORMATS.items())
        + ". Absent: the Accept header's image/png, image/jpeg, image/webp or application/json chooses",
    )
    quality: int = shared(90, ge=1, le=100, description="jpeg and webp quality")
    strength: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="img2img and inpaint: how far to move from the input image (0 returns it); "
        "absent: 0.8 for img2img, 1.0 for inpaint",
    )
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="how strongly the ControlNet steers"
    )
    use_refiner: bool = Field(True, description="finish txt2img with the model's SDXL refiner, when it has one")


class GenerationRequest(GenerationDefaults):
    """What a request asks for: the prompt(s) plus every parameter a client may set."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt: str | list[str] = shared(
        description=f"non-empty text of at most {MAX_PROMPT_LENGTH} characters, or a non-empty list of such prompts"
    )
    seed: int = shared(
        default_factory=lambda: secrets.randbelow(MAX_SEED + 1), ge=0, le=MAX_SEED,
        description="random when absent; returned in the X-Seed header; image i of a request uses seed + i",
    )
    task: Task = Field(
        "txt2img", description="absent: inpaint when a mask_image is sent, img2img when an image is, else txt2img"
    )
    image: InputImage | None = shared(
        None, description="img2img and inpaint: the starting image, PNG, JPEG or WebP (base64 in JSON, or a file part)"
    )
    mask_image: InputImage | None = shared(
        None, description="inpaint: the same size as image; white is repainted, black kept"
    )
    control_image: InputImage | None = shared(None, description="the ControlNet's conditioning image (an edge map for canny)")
    controlnet: str | None = Field(None, description="which of the model's ControlNets steers the generation, by name")
    lora: str | dict[str, float] | None = Field(
        None, description="a LoRA adapter of the model by name, or adapter names mapped to their weights"
    )
    lora_weight: float = Field(1.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="the weight of a `lora` given by name")
    stream: bool = shared(False, description="stream one JSON line per denoising step, then the json document")

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
    def denoising_steps(self) -> int:
        """The steps that run: img2img and inpaint skip the first (1 - strength) of the schedule."""
        if self.task == "txt2img":
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.effective_strength), self.num_inference_steps)

    def evaluations(self, own_sampler_order: int = 1) -> int:
        """Denoiser evaluations per image: one per step (a second-order sampler such as Heun: 2N-1 for N
        steps), twice over with classifier-free guidance, which evaluates the prompt and the negative one.
        own_sampler_order is the order of the pipeline's own sampler, for a request that names none."""
        sampler = SAMPLERS[self.scheduler] if self.scheduler else Sampler("", order=own_sampler_order)
        return sampler.evaluations(self.denoising_steps) * (2 if self.guidance_scale > 1 else 1)

    def work(self, own_sampler_order: int = 1) -> int:
        """What the request costs: denoiser evaluations x height x width x images (pixel-evaluations)."""
        return self.evaluations(own_sampler_order) * self.height * self.width * self.image_count

    def batch_key(self) -> str:
        """Requests with equal keys can share one pipeline call: they agree on every field that is not
        declared shared in a batch.

        Whether a negative prompt is given splits too: in a shared call every request without one
        gets the empty prompt's embedding, where SDXL alone would use zeros (force_zeros_for_empty_prompt).
        """
        splitting = self.model_dump(exclude=shared_fields(type(self)))
        return json.dumps([bool(self.negative_prompt), splitting], sort_keys=True)


@functools.cache
def shared_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of model declared shared in a batch."""
    return frozenset({name for name, info in model.model_fields.items() if (info.json_schema_extra or {}).get(SHARED_IN_BATCH)})


def check_unicode(text: str) -> None:
    """JSON escapes can carry lone surrogates, which are not text: tokenizers and encoders fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text is not valid Unicode: a lone surrogate {text[error.start]!r} at character {error.start}"
        ) from None


def request_json_schema(defaults: GenerationDefaults | None = None) -> dict:
    """The JSON Schema of a request body, with a model's own defaults where given."""
    schema = GenerationRequest.model_json_schema()
    if defaults is not None:
        for name, value in defaults.model_dump(mode="json").items():
            schema["properties"][name]["default"] = value
    return schema
