"""Where a model comes from: an archive the archiver built (a .mar, or its no-archive directory), a
pipeline directory, or a Hugging Face Hub id, with the model-config.yaml settings that come with it."""

import os
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from handlers.core.archive import unpack_once
from handlers.core.config import HandlerConfig, load_handler_config

MODEL_CONFIG = "model-config.yaml"
# The Hub's repo id form (huggingface_hub's validate_repo_id), with the owner required: diffusers
# pipelines live under one. Anything else that names no local directory is a mistyped path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class ModelSource:
    """A model directory, and the model-config.yaml that came with it (TorchServe's settings and `handler:`)."""

    model_dir: Path
    model_config: dict = field(default_factory=dict)

    @property
    def handler_config(self) -> HandlerConfig:
        return load_handler_config(self.model_config)

    @property
    def batch_size(self) -> int:
        return int(self.model_config.get("batchSize", 1))

    @property
    def batch_delay_s(self) -> float:
        return int(self.model_config.get("maxBatchDelay", 1)) / 1000


def open_source(source: str, unpack_root: str | Path | None = None) -> ModelSource:
    """A .mar (unpacked safely, once per content, into a private directory, under the archive's own
    max_unpacked_bytes), a directory the archiver built (no-archive), a pipeline directory, or a Hugging
    Face Hub id (fetched through the Hugging Face cache, safetensors only)."""
    path = Path(source).expanduser()
    if path.is_file():
        cap = load_handler_config(model_config_of(source)).max_unpacked_bytes
        root = private_directory(Path(unpack_root) if unpack_root else default_unpack_root())
        path = unpack_once(path, root, cap)
    if path.is_dir() and (path / MODEL_CONFIG).is_file():
        return ModelSource(path, yaml.safe_load((path / MODEL_CONFIG).read_text()) or {})
    if path.is_dir():
        return ModelSource(path)
    if not is_hub_id(source):
        raise ValueError(f"{source} is neither a .mar, a directory, nor a Hugging Face Hub id (owner/name)")
    return ModelSource(download_pipeline(source))


def default_unpack_root() -> Path:
    return Path(tempfile.gettempdir()) / f"diffusers-models-{os.getuid()}"


def private_directory(path: Path) -> Path:
    """path, made if missing, and refused unless it is a directory of ours that no one else may write to or
    read: whatever another local user planted there (an unpacked model marked complete) would be served."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise ValueError(f"{path} must be a directory owned by this user (uid {os.getuid()}) with mode 0700, "
                         "since archives are unpacked there and served from there; remove it, or choose another")
    return path


def model_config_of(source: str) -> dict:
    """The model-config.yaml a source carries (none for a pipeline directory or a hub id), read without
    unpacking an archive."""
    path = Path(source).expanduser()
    if path.is_file():
        with zipfile.ZipFile(path) as archive:
            if MODEL_CONFIG not in archive.namelist():
                return {}
            return yaml.safe_load(archive.read(MODEL_CONFIG)) or {}
    if (path / MODEL_CONFIG).is_file():
        return yaml.safe_load((path / MODEL_CONFIG).read_text()) or {}
    return {}


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.fullmatch(source)) and "--" not in source and ".." not in source


def download_pipeline(
    repo_id: str, revision: str | None = None, variant: str | None = None, allow_pickle_weights: bool = False
) -> Path:
    """The pipeline's files in the Hugging Face cache, downloaded once: only the component folders that
    model_index.json names, safetensors unless pickle weights are allowed, and the variant's weights where
    asked. With HF_HUB_OFFLINE=1 it never leaves the cache."""
    from diffusers import DiffusionPipeline  # only when a hub id is asked for: validation needs no diffusers

    return Path(DiffusionPipeline.download(
        repo_id, revision=revision, variant=variant, use_safetensors=None if allow_pickle_weights else True
    ))
