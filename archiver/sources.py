"""Turn a --source argument into a local diffusers pipeline directory: a directory, a Hugging Face Hub id,
or the shipped digits model."""

import json
from pathlib import Path

from handlers.core.archive import indexed_components
from handlers.core.source import download_pipeline, is_hub_id
from handlers.core.weights import PICKLE_WEIGHTS

DIGITS_DIR = Path(__file__).resolve().parent / "models" / "tiny-digits"
SHIPPED = {"digits": DIGITS_DIR}  # trained weights committed to the repository, shipped in the wheel
# Generation defaults that suit a shipped model, used where the build command sets none.
RECOMMENDED_DEFAULTS = {
    "digits": {"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 4.0},
}
# The `batching` that suits a shipped model where the build command sets none. At 64x64, four
# requests ran 2.5-3x faster in one call on a 2-core CPU (docs/batching.md); `auto` keeps CPUs
# per_request, since at real sizes combining gains little and costs bit-identical answers.
RECOMMENDED_BATCHING = {"digits": "combined"}


class SourceError(Exception):
    """The source cannot be turned into a safe pipeline directory; the message says why."""


def resolve_source(
    source: str, allow_pickle_weights: bool = False, revision: str | None = None, variant: str | None = None,
) -> Path:
    """A shipped model's name, a local directory, or a Hugging Face Hub id, as a local directory."""
    if source in SHIPPED:
        print(f"using the shipped {source!r} pipeline in {SHIPPED[source]}")
        return SHIPPED[source]
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise SourceError(f"{local} is not a diffusers pipeline directory: it has no model_index.json")
        return local
    if local.exists():
        raise SourceError(f"{source} is not a directory")
    if not is_hub_id(source):
        raise SourceError(
            f"{source} is neither a local directory (none exists there) nor a Hugging Face Hub id of the form "
            "owner/name; nothing was downloaded"
        )
    return download_from_hub(source, allow_pickle_weights, revision, variant)


def resolve_controlnet(source: str, name: str) -> Path:
    """A ControlNet directory (with config.json)."""
    local = Path(source).expanduser()
    if not (local / "config.json").is_file():
        raise SourceError(f"ControlNet {name!r}: {source} is not a directory with a config.json")
    return local


def resolve_lora(source: str, name: str, workdir: Path) -> Path:
    """A LoRA directory holding safetensors weights; a single .safetensors file is staged into one."""
    local = Path(source).expanduser()
    weights = [local] if local.is_file() else list(local.glob("*.safetensors")) if local.is_dir() else []
    if not weights or any(path.suffix != ".safetensors" for path in weights):
        raise SourceError(f"LoRA {name!r}: {source} is neither a .safetensors file nor a directory holding one")
    if local.is_file():
        target = workdir / "loras" / name
        target.mkdir(parents=True, exist_ok=True)
        (target / local.name).write_bytes(local.read_bytes())
        return target
    return local


def download_from_hub(repo_id: str, allow_pickle_weights: bool, revision: str | None, variant: str | None) -> Path:
    """The pipeline's files in the Hugging Face cache, downloaded once (a later build of the same revision
    reads the cache, and with HF_HUB_OFFLINE=1 a build never leaves it)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    print(f"fetching {repo_id} through {where}" + (", offline: HF_HUB_OFFLINE is set" if offline else ""))
    try:
        snapshot = (cached_snapshot(repo_id, revision, variant) if offline else
                    download_pipeline(repo_id, revision, variant, allow_pickle_weights))
    except Exception as error:  # hub, network and cache errors have no common base
        advice = (
            f"HF_HUB_OFFLINE is set, so only models already in {where} can be built; unset it to download"
            if offline else
            "Check the id and your connection, log in with `hf auth login` for gated models, or download it "
            "elsewhere and pass the local directory as --source"
        )
        raise SourceError(f"could not fetch {repo_id!r} ({type(error).__name__}: {error}). {advice}.") from error
    print(f"using {snapshot}")
    return snapshot


def cached_snapshot(repo_id: str, revision: str | None, variant: str | None) -> Path:
    """Offline, the snapshot the cache holds for the revision, found without importing diffusers (and torch:
    seconds of a build that reads nothing else); refused where it lacks a folder model_index.json names or,
    if asked, the variant's weights (diffusers' own offline download would pass either over)."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    index = snapshot / "model_index.json"
    if not index.is_file():
        raise SourceError(f"the cached snapshot {snapshot} has no model_index.json: it is not a diffusers pipeline")
    components = indexed_components(json.loads(index.read_text()))
    missing = [name for name in components if not (snapshot / name).is_dir()]
    if missing:
        raise SourceError(f"the cached snapshot {snapshot} lacks {', '.join(f'{name}/' for name in missing)}, which "
                          "model_index.json names")
    if variant and not any(snapshot.glob(f"*/*.{variant}.safetensors")):
        raise SourceError(f"the cached snapshot {snapshot} holds no {variant} weights (*.{variant}.safetensors)")
    return snapshot


def pickle_only_components(pipeline_dir: Path) -> list[str]:
    """Component folders whose weights exist only in pickle formats, which can run code on load."""
    unsafe = []
    for folder in sorted(path for path in pipeline_dir.iterdir() if path.is_dir()):
        files = [path for path in folder.rglob("*") if path.is_file()]
        has_pickle = any(path.suffix in PICKLE_WEIGHTS for path in files)
        has_safetensors = any(path.suffix == ".safetensors" for path in files)
        if has_pickle and not has_safetensors:
            unsafe.append(folder.name)
    return unsafe
