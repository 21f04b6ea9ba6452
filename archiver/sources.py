"""Turn a --source argument into a local diffusers pipeline directory."""

import tempfile
from pathlib import Path

from archiver.digits import DEFAULT_WEIGHTS_DIR as DIGITS_WEIGHTS_DIR
from archiver.tiny import build_tiny_pipeline

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUILT_IN = {"tiny": build_tiny_pipeline}  # built from code, random weights
SHIPPED = {"digits": DIGITS_WEIGHTS_DIR}  # trained weights committed to the repository
# Generation defaults that suit a shipped model, used where the build command sets none.
RECOMMENDED_DEFAULTS = {
    "digits": {"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 4.0},
}


class SourceError(Exception):
    """The source cannot be turned into a safe pipeline directory; the message says why."""


def resolve_source(source: str, workdir: Path, allow_pickle_weights: bool = False, revision: str | None = None) -> Path:
    """A built-in name, a local directory, or a Hugging Face Hub id, as a local directory."""
    if source in SHIPPED:
        print(f"using the shipped {source!r} pipeline in {SHIPPED[source]}")
        return SHIPPED[source]
    if source in BUILT_IN:
        print(f"building the built-in {source!r} pipeline from code (random weights, no download)")
        target = workdir / source
        BUILT_IN[source](workdir).save_pretrained(target, safe_serialization=True)
        return target
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise SourceError(f"{local} is not a diffusers pipeline directory: it has no model_index.json")
        return local
    if local.exists() or source.startswith((".", "/", "~")):
        raise SourceError(f"{source} is not a directory")
    return download_from_hub(source, workdir, allow_pickle_weights, revision)


def download_from_hub(repo_id: str, workdir: Path, allow_pickle_weights: bool, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    print(f"downloading {repo_id} from the Hugging Face Hub")
    ignore = None if allow_pickle_weights else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, ignore_patterns=ignore, local_dir=workdir / "download")
        )
    except (OSError, ValueError) as error:  # hub errors derive from these; offline is a ConnectionError
        raise SourceError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the id and your connection, log in with `hf auth login` for gated models, "
            "or download it elsewhere and pass the local directory as --source."
        ) from error


def pickle_only_components(pipeline_dir: Path) -> list[str]:
    """Component folders whose weights exist only in pickle formats, which can run code on load."""
    unsafe = []
    for folder in sorted(path for path in pipeline_dir.iterdir() if path.is_dir()):
        files = [path for path in folder.rglob("*") if path.is_file()]
        has_pickle = any(path.suffix in PICKLE_SUFFIXES for path in files)
        has_safetensors = any(path.suffix == ".safetensors" for path in files)
        if has_pickle and not has_safetensors:
            unsafe.append(folder.name)
    return unsafe


def new_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="archiver-")
