"""Weights that an archive references instead of holding (the archiver's `--weights reference`).

The archive carries the pipeline's configs and tokenizer files and a manifest of its weight files: their
paths under a weights root, their sizes, their sha256 and a digest of samples of them. At start-up each
worker finds the root, checks every file without reading it all, and loads from a directory of its own
that holds links to the archive's small files and to the checked weights where they lie: the weights are
mapped read-only from the root, so every worker and every archive of one base model shares their pages.
"""

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field, ValidationError

from handlers.core.archive import PIPELINE_MARKER, indexed_components
from handlers.core.config import HandlerConfig
from handlers.core.errors import ReferencedWeightsError
from handlers.core.source import private_directory

logger = logging.getLogger(__name__)

MANIFEST = "weights.json"
ROOT_VARIABLE = "DIFFUSION_WEIGHTS_ROOT"
SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What the referenced tree may never hold, since a loader could be talked into running it.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so")
SAMPLES, SAMPLE_BYTES = 16, 1 << 16
SHA256_HEX = r"^[0-9a-f]{64}$"


class WeightFile(BaseModel):
    path: str = Field(description="relative to the weights root, POSIX separators")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_HEX)
    sample_sha256: str = Field(pattern=SHA256_HEX, description="sample_digest of the file")


class HubSnapshot(BaseModel):
    repo_id: str
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")

    @property
    def folder(self) -> str:
        """The snapshot's place in a Hugging Face cache."""
        return f"models--{self.repo_id.replace('/', '--')}/snapshots/{self.commit}"


class WeightsManifest(BaseModel):
    """What the archiver writes as weights.json, and what a worker checks before loading."""

    root: str = Field(description="where the build found the weights: a pipeline directory or a Hugging Face cache")
    hub: HubSnapshot | None = Field(None, description="the snapshot, when the root is a Hugging Face cache")
    files: list[WeightFile]


