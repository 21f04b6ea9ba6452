"""Archives that reference their weights (`--weights reference`): what the archiver writes, and what every
worker checks before it loads, on a tiny real pipeline whose weights stay in a folder of the test's own."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from archiver.references import REFERENCE_THRESHOLD, references_weights
from devtools.archives import main as archiver
from devtools.models.hub_cache import fill_hub_cache
from handlers.core.errors import ReferencedWeightsError
from handlers.core.source import open_source
from handlers.core.weights import ROOT_VARIABLE, SAMPLE_BYTES, SAMPLES
from tests.conftest import SMALL
from tests.unit.helpers import fine_tuned, pixels, served_family

UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
REQUEST = {"prompt": "a lighthouse", "seed": 5, "output_format": "png"}
REPO_ID, COMMIT = "tiny-org/tiny-sd", "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def root(tmp_path, tiny_pipeline_dir) -> Path:
    """The weights' own folder, which each test may change after the build."""
    return Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "weights"))


def build(source: Path, store: Path, *options: str, name: str = "ref") -> Path:
    size = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
    arguments = ["build", "--source", str(source), "--export-path", str(store), "--model-name", name,
                 "--archive-format", "no-archive", *size, *options]
    assert archiver(arguments) == 0
    return store / name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_reference_archive_holds_no_weights_and_draws_what_the_packed_one_draws(tmp_path, root, capsys):
    referencing = build(root, tmp_path / "store", "--weights", "reference")
    assert "referencing 3 weight files" in capsys.readouterr().out
    packed = build(root, tmp_path / "store", "--weights", "pack", name="packed")
    assert not list(referencing.rglob("*.safetensors")) and (referencing / "unet" / "config.json").is_file()
    manifest = json.loads((referencing / "weights.json").read_text())
    assert manifest["root"] == str(root.resolve()) and manifest["hub"] is None
    assert {entry["path"]: (entry["size"], entry["sha256"]) for entry in manifest["files"]} == {
        str(path.relative_to(root)): (path.stat().st_size, sha256(path)) for path in root.rglob("*.safetensors")}
    [drawn], [expected] = served_family(referencing).post(REQUEST), served_family(packed).post(REQUEST)
    assert drawn.status == 200 and (pixels(drawn) == pixels(expected)).all()


def test_the_worker_maps_the_weights_where_they_lie(tmp_path, root):
    service = served_family(build(root, tmp_path / "store", "--weights", "reference")).service
    maps = Path(f"/proc/{os.getpid()}/maps").read_text().splitlines()
    mapped = {line.split()[-1] for line in maps if line.endswith(".safetensors") and str(root.resolve()) in line}
    assert {str(root.resolve() / UNET), str(root.resolve() / VAE)} <= mapped
    assert service.pipeline.unet.dtype == torch.float32


def test_a_missing_root_stops_the_model_naming_the_variable_to_set(tmp_path, root):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    moved = root.rename(tmp_path / "moved")
    with pytest.raises(ReferencedWeightsError, match=f"{root}.*is not a directory.*Set {ROOT_VARIABLE} to the directory "
                       "holding text_encoder/, unet/, vae/"):
        served_family(archive)
    assert served_family(archive, weights_root=str(moved)).post(REQUEST)[0].status == 200


