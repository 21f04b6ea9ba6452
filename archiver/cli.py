"""`python -m archiver build`: pack a diffusers pipeline into a TorchServe model archive."""

import argparse
import sys
import tempfile
from pathlib import Path
from typing import get_args

from archiver.build import ServingConfig, archive_path, build_archive, built_from
from archiver.contents import COMPONENT_NAME, UnsafePipeline
from archiver.references import REFERENCE_THRESHOLD, WEIGHTS_MODES
from archiver.settings import handler_section, parse_assignments
from archiver.sources import (
    SHIPPED,
    SourceError,
    pickle_only_components,
    resolve_controlnet,
    resolve_lora,
    resolve_source,
)
from handlers.core.config import Batching, TorchDtype
from handlers.core.flags import add_schema_arguments
from handlers.core.schema import GenerationDefaults

FORMATS = ("zip-store", "default", "no-archive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m archiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a .mar from a pipeline")
    build.add_argument("--source", default="digits", help="a local diffusers directory, a Hugging Face Hub id "
                       f"(owner/name), or a shipped model: {', '.join(SHIPPED)} (default: %(default)s)")
    build.add_argument("--model-name", default="stable_diffusion", help="archive and model name (default: %(default)s)")
    build.add_argument("--export-path", type=Path, default=Path("model-store"),
                       help="where the archive goes (default: ./model-store)")
    build.add_argument(
        "--archive-format", choices=FORMATS, default="zip-store",
        help="zip-store: one .mar, stored without compression (weights do not compress, so deflating them "
        "only costs time, at every build and every start); default: torch-model-archiver's deflated .mar; "
        "no-archive: a directory, nothing to unpack at start-up (default: %(default)s)",
    )
    build.add_argument(
        "--weights", choices=WEIGHTS_MODES, default="auto",
        help="pack: the weights go into the archive; reference: the archive holds the pipeline's configs, tokenizer "
        "files and a manifest of its weights (sizes, sha256), which stay where they are and are checked at every "
        "start (DIFFUSION_WEIGHTS_ROOT or weights_root says where they are when they move); auto: reference a "
        f"Hugging Face cache snapshot or over {REFERENCE_THRESHOLD // 2**30} GiB of weights, pack the rest "
        "(default: %(default)s)",
    )
    build.add_argument("--version", default="1.0")
    build.add_argument("--revision", help="hub revision (branch, tag or commit) to download")
    build.add_argument("--variant", help="the weights variant to fetch and load, as diffusers names it (fp16: half "
                       "the download where the repository has it); written into the handler: section")
    build.add_argument("--force", action="store_true",
                       help="replace an existing archive of this name that was built from another source")
    add_serving_arguments(build)
    add_handler_arguments(build)
    return parser


def add_serving_arguments(build: argparse.ArgumentParser) -> None:
    serving = build.add_argument_group("TorchServe settings written into model-config.yaml")
    serving.add_argument("--min-workers", type=int, default=1)
    serving.add_argument("--max-workers", type=int, default=1)
    serving.add_argument("--batch-size", type=int, default=1)
    serving.add_argument(
        "--max-batch-delay", type=positive_int, default=ServingConfig.max_batch_delay_ms,
        help="milliseconds a lone request waits for batch-mates; requests already queued join at once, so a "
        "short wait costs no throughput (docs/batching.md). TorchServe ignores 0 and waits 100 ms (default: %(default)s)",
    )
    serving.add_argument(
        "--request-timeout", type=positive_int, default=600,
        help="seconds a request of max_work may take on the serving hardware: written as the handler's "
        "request_timeout_s, and TorchServe's responseTimeout (per batch) becomes batch size x this (default: %(default)s)",
    )
    serving.add_argument("--startup-timeout", type=int, default=600, help="seconds to load the model")
    serving.add_argument(
        "--server-config", type=Path, default=Path("config.properties"),
        help="the config.properties that will serve the archive: its max_response_size becomes the handler's "
        "max_response_bytes (default: ./config.properties, or TorchServe's defaults where there is none)",
    )


