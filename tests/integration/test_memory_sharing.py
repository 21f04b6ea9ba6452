"""CPU workers of one model share its weights through the page cache.

diffusers loads safetensors by mapping the files, and where the stored dtype is the one asked for,
the tensors stay those mapped pages: every worker of the model maps the same extracted files, so a
second worker costs its activations and its Python, not a second copy of the weights. A load that
converts the dtype copies every tensor into the worker's own memory instead, and nothing is shared.
"""

import gc
import re
from pathlib import Path

import psutil
import pytest
import torch
from diffusers import DiffusionPipeline

from devtools.harness.torchserve import TorchServe
from tests.integration.conftest import build_archive

NAME = "shared"


def safetensors_mappings(pid: int) -> dict[str, dict[str, int]]:
    """Per mapped .safetensors file: its Rss and Pss, in bytes (from /proc/PID/smaps).

    Pss counts a page shared by n processes as 1/n of it. (Shared_Clean would not do: the files were
    just extracted, so their pages can still be dirty in the page cache, and count as Shared_Dirty.)
    """
    mappings, current = {}, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split()
            current = fields[5] if len(fields) > 5 and fields[5].endswith(".safetensors") else None
        elif current and line.split(":")[0] in ("Rss", "Pss"):
            key, kilobytes = line.split(":")[0], int(line.split()[1])
            mappings.setdefault(current, {"Rss": 0, "Pss": 0})[key] += kilobytes * 1024
    return mappings


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    store = tmp_path_factory.mktemp("sharing-store")
    build_archive(store, NAME, "--source", "digits", "--min-workers", "2", "--max-workers", "2")
    with TorchServe(tmp_path_factory.mktemp("sharing"), store, {NAME: f"{NAME}.mar"}) as server:
        assert server.predict(NAME, json={"prompt": "digit 1", "output_format": "png"}).status_code == 200
        workers = server.workers()
        assert len(workers) == 2, [process.cmdline() for process in server.processes()]
        yield server, workers


def test_two_cpu_workers_map_the_same_weight_files_and_share_their_pages(two_workers):
    _, workers = two_workers
    first, second = (safetensors_mappings(worker.pid) for worker in workers)
    assert set(first) == set(second)  # the same extracted files
    files = {path: Path(path).stat().st_size for path in first}
    assert {Path(path).parent.name for path in files} >= {"unet", "vae", "text_encoder"}
    for mappings in (first, second):
        for path, size in files.items():
            # Every page of every weight file is resident, and each worker's share of it is half: both map it.
            assert mappings[path]["Rss"] >= 0.95 * size, (path, mappings[path], size)
            assert mappings[path]["Pss"] <= 0.55 * mappings[path]["Rss"], (path, mappings[path], size)


def test_a_load_that_converts_the_dtype_shares_nothing(tmp_path):
    # Why the archive keeps torch_dtype auto (float32 on a CPU, as stored): bfloat16 copies every tensor.
    from devtools.models.digits import DEFAULT_WEIGHTS_DIR

    stored = DiffusionPipeline.from_pretrained(DEFAULT_WEIGHTS_DIR, dtype=torch.float32, use_safetensors=True)
    pid = psutil.Process().pid
    mapped = {path for path in safetensors_mappings(pid) if path.startswith(str(DEFAULT_WEIGHTS_DIR))}
    assert mapped  # as stored: the weights are the mapped files
    del stored
    gc.collect()
    converted = DiffusionPipeline.from_pretrained(DEFAULT_WEIGHTS_DIR, dtype=torch.bfloat16, use_safetensors=True)
    assert converted.unet.dtype == torch.bfloat16
    assert not {path for path in safetensors_mappings(pid) if path.startswith(str(DEFAULT_WEIGHTS_DIR))}
