"""Handler settings: built-in defaults, overridden by the model-config.yaml `handler:` section."""

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from handlers.core.limits import Limits
from handlers.core.schema import GenerationDefaults, request_json_schema

TorchDtype = Literal["auto", "float32", "float16", "bfloat16"]
Batching = Literal["auto", "combined", "per_request", "step"]
CpuOffload = Literal["none", "model", "sequential"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
KServeProtocol = Literal["none", "v1", "v2"]
# diffusers' attention dispatcher backends that run from installed code; its "_hub" backends download
# kernels at load time, which a server must not do.
AttentionBackend = Literal[
    "native", "_native_flash", "_native_efficient", "_native_cudnn", "_native_math", "flash", "_flash_3", "sage",
    "xformers", "flex",
]


class HandlerConfig(GenerationDefaults, Limits):
    """Everything the `handler:` section of model-config.yaml may set: the requests' defaults, the model's
    limits, and how the pipeline loads and runs."""

    torch_dtype: TorchDtype = Field(
        "auto", description="auto is float16 on CUDA and float32 on CPU"
    )
    batching: Batching = Field(
        "auto",
        description="combined: compatible requests share one pipeline call (faster); per_request: one call "
        "each, so pixels never depend on batch neighbours; auto: combined on CUDA, per_request on CPU; step: "
        "requests join the running batch at the next denoising step and leave after their last "
        "(docs/step-batching.md; TorchServe also needs continuousBatching: true, which the archiver writes)",
    )
    kserve_protocol: KServeProtocol = Field(
        "none",
        description="KServe's protocol, for a model behind KServe's TorchServe wrapper: the handler reads v1 "
        "{\"instances\": [...]} or v2 {\"inputs\": [...]} bodies and answers in kind, every byte of the answer "
        "counted before any work. TorchServe's own service_envelope stays unset: it would parse a client's "
        "bytes before any guard",
    )
    allow_pickle_weights: bool = Field(
        False, description="load .bin/.ckpt weights; pickle can run code, so only for trusted models"
    )
    safety_checker: bool = Field(
        True,
        description="run the pipeline's own safety checker where it ships one (SD 1.x/2.x): a flagged image comes back "
        "black, and nsfw_content_detected (json) or X-NSFW-Content-Detected (header) says which; false loads the "
        "pipeline without it",
    )
    variant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]{1,32}$",
        description="the weights variant to load, as diffusers names it (fp16: unet/diffusion_pytorch_model.fp16.safetensors)",
    )
    unpack_dir: str | None = Field(
        None, description="where a model.zip is unpacked once per model version; default: inside the model dir"
    )
    max_unpacked_bytes: int = Field(
        64 * 2**30, ge=1, description="a model.zip that unpacks to more is refused (zip bombs); default 64 GiB"
    )
    weights_root: str | None = Field(
        None,
        description="for an archive that references its weights (the archiver's --weights reference): the directory "
        "they are in on this machine, or the Hugging Face cache holding them; default: where the build found them. "
        "The DIFFUSION_WEIGHTS_ROOT environment variable, where set, wins: a deployment knows where it mounted them",
    )
    verify_weights: Literal["sampled", "full"] = Field(
        "sampled",
        description="what start-up checks of referenced weights beyond their sizes and Hugging Face blob names: "
        "sampled: the sha256 of 16 slices of 64 KiB spread over each file (milliseconds; a file re-saved or "
        "swapped fails it); full: each file's sha256 (reads every byte: about 3 s per 4 GB here)",
    )
    attention_slicing: Literal["auto", "max"] | int | None = Field(
        None, description="compute attention in slices: less peak memory, a little slower"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time: less peak memory")
    vae_tiling: bool = Field(False, description="decode in overlapping tiles: large images fit, slower, may show seams")
    cpu_offload: CpuOffload = Field(
        "none",
        description="CUDA only. model: each model moves to the GPU while it runs (much less GPU memory, a little "
        "slower); sequential: each layer does (least GPU memory, several times slower)",
    )
    channels_last: bool = Field(False, description="UNet/VAE weights in NHWC layout: often faster convolutions on GPUs")
    fuse_qkv_projections: bool = Field(
        False,
        description="fuse attention's query, key and value projections into one matrix multiply, in the denoiser "
        "and the VAE (diffusers' fuse_qkv_projections): fewer, larger kernels; same result up to rounding",
    )
    attention_backend: AttentionBackend | None = Field(
        None,
        description="the denoiser's attention kernel, for models whose attention goes through diffusers' "
        "dispatcher (FLUX, SD3): native is PyTorch's SDPA choosing flash or memory-efficient itself; "
        "_native_flash forces its flash kernel; flash, _flash_3, sage and xformers need their package. UNet "
        "models (SD 1.5, SDXL) always use PyTorch's SDPA, which picks flash attention on CUDA in half precision",
    )
    torch_compile: bool = Field(
        False, description="compile the UNet or transformer; slower start (warmed up in initialize), faster steps"
    )
    warm_up: bool = Field(
        True,
        description="one short generation at the default size inside initialize, so that the first request "
        "costs what a warm one does (its kernels, caches and weight pages are ready); false: READY sooner, and "
        "the first request pays instead. Compiled models always warm up",
    )
    compile_regions: bool = Field(
        False,
        description="with torch_compile, compile only the denoiser's repeated blocks (diffusers' regional "
        "compilation): one block compiles once for all, so compiling and warming a worker take a fraction of "
        "the time (measured: 18.6 s against 48.9 s cold, 3.7 s against 6.0 s from the cache, digits model on 2 cores)",
    )
    compile_mode: CompileMode = Field("default", description="torch.compile mode")
    compile_backend: str = Field("inductor", description="torch.compile backend")
    compile_cache_dir: str | None = Field(
        None,
        description="where inductor keeps compiled graphs and kernels, so that the next worker (a second one, a "
        "scaled-up one, a restarted one) loads them instead of compiling; default: inductor's own, "
        "/tmp/torchinductor_<user>, which every worker on the machine shares. Point it at a volume in containers",
    )
    loras: dict[str, str] = Field({}, description="LoRA adapters by name, each a path inside the archive; loaded once")
    controlnets: dict[str, str] = Field({}, description="ControlNets by name (canny, ...), each a path inside the archive")
    refiner: str | None = Field(None, description="an SDXL refiner pipeline: a path inside the archive")
    refiner_switch: float = Field(
        0.8, gt=0, lt=1, description="fraction of the denoising done by the base model before the refiner takes over"
    )

    @model_validator(mode="after")
    def step_batching_answers_plain_requests(self) -> "HandlerConfig":
        # A KServe body's instances share one answer, which a running set would have to hold back.
        if self.batching == "step" and self.kserve_protocol != "none":
            raise ValueError("batching: step serves plain requests only; KServe's protocols need another batching")
        return self

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return GenerationDefaults(**self.model_dump(include=set(GenerationDefaults.model_fields)))

    @property
    def limits(self) -> Limits:
        return Limits(**self.model_dump(include=set(Limits.model_fields)))


def load_handler_config(model_yaml_config: dict | None) -> HandlerConfig:
    section = (model_yaml_config or {}).get("handler") or {}
    try:
        return HandlerConfig(**section)
    except ValidationError as error:
        raise ValueError(f"invalid `handler:` section in model-config.yaml: {error}") from error


def model_description(config: HandlerConfig) -> dict:
    """What a client needs to build a form or a typed client for this model: the request's JSON Schema with
    the model's defaults, its limits, and its adapters by name. Each engine publishes it."""
    return {
        "request": request_json_schema(config.generation_defaults),
        "limits": config.limits.model_dump(),
        "loras": sorted(config.loras),
        "controlnets": sorted(config.controlnets),
    }