def add_handler_arguments(build: argparse.ArgumentParser) -> None:
    defaults = build.add_argument_group(
        "generation defaults written into the handler: section (the request schema's fields)",
        "Unset ones take the source's recommended defaults (digits: 64x64, 25 steps, guidance 4), "
        "else the handler's built-in ones (7.5, 50 steps, 768x768, numpy).",
    )
    add_schema_arguments(defaults, GenerationDefaults)
    handler = build.add_argument_group("other handler settings")
    handler.add_argument("--torch-dtype", choices=get_args(TorchDtype), default="auto")
    handler.add_argument(
        "--batching", choices=get_args(Batching),
        help="combined: compatible requests share a pipeline call; per_request: pixels never depend on "
        "batch neighbours; auto: combined on CUDA, per_request on CPU; step: requests join the running batch at "
        "the next denoising step (docs/step-batching.md) (default: the source's recommended one, digits: "
        "combined; else auto)",
    )
    handler.add_argument(
        "--set", dest="handler_options", metavar="KEY=VALUE", action="append", default=[],
        help="any other handler setting, VALUE read as YAML: --set attention_slicing=auto --set vae_tiling=true "
        "(README, Configuration)",
    )
    handler.add_argument("--allow-unsafe-weights", action="store_true",
                         help="pack and load pickle (.bin/.ckpt) weights; pickle can run arbitrary code when loaded")

    adapters = build.add_argument_group("adapters packed into the archive", "SOURCE is a local directory.")
    adapters.add_argument("--refiner", metavar="SOURCE", help="an SDXL refiner (directory or hub id)")
    adapters.add_argument("--controlnet", metavar="NAME=SOURCE", action="append", default=[],
                          help="a ControlNet requests choose by NAME, e.g. canny=./controlnet-canny")
    adapters.add_argument("--lora", metavar="NAME=SOURCE", action="append", default=[],
                          help="a LoRA adapter (directory or .safetensors file) requests choose by NAME")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        section, config = handler_section(args)
        controlnet_sources = adapter_sources(args.controlnet, "--controlnet")
        lora_sources = adapter_sources(args.lora, "--lora")
    except ValueError as error:  # pydantic's ValidationError is one
        print(f"error: {error}", file=sys.stderr)
        return 2
    source = source_identity(args.source, args.revision)
    target = archive_path(args.export_path, args.model_name, args.archive_format)
    if target.exists() and not args.force and built_from(target) != source:
        earlier = built_from(target)
        print(
            f"error: {target} exists and was built from {'an unknown source' if earlier is None else repr(earlier)}, "
            f"not {source!r}. Pass --force to replace it, or choose another --model-name or --export-path.",
            file=sys.stderr,
        )
        return 2
    serving = ServingConfig(
        min_workers=args.min_workers, max_workers=args.max_workers, batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay, response_timeout_s=args.batch_size * args.request_timeout,
        startup_timeout_s=args.startup_timeout, handler=section,
    )
    with tempfile.TemporaryDirectory(prefix="archiver-") as workdir_name:
        workdir = Path(workdir_name)
        try:
            pipeline_dir = resolve_source(args.source, args.allow_unsafe_weights, args.revision, config.variant)
            extras = {}
            if args.refiner:
                extras["refiner"] = resolve_source(args.refiner)
                section["refiner"] = "refiner"
            for name, controlnet in controlnet_sources.items():
                extras[f"controlnets/{name}"] = resolve_controlnet(controlnet, name)
                section.setdefault("controlnets", {})[name] = f"controlnets/{name}"
            for name, lora in lora_sources.items():
                extras[f"loras/{name}"] = resolve_lora(lora, name, workdir)
                section.setdefault("loras", {})[name] = f"loras/{name}"
            unsafe = pickle_only_components(pipeline_dir)
            if unsafe and not args.allow_unsafe_weights:
                raise SourceError(
                    f"these components have only pickle weights (.bin/.ckpt), which can run code when loaded: "
                    f"{', '.join(unsafe)}. Convert them to safetensors, or pass --allow-unsafe-weights "
                    "if you trust the source."
                )
            build_archive(
                pipeline_dir, args.model_name, args.export_path, serving, workdir,
                archive_format=args.archive_format, version=args.version,
                allow_pickle_weights=args.allow_unsafe_weights, extras=extras, source=source, weights=args.weights,
            )
        except (SourceError, UnsafePipeline) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


def adapter_sources(assignments: list[str], option: str) -> dict[str, str]:
    """NAME=SOURCE pairs; NAME becomes a folder of the archive (controlnets/NAME), so it must be a plain name."""
    sources = parse_assignments(assignments, option, as_yaml=False)
    for name in sources:
        if not COMPONENT_NAME.fullmatch(name):
            raise ValueError(f"{option} {name}=...: the name must be letters, digits, '_' and '-', so that it names a "
                             "folder inside the archive")
    return sources


def source_identity(source: str, revision: str | None) -> str:
    """What names a source across builds: a local directory's absolute path, else the name or hub id."""
    local = Path(source).expanduser()
    if local.exists():
        return str(local.resolve())
    return f"{source}@{revision}" if revision else source


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value
