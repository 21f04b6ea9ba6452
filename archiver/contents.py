"""What a pipeline is made of: the files the archiver packs, and the reason each other file is left out.

A model directory is untrusted input. Only model_index.json and, in the component folders that it
names, configs, safetensors weights and tokenizer files are packed; nothing else can reach the
archive, where a stray handler.py or a module named like a library would run in every worker.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from handlers.core.archive import indexed_components
from handlers.core.weights import PICKLE_WEIGHTS, allowed_places

PIPELINE_INDEX = "model_index.json"
# Configs and tokenizer/processor files (vocab.json, merges.txt, spiece.model, tokenizer.json, ...).
COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
# Top-level names the archive itself uses: our handler code, its entry module, TorchServe's files,
# and the folders the archiver stages adapters and the refiner into.
RESERVED_NAMES = frozenset(
    {"handler.py", "handlers", "MAR-INF", "model-config.yaml", "built-from.json", "controlnets", "loras", "refiner"}
)
COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


class UnsafePipeline(Exception):
    """The pipeline directory holds something that must not be packed; the message names it."""


@dataclass(frozen=True)
class Selection:
    """The files to pack (relative paths) and what was left out, with why."""

    files: tuple[PurePosixPath, ...]
    left_out: tuple[tuple[str, str], ...]


def component_names(index: dict) -> list[str]:
    """The folders model_index.json names, each a plain folder name of its own."""
    names = indexed_components(index)
    for name in names:
        if not COMPONENT_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise UnsafePipeline(f"{PIPELINE_INDEX} names a component {name!r}, which is not a plain folder name "
                                 "or would replace a file of the archive's own")
    return names


def packed_suffixes(allow_pickle_weights: bool) -> tuple[str, ...]:
    return COMPONENT_SUFFIXES + (PICKLE_WEIGHTS if allow_pickle_weights else ())


def select_pipeline_files(source: Path, allow_pickle_weights: bool = False) -> Selection:
    """The files of source that make up its pipeline; raise UnsafePipeline for links that leave it."""
    index = json.loads((source / PIPELINE_INDEX).read_text())
    components = set(component_names(index))
    return select_files(source, lambda parts: parts[0] in components or parts == (PIPELINE_INDEX,), allow_pickle_weights)


def select_component_files(source: Path, allow_pickle_weights: bool = False) -> Selection:
    """The files of a single model folder (a ControlNet, a LoRA): configs and weights at any depth."""
    return select_files(source, lambda parts: True, allow_pickle_weights)


def select_files(source: Path, belongs, allow_pickle_weights: bool) -> Selection:
    suffixes = packed_suffixes(allow_pickle_weights)
    files, left_out = [], []
    for path in sorted(source.rglob("*")):
        relative = PurePosixPath(path.relative_to(source).as_posix())
        if path.is_symlink() and not stays_inside(source, path.resolve()):
            raise UnsafePipeline(f"{relative} is a link to {path.resolve()}, outside {source}; links are never followed out")
        if path.is_dir():
            continue
        reason = _reason_to_leave_out(relative, belongs, suffixes)
        if reason:
            left_out.append((str(relative), reason))
        else:
            files.append(relative)
    return Selection(tuple(files), tuple(left_out))


def _reason_to_leave_out(relative: PurePosixPath, belongs, suffixes: tuple[str, ...]) -> str | None:
    if any(part.startswith(".") for part in relative.parts):
        return "a hidden file"
    if relative.suffix == ".py":
        return "Python code; an archive carries only this project's handler"
    if not belongs(relative.parts):
        return f"not {PIPELINE_INDEX} nor in a component folder it names"
    if relative.suffix in PICKLE_WEIGHTS and relative.suffix not in suffixes:
        return "pickle weights can run code when loaded; safetensors are packed (--allow-unsafe-weights packs these)"
    if relative.suffix not in suffixes:
        return f"not a config, weights or tokenizer file ({', '.join(suffixes)})"
    return None


def stays_inside(source: Path, target: Path) -> bool:
    """Whether a file (a link's target, or a file opened) lies inside source, or is one of its Hugging Face
    cache blobs: cache snapshots are links into the same repository's blobs/ folder."""
    return any(target.is_relative_to(place) for place in allowed_places(source))
