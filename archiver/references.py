"""Weights an archive references instead of packing (`--weights reference`): which builds do, and the
manifest they write (handlers/core/weights.py reads and checks it at every worker's start)."""

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from archiver.contents import UnsafePipeline
from handlers.core.errors import ReferencedWeightsError
from handlers.core.weights import (
    PICKLE_WEIGHTS,
    ROOT_VARIABLE,
    SAFE_WEIGHTS,
    SHA256_HEX,
    HubSnapshot,
    WeightFile,
    WeightsManifest,
    check_tree,
    file_digest,
    opened_path,
    sample_digest,
)

# Past this much weights, `auto` references them: TorchServe unpacks a .mar at every start (about 3 s per
# GB here) and the archive doubles the disk they take.
REFERENCE_THRESHOLD = 2**30
WEIGHTS_MODES = ("auto", "pack", "reference")
COMMIT = re.compile(r"[0-9a-f]{40}")


def is_weights(relative: PurePosixPath) -> bool:
    return relative.suffix in SAFE_WEIGHTS + PICKLE_WEIGHTS


def hub_snapshot(pipeline_dir: Path) -> tuple[Path, HubSnapshot] | None:
    """The Hugging Face cache and snapshot that pipeline_dir is (.../models--owner--name/snapshots/<commit>)."""
    snapshot = pipeline_dir.resolve()
    repo = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not repo.name.startswith("models--") or not COMMIT.fullmatch(snapshot.name):
        return None
    return repo.parent, HubSnapshot(repo_id=repo.name.removeprefix("models--").replace("--", "/"), commit=snapshot.name)


def references_weights(mode: str, pipeline_dir: Path, weights_bytes: int) -> tuple[bool, str]:
    """Whether to reference the weights, and why."""
    if mode != "auto":
        return mode == "reference", f"--weights {mode}"
    if hub_snapshot(pipeline_dir):
        return True, "--weights auto: the source is in the Hugging Face cache, which keeps it"
    if weights_bytes > REFERENCE_THRESHOLD:
        return True, f"--weights auto: over {REFERENCE_THRESHOLD / 2**30:.0f} GiB of weights"
    return False, f"--weights auto: {REFERENCE_THRESHOLD / 2**30:.0f} GiB of weights or less"


def weights_manifest(source: Path, files: list[PurePosixPath]) -> WeightsManifest:
    """The manifest of source's weight files. A Hugging Face cache names each blob by its sha256, so those
    are read only for their samples; other files are hashed, on every core."""
    snapshot = hub_snapshot(source)
    try:
        check_tree(source, sorted({relative.parts[0] for relative in files}))
    except ReferencedWeightsError as error:
        raise UnsafePipeline(str(error)) from None
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # hashlib lets go of the GIL while it hashes
        entries = list(pool.map(lambda relative: weight_entry(source, relative), files))
    return WeightsManifest(root=str(snapshot[0] if snapshot else source.resolve()),
                           hub=snapshot[1] if snapshot else None, files=entries)


def weight_entry(source: Path, relative: PurePosixPath) -> WeightFile:
    descriptor = os.open(source / relative, os.O_RDONLY)
    try:
        real = opened_path(descriptor)
        size = os.fstat(descriptor).st_size
        named = real.parent.name == "blobs" and re.fullmatch(SHA256_HEX, real.name)
        return WeightFile(path=str(relative), size=size, sha256=real.name if named else file_digest(descriptor),
                          sample_sha256=sample_digest(descriptor, size))
    finally:
        os.close(descriptor)


def describe_reference(manifest: WeightsManifest) -> str:
    """What the build tells its user: the archive alone does not serve."""
    total = sum(file.size for file in manifest.files)
    where = f"{manifest.hub.repo_id}@{manifest.hub.commit} in the Hugging Face cache {manifest.root}" if manifest.hub \
        else manifest.root
    return (f"referencing {len(manifest.files)} weight files ({total / 2**30:.2f} GiB) in {where}, not copied: the archive "
            f"serves only where they are, or with {ROOT_VARIABLE} (or --set weights_root=...) naming where they are")
