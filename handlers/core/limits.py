"""What one request may cost a worker, and the checks that refuse more before any work is done."""

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.formats import IMAGE_CODECS
from handlers.core.schema import GenerationDefaults, GenerationRequest

# TorchServe's default max_request_size: a body is read only up to it, on either engine.
MAX_REQUEST_BYTES = 6_553_500
# TorchServe's default max_response_size, for a server whose config.properties sets none.
MAX_RESPONSE_BYTES = 6_553_500

# Work is counted in pixel-evaluations: one pixel through one evaluation of the denoiser (the UNet or
# transformer). A step is one evaluation, twice over with classifier-free guidance; Heun makes 2N-1 for N
# steps. The default is eight 1024x1024 images of 50 steps with guidance. The tiny test model runs about 4
# million pixel-evaluations a second on a 2-core CPU, so this budget ends within the default
# request_timeout_s (600 s) there; a GPU runs real models many times faster. Set it for your model and hardware.
DEFAULT_MAX_WORK = 8 * 50 * 2 * 1024 * 1024

# The most bytes the answer to a request can take, as the engine sends it.
SizeBound = Callable[[GenerationRequest], int]


class Limits(BaseModel):
    """Per-model caps that protect the worker; requests past them get 400 or 413."""

    model_config = ConfigDict(extra="forbid")

    max_images_per_prompt: int = Field(8, ge=1, le=64, description="the most num_images_per_prompt a request may ask for")
    max_pixels: int = Field(1536 * 1536, ge=64 * 64, description="height x width of one image")
    max_images_per_request: int = Field(16, ge=1, description="prompts x num_images_per_prompt")
    max_input_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="width x height of an input image, checked before it is decoded"
    )
    max_response_bytes: int = Field(
        104_857_600,
        ge=1,
        description="the server's max_response_size (the archiver copies it from config.properties); an answer "
        "that could be larger is refused with 413 before any work, since TorchServe would drop it and the worker",
    )
    request_timeout_s: int = Field(
        600, ge=1,
        description="the seconds a request of max_work takes at most on this hardware: TorchServe's "
        "responseTimeout must cover a batch of them (batchSize x this; the archiver writes it so), or a full batch "
        "of legal requests outlives it and the frontend kills the worker",
    )
    max_work: int = Field(
        DEFAULT_MAX_WORK,
        ge=1,
        description="the pixel-evaluations one request may ask for: denoiser evaluations (a step each, twice with "
        "guidance, 2N-1 for Heun's N steps) x height x width x images; past it, 413 before any work",
    )


def check_limits(request: GenerationRequest, limits: Limits, size_bound: SizeBound, own_sampler_order: int = 1) -> None:
    """own_sampler_order: evaluations per step of the pipeline's own sampler, for a request that names none."""
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
    work = request.work(own_sampler_order)
    if work > limits.max_work:
        raise PayloadTooLarge(
            f"the request asks for {request.evaluations(own_sampler_order)} denoiser evaluations ({request.denoising_steps} "
            f"steps{', twice with guidance' if request.guidance_scale > 1 else ''}) x {request.width}x{request.height} "
            f"pixels x {request.image_count} images = {work} pixel-evaluations; this model allows {limits.max_work} "
            "per request: ask for fewer steps, fewer images or smaller images",
            field="num_inference_steps",
            allowed={"max_work": limits.max_work},
        )
    answer_bytes = size_bound(request)
    if answer_bytes > limits.max_response_bytes:
        raise PayloadTooLarge(
            f"the answer could take {answer_bytes} bytes as {request.output_format}, over the server's limit of "
            f"{limits.max_response_bytes}: ask for a compressed output_format ({', '.join(IMAGE_CODECS)}), fewer "
            "images, or smaller images",
            field="output_format",
            allowed={"max_response_bytes": limits.max_response_bytes, "output_format": list(IMAGE_CODECS)},
        )


def check_defaults_fit(defaults: GenerationDefaults, limits: Limits, size_bound: SizeBound, own_sampler_order: int = 1) -> None:
    """At start-up and at build time: a request that sets nothing must pass the model's own limits."""
    try:
        request = GenerationRequest(**{**defaults.model_dump(), "prompt": "x", "seed": 0})
        check_limits(request, limits, size_bound, own_sampler_order)
    except RequestError as error:
        raise ValueError(
            f"the handler: section's defaults break its own limits, so every request that relies on them would "
            f"be refused: {error.message}. Raise the limit (max_response_size in config.properties, then "
            "rebuild the archive) or change the default"
        ) from None
