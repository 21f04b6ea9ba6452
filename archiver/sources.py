"""Turn a --source argument into a local diffusers pipeline directory."""

import re
import tempfile
import zlib
from pathlib import Path

from diffusers import DiffusionPipeline, UNet2DConditionModel

from archiver.contents import PICKLE_SUFFIXES
from archiver.digits import DEFAULT_WEIGHTS_DIR as DIGITS_WEIGHTS_DIR
from archiver.tiny import (
    build_tiny_controlnet,
    build_tiny_flux,
    build_tiny_pipeline,
    build_tiny_sdxl,
    build_tiny_sdxl_refiner,
    write_tiny_lora,
)

# Built from code, random weights: one per pipeline family.
BUILT_IN = {"tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl, "tiny-flux": build_tiny_flux}
TINY_ADAPTER = "tiny"  # as an adapter source: a random adapter that fits the pipeline being packed
SHIPPED = {"digits": DIGITS_WEIGHTS_DIR}  # trained weights committed to the repository
# Generation defaults that suit a shipped model, used where the build command sets none.
RECOMMENDED_DEFAULTS = {
    "digits": {"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 4.0},
}
# The `batching` that suits a shipped model where the build command sets none. At 64x64, four
# requests ran 2.5-3x faster in one call on a 2-core CPU (README, Batching); `auto` keeps CPUs
# per_request, since at real sizes combining gains little and costs bit-identical answers.
RECOMMENDED_BATCHING = {"digits": "combined"}


# The Hub's repo id form (huggingface_hub's validate_repo_id), with the owner required: diffusers
# pipelines live under one. Anything else that names no local directory is a mistyped path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class SourceError(Exception):
    """The source cannot be turned into a safe pipeline directory; the message says why."""


def resolve_source(
    source: str, workdir: Path, allow_pickle_weights: bool = False, revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """A built-in name, a local directory, or a Hugging Face Hub id, as a local directory."""
    if source in SHIPPED:
        print(f"using the shipped {source!r} pipeline in {SHIPPED[source]}")
        return SHIPPED[source]
    if source in BUILT_IN:
        print(f"building the built-in {source!r} pipeline from code (random weights, no download)")
        target = workdir / source
        BUILT_IN[source](workdir).save_pretrained(target, safe_serialization=True)
        return target
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise SourceError(f"{local} is not a diffusers pipeline directory: it has no model_index.json")
        return local
    if local.exists():
        raise SourceError(f"{source} is not a directory")
    if not HUB_ID.fullmatch(source) or "--" in source or ".." in source:
        raise SourceError(
            f"{source} is neither a local directory (none exists there) nor a Hugging Face Hub id of the form "
            "owner/name; nothing was downloaded"
        )
    return download_from_hub(source, allow_pickle_weights, revision, variant)


def resolve_refiner(source: str, pipeline_dir: Path, workdir: Path) -> Path:
    """A refiner directory; `tiny` builds one that fits a tiny SDXL base."""
    if source != TINY_ADAPTER:
        return resolve_source(source, workdir / "refiner-source")
    base = DiffusionPipeline.from_pretrained(pipeline_dir, use_safetensors=True)
    if getattr(base, "text_encoder_2", None) is None:
        raise SourceError("a refiner needs an SDXL base pipeline (one with text_encoder_2)")
    target = workdir / "refiner"
    build_tiny_sdxl_refiner(base).save_pretrained(target, safe_serialization=True)
    return target


def resolve_controlnet(source: str, pipeline_dir: Path, workdir: Path, name: str) -> Path:
    """A ControlNet directory (with config.json); `tiny` builds one from the pipeline's own UNet."""
    if source == TINY_ADAPTER:
        target = workdir / "controlnets" / name
        controlnet = build_tiny_controlnet(_unet(pipeline_dir), seed=zlib.crc32(name.encode()))
        controlnet.save_pretrained(target, safe_serialization=True)
        return target
    local = Path(source).expanduser()
    if not (local / "config.json").is_file():
        raise SourceError(f"ControlNet {name!r}: {source} is not a directory with a config.json")
    return local


def resolve_lora(source: str, pipeline_dir: Path, workdir: Path, name: str) -> Path:
    """A LoRA directory holding safetensors weights; `tiny` writes a random one for the pipeline's UNet."""
    if source == TINY_ADAPTER:
        # Seeded by name, so differently named tiny adapters differ.
        return write_tiny_lora(_unet(pipeline_dir), workdir / "loras" / name, seed=zlib.crc32(name.encode()))
    local = Path(source).expanduser()
    weights = [local] if local.is_file() else list(local.glob("*.safetensors")) if local.is_dir() else []
    if not weights or any(path.suffix != ".safetensors" for path in weights):
        raise SourceError(f"LoRA {name!r}: {source} is neither a .safetensors file nor a directory holding one")
    if local.is_file():
        target = workdir / "loras" / name
        target.mkdir(parents=True, exist_ok=True)
        (target / local.name).write_bytes(local.read_bytes())
        return target
    return local


def _unet(pipeline_dir: Path) -> UNet2DConditionModel:
    if not (pipeline_dir / "unet").is_dir():
        raise SourceError("tiny ControlNets and LoRAs are built for UNet pipelines; this one has no unet/")
    return UNet2DConditionModel.from_pretrained(pipeline_dir / "unet", use_safetensors=True)


def download_from_hub(repo_id: str, allow_pickle_weights: bool, revision: str | None, variant: str | None) -> Path:
    """The pipeline's files in the Hugging Face cache, downloaded once.

    diffusers fetches only the component folders that model_index.json names, safetensors unless
    pickle weights are allowed, and the variant's weights where asked. A later build of the same
    revision reads the cache, and with HF_HUB_OFFLINE=1 a build never leaves it.
    """
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    print(f"fetching {repo_id} through {where}" + (", offline: HF_HUB_OFFLINE is set" if offline else ""))
    try:
        snapshot = Path(DiffusionPipeline.download(
            repo_id, revision=revision, variant=variant, use_safetensors=None if allow_pickle_weights else True
        ))
    except Exception as error:  # hub, network and cache errors have no common base
        advice = (
            f"HF_HUB_OFFLINE is set, so only models already in {where} can be built; unset it to download"
            if offline else
            "Check the id and your connection, log in with `hf auth login` for gated models, or download it "
            "elsewhere and pass the local directory as --source"
        )
        raise SourceError(f"could not fetch {repo_id!r} ({type(error).__name__}: {error}). {advice}.") from error
    print(f"using {snapshot}")
    return snapshot


def pickle_only_components(pipeline_dir: Path) -> list[str]:
    """Component folders whose weights exist only in pickle formats, which can run code on load."""
    unsafe = []
    for folder in sorted(path for path in pipeline_dir.iterdir() if path.is_dir()):
        files = [path for path in folder.rglob("*") if path.is_file()]
        has_pickle = any(path.suffix in PICKLE_SUFFIXES for path in files)
        has_safetensors = any(path.suffix == ".safetensors" for path in files)
        if has_pickle and not has_safetensors:
            unsafe.append(folder.name)
    return unsafe


def new_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="archiver-")