def sample_digest(descriptor: int, size: int) -> str:
    """The sha256 of the size and of SAMPLES slices spread evenly from the first byte to the last: a few
    reads per file, and a file re-saved, fine-tuned or swapped changes it."""
    digest = hashlib.sha256(str(size).encode())
    last = max(size - SAMPLE_BYTES, 0)
    for index in range(SAMPLES):
        digest.update(os.pread(descriptor, SAMPLE_BYTES, last * index // (SAMPLES - 1)))
    return digest.hexdigest()


def opened_path(descriptor: int) -> Path:
    """Where an open file really lies, links resolved: what a check must judge, not the path it was opened by."""
    return Path(os.readlink(f"/proc/self/fd/{descriptor}"))


def file_digest(descriptor: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(descriptor, 1 << 24, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> WeightsManifest | None:
    """The archive's manifest, or None for an archive that holds its weights."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return WeightsManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as error:
        raise ReferencedWeightsError(f"{MANIFEST} in the archive is not a weights manifest: {error}") from None


def weights_root(manifest: WeightsManifest, config: HandlerConfig) -> tuple[Path, str]:
    """Where the weights are on this machine, and what said so: the environment variable, then the
    handler: section, then the build."""
    if os.environ.get(ROOT_VARIABLE):
        return Path(os.environ[ROOT_VARIABLE]), ROOT_VARIABLE
    if config.weights_root:
        return Path(config.weights_root), "weights_root in the handler: section"
    return Path(manifest.root), "the build (neither DIFFUSION_WEIGHTS_ROOT nor weights_root is set)"


def weights_tree(root: Path, manifest: WeightsManifest) -> Path:
    """The folder the manifest's paths are relative to: the snapshot in a Hugging Face cache, or the root
    itself (a pipeline directory, or a snapshot copied out of a cache, as KServe's storage initializer does)."""
    if manifest.hub is None:
        return root
    snapshot = root / manifest.hub.folder
    if not snapshot.is_dir() and snapshot.parent.parent.is_dir():
        raise ReferencedWeightsError(
            f"the Hugging Face cache {root} holds {manifest.hub.repo_id} but not its snapshot {manifest.hub.commit}, which "
            f"the archive was built from: download that revision (hf download {manifest.hub.repo_id} --revision "
            f"{manifest.hub.commit}), or build the archive again from the snapshot the cache holds")
    return snapshot if snapshot.is_dir() else root


def referenced_pipeline(model_dir: Path, manifest: WeightsManifest, config: HandlerConfig) -> Path:
    """A directory to load the pipeline from: the archive's small files beside the checked weights."""
    root, said_by = weights_root(manifest, config)
    if not root.is_dir():
        components = component_folders(manifest)
        raise ReferencedWeightsError(
            f"the archive references its weights, and their root {root} (from {said_by}) is not a directory on this "
            f"machine. Set {ROOT_VARIABLE} to the directory holding {', '.join(f'{name}/' for name in components)}"
            + (f" (or the Hugging Face cache holding {manifest.hub.folder.split('/')[0]})" if manifest.hub else "")
        )
    tree = weights_tree(root, manifest)
    started = time.perf_counter()
    check_tree(tree, component_folders(manifest))
    suffixes = SAFE_WEIGHTS + (PICKLE_WEIGHTS if config.allow_pickle_weights else ())
    targets = {file.path: checked_file(tree, file, config.verify_weights, suffixes) for file in manifest.files}
    load_dir = link_directory(model_dir, targets)
    logger.info("weights referenced in %s (from %s): %d files, %.2f GB, checked (%s) in %.2f s", tree, said_by,
                len(targets), sum(file.size for file in manifest.files) / 1e9, config.verify_weights,
                time.perf_counter() - started)
    return load_dir


def allowed_places(tree: Path) -> tuple[Path, ...]:
    """Where a referenced file may lie: inside the tree, or, for a Hugging Face snapshot, in its repository's
    blobs (a snapshot's files are links to them)."""
    real = tree.resolve()
    snapshots = real.parent
    if snapshots.name == "snapshots":
        return real, snapshots.parent / "blobs"
    return (real,)


def component_folders(manifest: WeightsManifest) -> list[str]:
    return sorted({PurePosixPath(file.path).parts[0] for file in manifest.files})


def check_tree(tree: Path, components: list[str]) -> None:
    """The archiver's rules, on the folders the weights live in: no code, no links out. The archiver checks
    them at the build, and every worker at its start."""
    places = allowed_places(tree)
    for component in components:
        for folder, folders, files in os.walk(tree / component):
            for name in folders + files:
                path = Path(folder) / name
                relative = path.relative_to(tree)
                if path.is_symlink() and not any(path.resolve().is_relative_to(place) for place in places):
                    raise ReferencedWeightsError(f"{relative} in the weights root {tree} is a link to {path.resolve()}, "
                                                 "outside it; links are never followed out")
                if path.suffix in CODE_SUFFIXES:
                    raise ReferencedWeightsError(f"{relative} in the weights root {tree} is code; a weights tree holds "
                                                 "configs, tokenizer files and safetensors only. Remove it")


def checked_file(tree: Path, file: WeightFile, verify: str, suffixes: tuple[str, ...]) -> Path:
    """The real path of one referenced file, once it is where it may be, of its size, and, as far as verify
    asks, of its content. Checked on the opened file, so a link swapped in meanwhile is caught too."""
    relative = PurePosixPath(file.path)
    if relative.is_absolute() or ".." in relative.parts or relative.suffix not in suffixes:
        raise ReferencedWeightsError(f"{MANIFEST} names {file.path!r}, which is not a weights file inside the root "
                                     f"({', '.join(suffixes)})")
    path = tree / relative
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise ReferencedWeightsError(f"{file.path} is missing from the weights root {tree} ({error.strerror})") from None
    try:
        real = opened_path(descriptor)
        if not any(real.is_relative_to(place) for place in allowed_places(tree)):
            raise ReferencedWeightsError(f"{file.path} in the weights root {tree} leads to {real}, outside it; "
                                         "links are never followed out")
        size = os.fstat(descriptor).st_size
        if size != file.size:
            raise ReferencedWeightsError(f"{file.path} in {tree} has changed: {size} bytes, {file.size} when the archive "
                                         "was built")
        if real.parent.name == "blobs" and real.name != file.sha256:
            raise ReferencedWeightsError(f"{file.path} in {tree} has changed: its Hugging Face blob is {real.name}, "
                                         f"the archive was built from {file.sha256}")
        digest, expected, what = ((file_digest(descriptor), file.sha256, "sha256") if verify == "full" else
                                  (sample_digest(descriptor, size), file.sample_sha256, "sampled sha256"))
        if digest != expected:
            raise ReferencedWeightsError(f"{file.path} in {tree} has changed: its {what} is {digest}, the archive was "
                                         f"built from {expected}")
        return real
    finally:
        os.close(descriptor)


def link_directory(model_dir: Path, weights: dict[str, Path]) -> Path:
    """A directory of this process's own (workers of one model share model_dir), laid out as the pipeline:
    links to model_dir's pipeline files, and to each weight file where it lies."""
    parent = private_links_root()
    load_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
    atexit.register(shutil.rmtree, load_dir, True)
    (load_dir / PIPELINE_MARKER).symlink_to(model_dir / PIPELINE_MARKER)
    for component in indexed_components(json.loads((model_dir / PIPELINE_MARKER).read_text())):
        for path in sorted((model_dir / component).rglob("*")) if (model_dir / component).is_dir() else []:
            if path.is_file():
                (load_dir / path.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
                (load_dir / path.relative_to(model_dir)).symlink_to(path.resolve())
    for relative, real in weights.items():
        (load_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (load_dir / relative).symlink_to(real)
    return load_dir


def private_links_root() -> Path:
    """The folder every worker's link directory goes in, cleared of those whose process has gone (a worker
    that was killed leaves its links behind)."""
    root = private_directory(Path(tempfile.gettempdir()) / f"diffusers-weights-{os.getuid()}")
    for stale in root.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return root


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
