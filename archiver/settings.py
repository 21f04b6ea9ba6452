"""The handler: section an archive carries: the command line's generation defaults (checked against the
request schema), the source's recommended ones, the serving config.properties' limits, and --set."""

import argparse
import sys
from pathlib import Path

import yaml

from archiver.sources import RECOMMENDED_BATCHING, RECOMMENDED_DEFAULTS
from handlers.core.config import HandlerConfig
from handlers.core.flags import schema_values
from handlers.core.limits import MAX_RESPONSE_BYTES, check_defaults_fit
from handlers.core.schema import GenerationDefaults
from handlers.torchserve.kserve import request_size_bound


def handler_section(args: argparse.Namespace) -> tuple[dict, HandlerConfig]:
    """The section to write and the settings it makes; ValueError names what is wrong."""
    requested = schema_values(args, GenerationDefaults)
    defaults = GenerationDefaults(**{**RECOMMENDED_DEFAULTS.get(args.source, {}), **requested})
    batching = args.batching or RECOMMENDED_BATCHING.get(args.source, "auto")
    section = {**defaults.model_dump(exclude_none=True), "torch_dtype": args.torch_dtype, "batching": batching}
    if args.allow_unsafe_weights:
        section["allow_pickle_weights"] = True
    if args.variant:
        section["variant"] = args.variant
    section["request_timeout_s"] = args.request_timeout
    section.update(server_settings(args.server_config))
    section.update(parse_assignments(args.handler_options, "--set"))
    config = HandlerConfig(**section)
    check_defaults_fit(config.generation_defaults, config.limits, request_size_bound(config.kserve_protocol))
    return section, config


def server_settings(config_path: Path) -> dict:
    """What the handler must know of the server that serves it, which TorchServe does not tell a worker."""
    if config_path == Path("config.properties") and not config_path.exists():
        print("no ./config.properties: the archive assumes TorchServe's default settings", file=sys.stderr)
        return {"max_response_bytes": MAX_RESPONSE_BYTES}
    properties = read_properties(config_path)
    if properties.get("service_envelope"):
        raise ValueError(
            f"{config_path} sets service_envelope={properties['service_envelope']}: TorchServe's envelope would parse "
            "clients' bytes before any guard of the handler's. Remove it, and build with --set kserve_protocol=v1 "
            "(or v2): the handler reads and answers KServe's protocol itself"
        )
    return {"max_response_bytes": int(properties.get("max_response_size", MAX_RESPONSE_BYTES))}


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
