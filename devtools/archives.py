"""`python -m devtools.archives build ...`: the archiver's own command, with the development models as
sources. `--source tiny`, `tiny-sdxl` or `tiny-flux` builds that pipeline (random weights) into a folder
first; an adapter source `tiny` (`--controlnet canny=tiny`, `--lora style=tiny`, `--refiner tiny`) builds
a random one that fits the pipeline. Everything else passes to `python -m archiver build` untouched.

Built models are kept in a cache folder named after the builders' code, so a rebuild of an archive sees
the same source and the archiver's provenance check holds.
"""

import getpass
import hashlib
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

from diffusers import DiffusionPipeline, UNet2DConditionModel
from filelock import FileLock

from archiver.cli import main as archiver_main
from devtools.models import tiny
from devtools.models.tiny import (
    build_tiny_controlnet,
    build_tiny_flux,
    build_tiny_pipeline,
    build_tiny_sdxl,
    build_tiny_sdxl_refiner,
    write_tiny_lora,
)

BUILT_IN = {"tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl, "tiny-flux": build_tiny_flux}
TINY_ADAPTER = "tiny"
CACHE = Path(tempfile.gettempdir()) / f"devtools-models-{getpass.getuser()}"


def model_dir(name: str) -> Path:
    """A built-in pipeline's directory, built once per version of the builders."""
    def build(target: Path) -> None:
        with tempfile.TemporaryDirectory() as workdir:  # the tokenizer's source files
            BUILT_IN[name](Path(workdir)).save_pretrained(target, safe_serialization=True)

    return cached(name, build)


def cached(name: str, build) -> Path:
    """build(target) once per version of the builders' code; concurrent builders wait for the first."""
    version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    target = CACHE / f"{name}-{version}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)  # left half-built by a builder that died
            build(target)
            (target / ".complete").touch()
    return target


def tiny_controlnet(base: Path, name: str) -> Path:
    """A random ControlNet made from the pipeline's own UNet, seeded by its name."""
    def build(target: Path) -> None:
        controlnet = build_tiny_controlnet(_unet(base), seed=zlib.crc32(name.encode()))
        controlnet.save_pretrained(target, safe_serialization=True)

    return cached(f"{base.name}-controlnet-{name}", build)


def tiny_lora(base: Path, name: str) -> Path:
    """A random LoRA for the pipeline's UNet, seeded by its name (so differently named ones differ)."""
    return cached(f"{base.name}-lora-{name}", lambda target: write_tiny_lora(_unet(base), target, seed=zlib.crc32(name.encode())))


def tiny_refiner(base: Path) -> Path:
    """A random SDXL refiner that shares the tiny SDXL base's second text encoder and VAE."""
    def build(target: Path) -> None:
        pipeline = DiffusionPipeline.from_pretrained(base, use_safetensors=True)
        build_tiny_sdxl_refiner(pipeline).save_pretrained(target, safe_serialization=True)

    return cached(f"{base.name}-refiner", build)


def _unet(base: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)


def resolve_arguments(argv: list[str]) -> list[str]:
    """argv with every development model name replaced by the folder it was built into."""
    argv = [part for argument in argv for part in (argument.split("=", 1) if argument.startswith("--") and "=" in argument
                                                   else [argument])]
    resolved, base = list(argv), None
    for index, argument in enumerate(argv[:-1]):
        if argument == "--source" and argv[index + 1] in BUILT_IN:
            base = model_dir(argv[index + 1])
            resolved[index + 1] = str(base)
    for index, argument in enumerate(argv[:-1]):
        value = argv[index + 1]
        if argument == "--refiner" and value == TINY_ADAPTER:
            resolved[index + 1] = str(tiny_refiner(base))
        elif argument in ("--controlnet", "--lora") and value.endswith("=" + TINY_ADAPTER):
            name = value.split("=", 1)[0]
            folder = tiny_controlnet(base, name) if argument == "--controlnet" else tiny_lora(base, name)
            resolved[index + 1] = f"{name}={folder}"
    return resolved


def main(argv: list[str] | None = None) -> int:
    return archiver_main(resolve_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
