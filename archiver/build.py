"""Stage a pipeline, its handler code and a model-config.yaml, then pack them with torch-model-archiver."""

import json
import os
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_packaging import generate_model_archive

import handlers
from archiver.contents import PIPELINE_INDEX, select_component_files, select_pipeline_files

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, for its scripts and config.properties
HANDLER_PACKAGE = Path(handlers.__file__).resolve().parent  # from the checkout or an installed wheel
HANDLER_ENTRY = HANDLER_PACKAGE / "handler.py"
PROVENANCE = "built-from.json"  # at the archive root: the source the archive was built from
PROGRESS_INTERVAL_S = 10.0


@dataclass
class ServingConfig:
    """What model-config.yaml tells TorchServe; every value explicit, none left to TorchServe's defaults."""

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 1
    response_timeout_s: int = 600
    startup_timeout_s: int = 600
    handler: dict = field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            {
                # TorchServe's default is one worker per CPU core, each with its own copy of the weights.
                "minWorkers": self.min_workers,
                "maxWorkers": self.max_workers,
                "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms,
                "responseTimeout": self.response_timeout_s,
                "startupTimeout": self.startup_timeout_s,
                "handler": self.handler,
            },
            sort_keys=False,
        )


def build_archive(
    pipeline_dir: Path,
    model_name: str,
    export_path: Path,
    serving: ServingConfig,
    workdir: Path,
    archive_format: str = "zip-store",
    version: str = "1.0",
    allow_pickle_weights: bool = False,
    extras: dict[str, Path] | None = None,
    source: str | None = None,
) -> Path:
    """Pack pipeline_dir and our handler into export_path; return the .mar file or directory.

    extras are more directories (refiner, ControlNets, LoRAs), staged at the given relative paths.
    source, where given, is recorded in the archive (PROVENANCE), so that a later build can tell
    whether it would replace an archive of another model.
    """
    staged_pipeline = workdir / "stage-pipeline"
    staged_code = workdir / "stage-code"
    copy_pipeline(pipeline_dir, staged_pipeline, allow_pickle_weights)
    for relative, extra_dir in (extras or {}).items():
        print(f"adding {relative}/")
        copy_pipeline(extra_dir, staged_pipeline / relative, allow_pickle_weights)
    copy_handler_package(staged_code / HANDLER_PACKAGE.name)
    if source is not None:
        (staged_code / PROVENANCE).write_text(json.dumps({"source": source}), encoding="utf-8")
    config_file = workdir / "model-config.yaml"
    config_file.write_text(serving.to_yaml(), encoding="utf-8")

    export_path.mkdir(parents=True, exist_ok=True)
    result = archive_path(export_path, model_name, archive_format)
    staged_bytes = tree_size(staged_pipeline) + tree_size(staged_code)
    print(f"packing {human_size(staged_bytes)} with torch-model-archiver ({archive_format} format) into {export_path}")
    with PackingProgress(result, staged_bytes):
        generate_model_archive(
            ModelArchiverConfig(
                model_name=model_name,
                handler=str(HANDLER_ENTRY),
                version=version,
                # A directory given as an extra file has its contents copied to the archive root,
                # so the pipeline needs no inner zip and `handlers/` stays importable there.
                extra_files=f"{staged_pipeline},{staged_code}",
                export_path=str(export_path),
                archive_format=archive_format,
                force=True,
                config_file=str(config_file),
            )
        )
    print(f"built {result} ({human_size(tree_size(result))})")
    return result


class PackingProgress:
    """Say every PROGRESS_INTERVAL_S how much of the archive is written: gigabytes take minutes."""

    def __init__(self, target: Path, expected_bytes: int):
        self.target, self.expected_bytes = target, expected_bytes
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.report, daemon=True)

    def report(self) -> None:
        started = time.monotonic()
        while not self.done.wait(PROGRESS_INTERVAL_S):
            try:
                written = tree_size(self.target) if self.target.exists() else 0
            except OSError:  # a file moved while the archiver writes: the next report counts it
                continue
            print(f"  packed {human_size(written)} of about {human_size(self.expected_bytes)} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)

    def __enter__(self) -> "PackingProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()


def archive_path(export_path: Path, model_name: str, archive_format: str) -> Path:
    return export_path / (model_name if archive_format == "no-archive" else f"{model_name}.mar")


def built_from(archive: Path) -> str | None:
    """The source an existing archive was built from, or None when it does not say (or is unreadable)."""
    try:
        if archive.is_dir():
            text = (archive / PROVENANCE).read_text(encoding="utf-8")
        else:
            with zipfile.ZipFile(archive) as packed:
                text = packed.read(PROVENANCE).decode("utf-8")
        return json.loads(text)["source"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def copy_pipeline(source: Path, target: Path, allow_pickle_weights: bool) -> None:
    """Copy what the pipeline (or a single model folder) is made of, and say what was left out and why."""
    if (source / PIPELINE_INDEX).is_file():
        selection = select_pipeline_files(source, allow_pickle_weights)
    else:
        selection = select_component_files(source, allow_pickle_weights)
    for relative, reason in selection.left_out:
        print(f"  leaving out {relative}: {reason}")
    for relative in selection.files:
        path = source / relative
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        stage_file(path.resolve(), destination)  # a link's target, never the link: the archive holds no links
        print(f"  staging {relative} ({human_size(path.stat().st_size)})")


def stage_file(source: Path, destination: Path) -> None:
    """A hard link where the file system allows one: gigabytes of weights are then written once, into
    the archive, instead of twice. torch-model-archiver reads the staged files and never writes them."""
    try:
        os.link(source, destination)
    except OSError:  # another file system, or a file this user may not link (fs.protected_hardlinks)
        shutil.copyfile(source, destination)


def copy_handler_package(target: Path) -> None:
    shutil.copytree(HANDLER_PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")
