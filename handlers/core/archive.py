"""Find the pipeline inside a model directory, unpacking a model.zip once per model version."""

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from filelock import FileLock

from handlers.core.errors import PipelineNotFound, UnsafeArchive

PIPELINE_MARKER = "model_index.json"
ZIPPED_PIPELINE = "model.zip"
COMPLETE_MARKER = ".unpacked-complete"
# A diffusers pipeline is a few dozen files; a zip of many thousands is built to exhaust inodes.
MAX_MEMBERS = 10_000


def indexed_components(index: dict) -> list[str]:
    """The folders a pipeline's model_index.json names: entries of the form [library, class]."""
    return [name for name, value in index.items() if isinstance(value, list) and len(value) == 2 and value[0]]


def locate_pipeline(model_dir: Path, unpack_dir: Path | None = None, max_unpacked_bytes: int | None = None) -> Path:
    """The directory holding model_index.json: the archive root, or an unpacked model.zip."""
    if (model_dir / PIPELINE_MARKER).is_file():
        return model_dir
    zipped = model_dir / ZIPPED_PIPELINE
    if zipped.is_file():
        return _pipeline_root(unpack_once(zipped, unpack_dir or model_dir / ".unpacked", max_unpacked_bytes))
    raise PipelineNotFound(
        f"{model_dir} holds neither {PIPELINE_MARKER} (a diffusers pipeline directory) nor {ZIPPED_PIPELINE}"
    )


def unpack_once(zip_path: Path, cache_root: Path, max_unpacked_bytes: int | None = None) -> Path:
    """Extract zip_path into cache_root/<sha256>, shared by every worker of the model."""
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / file_sha256(zip_path)
    # Workers start in parallel: the lock makes one extract while the others wait and reuse.
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)  # left half-written by a worker that died mid-extract
        staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".staging-"))
        try:
            extract_safely(zip_path, staging, max_unpacked_bytes)
            (staging / COMPLETE_MARKER).touch()
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def extract_safely(zip_path: Path, target: Path, max_unpacked_bytes: int | None = None) -> None:
    """Extract every member, refusing any that could write outside target and zips that unpack too large.

    The sizes in the zip's headers bound what is written: zipfile stops a member at its declared
    size and then fails its CRC check, so a member that lies about its size cannot write more.
    """
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise UnsafeArchive(f"refusing a zip of {len(members)} members; at most {MAX_MEMBERS} are allowed")
        for member in members:
            check_member(member, target)
        unpacked = sum(member.file_size for member in members)
        if max_unpacked_bytes is not None and unpacked > max_unpacked_bytes:
            raise UnsafeArchive(
                f"refusing a zip that unpacks to {unpacked} bytes; the cap is {max_unpacked_bytes} "
                "(max_unpacked_bytes in the handler: section)"
            )
        free = shutil.disk_usage(target).free
        if unpacked > free:
            raise UnsafeArchive(f"the zip unpacks to {unpacked} bytes but {target} has only {free} free")
        try:
            archive.extractall(target, members)
        except zipfile.BadZipFile as error:
            raise UnsafeArchive(f"refusing a corrupt zip: {error}") from None


def check_member(member: zipfile.ZipInfo, target: Path) -> None:
    name = member.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise UnsafeArchive(f"refusing archive member with an absolute path: {name!r}")
    if ".." in path.parts:
        raise UnsafeArchive(f"refusing archive member that climbs out with '..': {name!r}")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise UnsafeArchive(f"refusing archive member that is a symbolic link: {name!r}")
    resolved = (target / path).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise UnsafeArchive(f"refusing archive member that lands outside {target}: {name!r}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pipeline_root(unpacked: Path) -> Path:
    """Accept a zip of the pipeline's contents or of the pipeline folder itself."""
    if (unpacked / PIPELINE_MARKER).is_file():
        return unpacked
    candidates = [child for child in unpacked.iterdir() if (child / PIPELINE_MARKER).is_file()]
    if len(candidates) == 1:
        return candidates[0]
    raise PipelineNotFound(f"{ZIPPED_PIPELINE} has no {PIPELINE_MARKER} at its root or in a single top folder")
