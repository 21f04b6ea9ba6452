"""Load a diffusers pipeline with its adapters, and apply the memory and speed options."""

import json
import logging
import os
from pathlib import Path, PurePosixPath

import diffusers
import torch
from diffusers import DiffusionPipeline

from handlers.core.config import HandlerConfig
from handlers.core.execution_device import pin_execution_device

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(gpu_id: int | None) -> torch.device:
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPU kernels for float16 are slow or missing, so half precision is a CUDA-only default.
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_batching(name: str, device: torch.device) -> bool:
    """Whether compatible requests share one pipeline call.

    Kernels are not batch-invariant (oneDNN convolutions, thread chunking), so a shared call can move
    a pixel by one grey level against the same request run alone. CPUs gain little from sharing at
    real image sizes, so there the default keeps pixels independent of batch neighbours.
    """
    if name == "auto":
        return device.type == "cuda"
    return name == "combined"


def load_pipeline(
    source: str | Path, dtype: torch.dtype, allow_pickle_weights: bool = False, variant: str | None = None, **components
):
    """Load from a local directory or a hub id, safetensors only unless pickle is allowed."""
    pipeline = DiffusionPipeline.from_pretrained(
        source, dtype=dtype, use_safetensors=None if allow_pickle_weights else True, variant=variant, **components
    )
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker log
    return pipeline


def ships_safety_checker(pipeline_dir: Path) -> bool:
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    return (index.get("safety_checker") or [None])[0] is not None


def resolve_reference(reference: str, pipeline_dir: Path, setting: str) -> Path:
    """A `handler:` setting's path, which must lead to something inside the archive.

    The archive is what was checked when it was built; a path out of it, or a hub id fetched at
    start-up, would load whatever sits there on the serving machine.
    """
    root = pipeline_dir.resolve()
    inside = (root / reference).resolve()
    if PurePosixPath(reference).is_absolute() or ".." in PurePosixPath(reference).parts or not inside.is_relative_to(root):
        raise ValueError(f"{setting}: {reference!r} leads outside the archive; only paths inside it are loaded")
    if not inside.exists():
        raise ValueError(
            f"{setting}: {reference!r} is not in the archive (hub ids and outside paths are not loaded at start-up); "
            "pack it with the archiver's --lora, --controlnet or --refiner"
        )
    return inside


def load_loras(pipeline: DiffusionPipeline, loras: dict[str, str], pipeline_dir: Path, allow_pickle: bool) -> None:
    """Load every adapter once; requests switch between them with set_adapters, never reloading the base."""
    for name, reference in loras.items():
        logger.info("loading LoRA adapter %r from %s", name, reference)
        pipeline.load_lora_weights(
            resolve_reference(reference, pipeline_dir, f"loras.{name}"),
            adapter_name=name,
            use_safetensors=None if allow_pickle else True,
        )
    if loras:
        pipeline.disable_lora()  # requests that name no adapter get the base model


def load_controlnets(
    controlnets: dict[str, str], pipeline_dir: Path, dtype: torch.dtype, allow_pickle: bool
) -> dict[str, torch.nn.Module]:
    """Each ControlNet as the model class its config names (ControlNetModel, FluxControlNetModel, ...)."""
    loaded = {}
    for name, reference in controlnets.items():
        source = resolve_reference(reference, pipeline_dir, f"controlnets.{name}")
        model_class = getattr(diffusers, _config_class_name(source) or "ControlNetModel")
        logger.info("loading ControlNet %r (%s) from %s", name, model_class.__name__, source)
        loaded[name] = model_class.from_pretrained(source, dtype=dtype, use_safetensors=None if allow_pickle else True)
    return loaded


def _config_class_name(source: Path) -> str | None:
    config = source / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def denoiser(pipeline: DiffusionPipeline) -> torch.nn.Module:
    """The model that runs at every step: the UNet, or the transformer of FLUX/SD3-style pipelines."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


def apply_memory_options(pipeline: DiffusionPipeline, config: HandlerConfig, device: torch.device) -> None:
    """Apply the handler section's memory and speed options, then place the pipeline on its device."""
    if config.attention_slicing is not None:
        pipeline.enable_attention_slicing(config.attention_slicing)
    if config.vae_slicing:
        pipeline.vae.enable_slicing()
    if config.vae_tiling:
        pipeline.vae.enable_tiling()
    if config.fuse_qkv_projections:
        for module in (denoiser(pipeline), pipeline.vae):
            module.fuse_qkv_projections()
    if config.attention_backend is not None:
        set_attention_backend(denoiser(pipeline), config.attention_backend)
    if config.channels_last:
        for module in (denoiser(pipeline), pipeline.vae):
            module.to(memory_format=torch.channels_last)
    if config.cpu_offload != "none" and device.type != "cuda":
        raise ValueError(f"cpu_offload: {config.cpu_offload} needs a CUDA device; this worker runs on {device}")
    if config.cpu_offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif config.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
        pin_execution_device(pipeline, device)


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    # diffusers passes over attention modules that do not dispatch, so a UNet would keep SDPA without a word.
    if not any(hasattr(getattr(module, "processor", None), "_attention_backend") for module in model.modules()):
        raise ValueError(
            f"attention_backend: {type(model).__name__}'s attention does not go through diffusers' dispatcher; "
            "it always runs PyTorch's SDPA. Leave attention_backend out for this model"
        )
    model.set_attention_backend(backend)


def compile_denoiser(pipeline: DiffusionPipeline, config: HandlerConfig) -> None:
    """Compile in place, so every view that shares the module (img2img, schedulers) runs compiled."""
    if config.compile_cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config.compile_cache_dir  # inductor reads it when it first caches
    model = denoiser(pipeline)
    if config.compile_regions:
        model.compile_repeated_blocks(mode=config.compile_mode, backend=config.compile_backend)
    else:
        model.compile(mode=config.compile_mode, backend=config.compile_backend)


def compile_counts() -> tuple[int, int]:
    """Graphs inductor has compiled, and graphs it has loaded from its on-disk cache, in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]

