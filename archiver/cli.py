"""`python -m archiver build`: pack a diffusers pipeline into a TorchServe model archive."""

import argparse
import sys
from pathlib import Path
from typing import get_args

import yaml

from archiver.build import ServingConfig, archive_path, build_archive, built_from

TORCHSERVE_MAX_RESPONSE_SIZE = 6_553_500  # TorchServe's default, for a config.properties that sets none
from archiver.contents import UnsafePipeline
from archiver.sources import (
    BUILT_IN,
    RECOMMENDED_BATCHING,
    RECOMMENDED_DEFAULTS,
    SHIPPED,
    TINY_ADAPTER,
    SourceError,
    new_workdir,
    pickle_only_components,
    resolve_controlnet,
    resolve_lora,
    resolve_refiner,
    resolve_source,
)
from handlers.core.config import Batching, GenerationDefaults, HandlerConfig, OutputFormat, TorchDtype
from handlers.core.request import check_defaults_fit
from handlers.envelopes import answer_bound
from handlers.core.schedulers import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m archiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a .mar from a pipeline")
    build.add_argument(
        "--source",
        default="tiny",
        help=f"a local diffusers directory, a Hugging Face Hub id (owner/name), or a built-in: {', '.join([*SHIPPED, *BUILT_IN])} "
        "(default: tiny)",
    )
    build.add_argument("--model-name", default="stable_diffusion", help="archive and model name (default: %(default)s)")
    build.add_argument("--export-path", type=Path, default=Path("model-store"),
                       help="where the archive goes (default: ./model-store)")
    build.add_argument(
        "--archive-format", choices=("zip-store", "default", "no-archive"), default="zip-store",
        help="zip-store: one .mar, stored without compression (weights do not compress, so deflating them "
        "only costs time, at every build and every start); default: torch-model-archiver's deflated .mar; "
        "no-archive: a directory, nothing to unpack at start-up (default: %(default)s)",
    )
    build.add_argument("--version", default="1.0")
    build.add_argument("--revision", help="hub revision (branch, tag or commit) to download")
    build.add_argument("--variant", help="the weights variant to fetch and load, as diffusers names it (fp16: half "
                       "the download where the repository has it); written into the handler: section")
    build.add_argument("--force", action="store_true",
                       help="replace an existing archive of this name that was built from another source")

    serving = build.add_argument_group("TorchServe settings written into model-config.yaml")
    serving.add_argument("--min-workers", type=int, default=1)
    serving.add_argument("--max-workers", type=int, default=1)
    serving.add_argument("--batch-size", type=int, default=1)
    serving.add_argument(
        "--max-batch-delay",
        type=positive_int,
        default=ServingConfig.max_batch_delay_ms,
        help="milliseconds a lone request waits for batch-mates; requests already queued join at once, so a "
        "short wait costs no throughput (README, Batching). TorchServe ignores 0 and waits 100 ms (default: %(default)s)",
    )
    serving.add_argument("--response-timeout", type=int, default=600, help="seconds per batch")
    serving.add_argument("--startup-timeout", type=int, default=600, help="seconds to load the model")
    serving.add_argument(
        "--server-config",
        type=Path,
        default=Path("config.properties"),
        help="the config.properties that will serve the archive: its max_response_size and service_envelope "
        "become the handler's max_response_bytes and service_envelope (default: ./config.properties, or "
        "TorchServe's defaults where there is none)",
    )

    handler = build.add_argument_group(
        "generation defaults written into the handler: section",
        "Unset ones take the source's recommended defaults (digits: 64x64, 25 steps, guidance 4), "
        "else the handler's built-in ones (7.5, 50 steps, 768x768, numpy).",
    )
    handler.add_argument("--guidance-scale", type=float)
    handler.add_argument("--num-inference-steps", type=int)
    handler.add_argument("--height", type=int)
    handler.add_argument("--width", type=int)
    handler.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default sampler (default: the pipeline's own)")
    handler.add_argument("--output-format", choices=get_args(OutputFormat))
    handler.add_argument("--torch-dtype", choices=get_args(TorchDtype), default="auto")
    handler.add_argument(
        "--batching",
        choices=get_args(Batching),
        help="combined: compatible requests share a pipeline call; per_request: pixels never depend on "
        "batch neighbours; auto: combined on CUDA, per_request on CPU (default: the source's recommended "
        "one, digits: combined; else auto)",
    )
    handler.add_argument(
        "--set",
        dest="handler_options",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="any other handler option, VALUE read as YAML: --set attention_slicing=auto --set vae_tiling=true "
        "(see README, Memory and speed options)",
    )

    adapters = build.add_argument_group(
        "adapters packed into the archive",
        f"SOURCE is a local directory, or `{TINY_ADAPTER}` for a random one that fits a built-in tiny pipeline.",
    )
    adapters.add_argument("--refiner", metavar="SOURCE", help="an SDXL refiner (directory, hub id or tiny)")
    adapters.add_argument("--controlnet", metavar="NAME=SOURCE", action="append", default=[],
                          help="a ControlNet requests choose by NAME, e.g. canny=./controlnet-canny")
    adapters.add_argument("--lora", metavar="NAME=SOURCE", action="append", default=[],
                          help="a LoRA adapter (directory or .safetensors file) requests choose by NAME")
    handler.add_argument(
        "--allow-unsafe-weights",
        action="store_true",
        help="pack and load pickle (.bin/.ckpt) weights; pickle can run arbitrary code when loaded",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    requested = {
        name: getattr(args, name)
        for name in ("guidance_scale", "num_inference_steps", "height", "width", "scheduler", "output_format")
        if getattr(args, name) is not None
    }
    defaults = GenerationDefaults(**{**RECOMMENDED_DEFAULTS.get(args.source, {}), **requested})
    batching = args.batching or RECOMMENDED_BATCHING.get(args.source, "auto")
    handler_section = {**defaults.model_dump(exclude_none=True), "torch_dtype": args.torch_dtype, "batching": batching}
    if args.allow_unsafe_weights:
        handler_section["allow_pickle_weights"] = True
    if args.variant:
        handler_section["variant"] = args.variant
    try:
        handler_section.update(server_settings(args.server_config))
        handler_section.update(parse_assignments(args.handler_options, "--set"))
        controlnet_sources = parse_assignments(args.controlnet, "--controlnet", as_yaml=False)
        lora_sources = parse_assignments(args.lora, "--lora", as_yaml=False)
        config = HandlerConfig(**handler_section)
        check_defaults_fit(config.generation_defaults, config.limits, answer_bound(config.service_envelope))
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
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        response_timeout_s=args.response_timeout,
        startup_timeout_s=args.startup_timeout,
        handler=handler_section,
    )
    with new_workdir() as workdir_name:
        workdir = Path(workdir_name)
        try:
            pipeline_dir = resolve_source(
                args.source, workdir, args.allow_unsafe_weights, args.revision, config.variant
            )
            extras = {}
            if args.refiner:
                extras["refiner"] = resolve_refiner(args.refiner, pipeline_dir, workdir)
                handler_section["refiner"] = "refiner"
            for kind, sources, resolve in (
                ("controlnets", controlnet_sources, resolve_controlnet),
                ("loras", lora_sources, resolve_lora),
            ):
                for name, source in sources.items():
                    extras[f"{kind}/{name}"] = resolve(source, pipeline_dir, workdir, name)
                    handler_section.setdefault(kind, {})[name] = f"{kind}/{name}"
            unsafe = pickle_only_components(pipeline_dir)
            if unsafe and not args.allow_unsafe_weights:
                raise SourceError(
                    f"these components have only pickle weights (.bin/.ckpt), which can run code when loaded: "
                    f"{', '.join(unsafe)}. Convert them to safetensors, or pass --allow-unsafe-weights "
                    "if you trust the source."
                )
            build_archive(
                pipeline_dir,
                args.model_name,
                args.export_path,
                serving,
                workdir,
                archive_format=args.archive_format,
                version=args.version,
                allow_pickle_weights=args.allow_unsafe_weights,
                extras=extras,
                source=source,
            )
        except (SourceError, UnsafePipeline) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


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


def server_settings(config_path: Path) -> dict:
    """What the handler must know of the server that serves it, which TorchServe does not tell a worker."""
    if config_path == Path("config.properties") and not config_path.exists():
        print("no ./config.properties: the archive assumes TorchServe's default settings", file=sys.stderr)
        return {"max_response_bytes": TORCHSERVE_MAX_RESPONSE_SIZE}
    properties = read_properties(config_path)
    settings = {"max_response_bytes": int(properties.get("max_response_size", TORCHSERVE_MAX_RESPONSE_SIZE))}
    if properties.get("service_envelope"):
        settings["service_envelope"] = properties["service_envelope"]
    return settings


def read_properties(path: Path) -> dict[str, str]:
    """The key=value settings of a TorchServe config.properties file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"--server-config: cannot read {path}: {error.strerror}") from None
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def parse_assignments(assignments: list[str], option: str, as_yaml: bool = True) -> dict:
    parsed = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise ValueError(f"{option} takes KEY=VALUE, got {assignment!r}")
        parsed[key] = yaml.safe_load(value) if as_yaml else value
    return parsed