def test_the_environment_variable_wins_over_the_handler_section(tmp_path, root, monkeypatch):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    moved = root.rename(tmp_path / "moved")
    monkeypatch.setenv(ROOT_VARIABLE, str(moved))
    assert served_family(archive, weights_root=str(tmp_path / "nowhere")).post(REQUEST)[0].status == 200
    monkeypatch.setenv(ROOT_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(ReferencedWeightsError, match=f"from {ROOT_VARIABLE}"):
        served_family(archive, weights_root=str(moved))


def test_a_file_of_another_size_stops_the_model(tmp_path, root):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    with open(root / VAE, "ab") as stream:
        stream.write(b"\0" * 8)
    with pytest.raises(ReferencedWeightsError, match=f"{VAE} in {root}.* has changed: .* bytes"):
        served_family(archive)


def test_weights_saved_again_with_other_values_stop_the_model(tmp_path, root):
    # A fine-tune of the same architecture: the same size and header, other values everywhere.
    archive = build(root, tmp_path / "store", "--weights", "reference")
    size = (root / UNET).stat().st_size
    fine_tuned(root / UNET, root / UNET)
    assert (root / UNET).stat().st_size == size
    with pytest.raises(ReferencedWeightsError, match=f"{UNET} in {root} has changed: its sampled sha256"):
        served_family(archive)


def test_full_verification_catches_a_byte_that_sampling_passes_over(tmp_path, root):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    size = (root / UNET).stat().st_size
    between_samples = (size - SAMPLE_BYTES) // (SAMPLES - 1) + SAMPLE_BYTES + 1024  # after slice 1, before slice 2
    assert between_samples < 2 * (size - SAMPLE_BYTES) // (SAMPLES - 1)
    with open(root / UNET, "r+b") as stream:
        stream.seek(between_samples)
        byte = stream.read(1)
        stream.seek(between_samples)
        stream.write(bytes([byte[0] ^ 0xFF]))
    assert served_family(archive).post(REQUEST)[0].status == 200  # sampled: what it reads is unchanged
    with pytest.raises(ReferencedWeightsError, match=f"{UNET} in {root} has changed: its sha256"):
        served_family(archive, verify_weights="full")


def test_a_link_out_of_the_root_stops_the_model(tmp_path, root):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    outside = Path(shutil.copyfile(root / VAE, tmp_path / "elsewhere.safetensors"))
    (root / VAE).unlink()
    (root / VAE).symlink_to(outside)
    with pytest.raises(ReferencedWeightsError, match=f"{VAE} in the weights root {root} is a link to {outside}, outside it"):
        served_family(archive)


def test_code_in_the_tree_stops_the_model_and_the_build(tmp_path, root, capsys):
    archive = build(root, tmp_path / "store", "--weights", "reference")
    (root / "unet" / "modeling.py").write_text("import os\n")
    with pytest.raises(ReferencedWeightsError, match="unet/modeling.py in the weights root .* is code"):
        served_family(archive)
    arguments = ["build", "--source", str(root), "--export-path", str(tmp_path / "again"), "--weights", "reference"]
    assert archiver(arguments) == 2
    assert "unet/modeling.py in the weights root" in capsys.readouterr().err


def test_a_hub_snapshot_is_pinned_by_its_commit_and_its_blob_names(tmp_path, root, capsys):
    snapshot = fill_hub_cache(root, tmp_path / "hub", REPO_ID, COMMIT)
    archive = build(snapshot, tmp_path / "store")  # --weights auto: the cache keeps them
    assert "the source is in the Hugging Face cache" in capsys.readouterr().out
    manifest = json.loads((archive / "weights.json").read_text())
    assert manifest["root"] == str((tmp_path / "hub").resolve())
    assert manifest["hub"] == {"repo_id": REPO_ID, "commit": COMMIT}
    for entry in manifest["files"]:  # the blob names, and the contents' own sha256
        assert entry["sha256"] == (snapshot / entry["path"]).resolve().name == sha256(root / entry["path"])
    assert served_family(archive).post(REQUEST)[0].status == 200


def test_a_snapshot_linked_to_another_blob_of_the_same_size_stops_the_model(tmp_path, root):
    snapshot = fill_hub_cache(root, tmp_path / "hub", REPO_ID, COMMIT)
    archive = build(snapshot, tmp_path / "store")
    other = tmp_path / "other.safetensors"
    fine_tuned(root / UNET, other)
    blob = snapshot.parent.parent / "blobs" / sha256(other)
    shutil.move(other, blob)
    (snapshot / UNET).unlink()
    (snapshot / UNET).symlink_to(os.path.relpath(blob, (snapshot / UNET).parent))
    with pytest.raises(ReferencedWeightsError, match=f"{UNET} in .* has changed: its Hugging Face blob is {blob.name}"):
        served_family(archive)


def test_a_cache_without_the_pinned_snapshot_says_which_revision_to_download(tmp_path, root):
    snapshot = fill_hub_cache(root, tmp_path / "hub", REPO_ID, COMMIT)
    archive = build(snapshot, tmp_path / "store")
    snapshot.rename(snapshot.parent / ("f" * 40))  # the cache moved on to another commit
    with pytest.raises(ReferencedWeightsError, match=f"holds {REPO_ID} but not its snapshot {COMMIT}.*--revision {COMMIT}"):
        served_family(archive)


def test_a_snapshot_copied_out_of_the_cache_serves_through_the_variable(tmp_path, root, monkeypatch):
    # KServe's storage initializer downloads a model as plain files into /mnt/models.
    snapshot = fill_hub_cache(root, tmp_path / "hub", REPO_ID, COMMIT)
    archive = build(snapshot, tmp_path / "store")
    mounted = Path(shutil.copytree(snapshot, tmp_path / "mnt-models"))  # links followed: plain files
    shutil.rmtree(tmp_path / "hub")
    monkeypatch.setenv(ROOT_VARIABLE, str(mounted))
    assert served_family(archive).post(REQUEST)[0].status == 200


def test_a_reference_mar_opens_on_ray_too(tmp_path, root):
    # Ray's replicas unpack a .mar with open_source; the referenced weights load the same way.
    build(root, tmp_path / "store", "--weights", "reference", "--archive-format", "zip-store")
    model = open_source(str(tmp_path / "store" / "ref.mar"), tmp_path / "unpacked")
    assert (model.model_dir / "weights.json").is_file() and not list(model.model_dir.rglob("*.safetensors"))
    assert served_family(model.model_dir).post(REQUEST)[0].status == 200


def test_auto_references_a_hub_snapshot_or_a_large_directory_and_packs_the_rest(tmp_path, root):
    snapshot = fill_hub_cache(root, tmp_path / "hub", REPO_ID, COMMIT)
    assert references_weights("auto", snapshot, 1)[0]
    assert references_weights("auto", root, REFERENCE_THRESHOLD + 1)[0]
    assert not references_weights("auto", root, REFERENCE_THRESHOLD)[0]
    assert not references_weights("pack", snapshot, REFERENCE_THRESHOLD + 1)[0]
    assert references_weights("reference", root, 1)[0]
