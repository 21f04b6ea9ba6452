"""A saved pipeline laid into a Hugging Face cache as huggingface_hub lays out a download: each file a blob
named by its sha256 (git's LFS pointer id), the snapshot's files links to them, refs/main naming the commit.
The hub is unreachable here, so tests and benchmarks of hub sources build their cache this way."""

import os
import shutil
from pathlib import Path

from handlers.core.weights import file_digest


def fill_hub_cache(pipeline_dir: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """The snapshot folder; blobs are hard links to pipeline_dir's files where the file system allows."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(pipeline_dir.rglob("*")):
        if not path.is_file():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            blob = repo / "blobs" / file_digest(descriptor)
        finally:
            os.close(descriptor)
        if not blob.exists():
            try:
                os.link(path, blob)
            except OSError:
                shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(pipeline_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
