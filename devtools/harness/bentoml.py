"""`bentoml serve` of the BentoML baseline (devtools/baselines/bentoml_service.py) on loopback, in its own
process group, stopped with everything it started."""

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from devtools import REPO_ROOT
from devtools.harness.torchserve import OwnedServer, free_port

SERVICE_DIR = REPO_ROOT / "devtools" / "baselines"


class BentoMLService(OwnedServer):
    def __init__(self, workdir: Path, pipeline_dir: Path):
        self.workdir, self.pipeline_dir = workdir, pipeline_dir
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = None

    def start(self, timeout_s: float = 300) -> "BentoMLService":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BENTO_PIPELINE_DIR": str(self.pipeline_dir), "BENTOML_HOME": str(self.workdir / "home"),
               "BENTOML_DO_NOT_TRACK": "true"}
        bentoml = Path(sys.executable).with_name("bentoml")
        if not bentoml.exists():
            raise SystemExit(f"BentoML is not installed beside {sys.executable}: pip install -e '.[bench]'")
        self.log = open(self.workdir / "bentoml.out", "wb")
        self.process = subprocess.Popen(
            [str(bentoml), "serve", "bentoml_service:DiffusersService", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1]],
            cwd=SERVICE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"BentoML did not become ready:\n{(self.workdir / 'bentoml.out').read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def predict(self, body: dict) -> requests.Response:
        return requests.post(f"{self.url}/txt2img", json=body, timeout=600)

    def __enter__(self) -> "BentoMLService":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
