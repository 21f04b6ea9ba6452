"""The BentoML baseline that scripts/bench.py measures against: it serves our archive's pipeline
directory, answers PNG, listens on loopback only, and stops with nothing left behind."""

import io

import psutil
import pytest
from PIL import Image

from archiver.cli import main as archiver_main
from devtools.harness.torchserve import process_family

pytest.importorskip("bentoml", reason="BentoML is the benchmark's second baseline: pip install -e '.[bench]'")

from devtools.harness.bentoml import BentoMLService  # noqa: E402


@pytest.fixture(scope="module")
def bento(tmp_path_factory):
    store = tmp_path_factory.mktemp("bento-store")
    assert archiver_main(["build", "--source", "digits", "--model-name", "digits", "--export-path", str(store),
                          "--archive-format", "no-archive"]) == 0
    service = BentoMLService(tmp_path_factory.mktemp("bento"), store / "digits").start()
    yield service
    service.stop()  # asserts that nothing it started survives


def test_it_answers_a_png_of_the_requested_size(bento):
    response = bento.predict({"prompt": "digit 3", "num_inference_steps": 2, "guidance_scale": 4.0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_it_listens_on_loopback_only(bento):
    family = process_family(bento.process)
    port = int(bento.url.rsplit(":", 1)[1])
    listening = [connection.laddr for process in family for connection in process.net_connections("tcp")
                 if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)
