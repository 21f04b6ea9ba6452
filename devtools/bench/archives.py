"""Archives for the benchmarks: ours only through the archiver's command line (with the development
models as sources, devtools/archives.py), and the pytorch/serve example's as its README builds it."""

import zipfile
from pathlib import Path

import yaml

from devtools import REPO_ROOT
from devtools.archives import main as archiver_main

EXAMPLE_HANDLER = REPO_ROOT / "devtools" / "baselines" / "example_handler.py"


def build_ours(store: Path, name: str, *options: str) -> str:
    """`python -m archiver build` into store, for this checkout's config.properties (whatever the working
    directory); the file or folder TorchServe loads, relative to store."""
    server_config = ["--server-config", str(REPO_ROOT / "config.properties")]
    assert archiver_main(["build", "--export-path", str(store), "--model-name", name, "--force", *server_config,
                          *options]) == 0
    return name if (store / name).is_dir() else f"{name}.mar"


def build_example(store: Path, name: str, pipeline_dir: Path, batch_size: int = 1, **fixed_parameters) -> str:
    """The example's two steps: zip the pipeline (deflated, as its README does), then torch-model-archiver
    with its handler; fixed_parameters replace its fixed size and steps."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    workdir = store.parent / f"{name}-build"
    workdir.mkdir(parents=True, exist_ok=True)
    model_zip = workdir / "model.zip"
    with zipfile.ZipFile(model_zip, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(pipeline_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(pipeline_dir).as_posix())
    config = workdir / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 50,
                                      "responseTimeout": 600, "startupTimeout": 600,
                                      "fixed_parameters": fixed_parameters}))
    generate_model_archive(ModelArchiverConfig(
        model_name=name, handler=str(EXAMPLE_HANDLER), version="1.0", extra_files=str(model_zip),
        export_path=str(store), force=True, config_file=str(config),
    ))
    model_zip.unlink()
    return f"{name}.mar"
