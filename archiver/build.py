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
from model_archiver.model_packaging_utils import ModelExportUtils

import handlers
from archiver.contents import PIPELINE_INDEX, UnsafePipeline, select_component_files, select_pipeline_files, stays_inside
from archiver.references import describe_reference, is_weights, references_weights, weights_manifest
from handlers.core.weights import MANIFEST, opened_path

HANDLER_PACKAGE = Path(handlers.__file__).resolve().parent  # from the checkout or an installed wheel
# The module TorchServe's manifest names, copied to the archive root: TorchServe takes the one class
# defined in it as the handler.
HANDLER_ENTRY = HANDLER_PACKAGE / "torchserve" / "handler.py"
PROVENANCE = "built-from.json"  # at the archive root: the source the archive was built from
MODEL_CONFIG = "model-config.yaml"
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
                # Per batch: batchSize x the handler's request_timeout_s (handlers/torchserve/handler.py checks it).
                "responseTimeout": self.response_timeout_s,
                "startupTimeout": self.startup_timeout_s,
                # Step-level batching: the frontend refills the running set between steps (docs/step-batching.md).
                **({"continuousBatching": True} if self.handler.get("batching") == "step" else {}),
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
    weights: str = "pack",
) -> Path:
    """Pack pipeline_dir and our handler into export_path; return the .mar file or directory.

    extras are more directories (refiner, ControlNets, LoRAs), staged at the given relative paths. weights
    says whether the pipeline's own weights are packed or referenced where they lie (auto: archiver/references.py
    decides); extras are always packed.
    source, where given, is recorded in the archive (PROVENANCE), so that a later build can tell
    whether it would replace an archive of another model.

    Everything is staged in one directory laid out as the archive is, and torch-model-archiver
    packs that directory: its command line would copy every file into a directory of its own first,
    which for gigabytes of weights is one more full write. A zip is staged with hard links and
    written once; a no-archive directory is staged in place, with copies, so that it shares no file
    with its source.
    """
    export_path.mkdir(parents=True, exist_ok=True)
    result = archive_path(export_path, model_name, archive_format)
    in_place = archive_format == "no-archive"
    stage = result if in_place else workdir / "stage"
    if in_place and result.exists():
        shutil.rmtree(result)
    try:
        stage_archive(stage, pipeline_dir, serving, allow_pickle_weights, extras or {}, source, link=not in_place,
                      weights=weights)
        manifest = ModelExportUtils.generate_manifest_json(ModelArchiverConfig(
            model_name=model_name, handler=str(HANDLER_ENTRY), version=version, export_path=str(export_path),
            archive_format=archive_format, force=True, config_file=str(stage / MODEL_CONFIG),
        ))
        staged_bytes = tree_size(stage)
        print(f"packing {human_size(staged_bytes)} with torch-model-archiver ({archive_format} format) into {export_path}")
        with PackingProgress(result, staged_bytes):
            ModelExportUtils.archive(str(export_path), model_name, str(stage), manifest, archive_format)
    except BaseException:
        if in_place:
            shutil.rmtree(result, ignore_errors=True)
        raise
    print(f"built {result} ({human_size(tree_size(result))})")
    return result


def stage_archive(
    stage: Path, pipeline_dir: Path, serving: ServingConfig, allow_pickle_weights: bool, extras: dict[str, Path],
    source: str | None, link: bool, weights: str = "pack",
) -> None:
    """The archive's files: the pipeline's at the root (or, referencing its weights, all but them, and their
    manifest), extras below it, our handler, model-config.yaml."""
    files = selected_files(pipeline_dir, allow_pickle_weights)
    weight_files = [relative for relative in files if is_weights(relative)]
    reference, why = references_weights(weights, pipeline_dir, sum((pipeline_dir / path).stat().st_size
                                                                    for path in weight_files))
    print(f"{'referencing' if reference else 'packing'} the pipeline's weights ({why})")
    stage_files(pipeline_dir, stage, [path for path in files if not (reference and is_weights(path))], link)
    if reference:
        manifest = weights_manifest(pipeline_dir, weight_files)
        (stage / MANIFEST).write_text(manifest.model_dump_json(indent=1), encoding="utf-8")
        print(describe_reference(manifest))
    for relative, extra_dir in extras.items():
        print(f"adding {relative}/")
        copy_pipeline(extra_dir, stage / relative, allow_pickle_weights, link)
    copy_handler_package(stage / HANDLER_PACKAGE.name)
    shutil.copyfile(HANDLER_ENTRY, stage / HANDLER_ENTRY.name)  # the entry TorchServe's manifest names
    if source is not None:
        (stage / PROVENANCE).write_text(json.dumps({"source": source}), encoding="utf-8")
    (stage / MODEL_CONFIG).write_text(serving.to_yaml(), encoding="utf-8")


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


def copy_pipeline(source: Path, target: Path, allow_pickle_weights: bool, link: bool = False) -> None:
    """Copy what the pipeline (or a single model folder) is made of, and say what was left out and why."""
    stage_files(source, target, selected_files(source, allow_pickle_weights), link)


def selected_files(source: Path, allow_pickle_weights: bool) -> list:
    """What the pipeline (or a single model folder) is made of; says what was left out and why."""
    if (source / PIPELINE_INDEX).is_file():
        selection = select_pipeline_files(source, allow_pickle_weights)
    else:
        selection = select_component_files(source, allow_pickle_weights)
    for relative, reason in selection.left_out:
        print(f"  leaving out {relative}: {reason}")
    return list(selection.files)


def stage_files(source: Path, target: Path, files: list, link: bool) -> None:
    for relative in files:
        path = source / relative
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        size = stage_file(path, destination, link, lambda opened: stays_inside(source, opened))
        print(f"  staging {relative} ({human_size(size)})")


def stage_file(path: Path, destination: Path, link: bool, allowed) -> int:
    """Open the file once, check that what was opened lies where allowed says, and stage that open file (a
    link's target, never the link: the archive holds no links). A link swapped in after the selection was
    checked cannot redirect what is staged. With link, a hard link where the file system allows one: the
    file is read once, into the zip. Its size."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        opened = opened_path(descriptor)
        if not allowed(opened):
            raise UnsafePipeline(f"{path} opened {opened}, outside the source; links are never followed out")
        if link:
            try:
                os.link(f"/proc/self/fd/{descriptor}", destination, follow_symlinks=True)
                return os.fstat(descriptor).st_size
            except OSError:  # another file system, or a file this user may not link (fs.protected_hardlinks)
                pass
        with os.fdopen(os.dup(descriptor), "rb") as source, open(destination, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 24)
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)


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
