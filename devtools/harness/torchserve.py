"""A TorchServe on free loopback ports, owned by the test or benchmark that starts it."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from devtools import REPO_ROOT

TORCHSERVE = Path(sys.executable).parent / "torchserve"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_family(process: subprocess.Popen | None) -> list[psutil.Process]:
    """A started process and everything under it."""
    if process is None:
        return []
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_group(process: subprocess.Popen) -> list[psutil.Process]:
    """SIGTERM the process's group (started with start_new_session), then SIGKILL; what survived."""
    family = process_family(process)
    for signal_number, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        if not alive:
            break
    process.wait(timeout=10)
    return [member for member in family if member.is_running() and member.status() != psutil.STATUS_ZOMBIE]


def worker_hwm(pid: int) -> int:
    """A process's peak resident memory (VmHWM); 0 when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM")), 0)


def can_mount_read_only() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def read_only_mounts(paths: tuple[Path, ...]) -> list[str]:
    """A command prefix that runs the rest in a mount namespace where each path is bound read-only onto itself."""
    if not paths:
        return []
    mounts = " && ".join(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))} && "
                         f"mount -o remount,bind,ro {shlex.quote(str(path))}" for path in paths)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def is_worker(process: psutil.Process) -> bool:
    try:
        return any("model_service_worker" in part for part in process.cmdline())
    except psutil.Error:  # the process ended, or is not ours to read
        return False


class OwnedServer:
    """A server process this code started in its own session, logging to self.log; stop() ends the
    whole process group and fails loudly if anything survives."""

    process: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.process is None:
            return
        survivors = stop_process_group(self.process)
        self.log.close()
        self.process = None
        assert not survivors, f"{type(self).__name__} left processes behind: {survivors}"


class TorchServe(OwnedServer):
    """Starts TorchServe in the foreground in its own process group, from the repo's config.properties
    (or base_config) with every address moved to a free loopback port."""

    def __init__(
        self,
        workdir: Path,
        model_store: Path,
        models: dict[str, str],
        token_auth: bool = True,
        extra_config: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        base_config: Path = REPO_ROOT / "config.properties",
        read_only: tuple[Path, ...] = (),
    ):
        """read_only: folders the server sees read-only, as a volume mounted so (needs root: a mount namespace)."""
        self.workdir = workdir
        self.model_store = model_store
        self.models = models
        self.token_auth = token_auth
        self.extra_config = extra_config or {}
        self.env = env or {}
        self.base_config = base_config
        self.read_only = read_only
        self.ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
        self.process: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    def write_config(self) -> Path:
        overrides = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "model_store": str(self.model_store),
            "load_models": ",".join(f"{name}={file}" for name, file in self.models.items()),
            "disable_token_authorization": str(not self.token_auth).lower(),
            # Worker and gRPC ports must not collide with another TorchServe on this machine.
            "initial_worker_port": str(free_port()),
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            **self.extra_config,
        }
        lines = []
        for line in self.base_config.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{key}={value}" for key, value in overrides.items()]
        config = self.workdir / "config.properties"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout_s: float = 180, ready: set[str] | None = None) -> "TorchServe":
        """Start, and wait until the ready models (default: all) have a READY worker."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        # A private temp dir gives this server its own pid file, so a TorchServe the user runs is untouched.
        env = {**os.environ, **self.env, "TMPDIR": str(self.workdir), "TEMP": str(self.workdir)}
        self.log = open(self.workdir / "torchserve.out", "wb")
        self.process = subprocess.Popen(
            [*read_only_mounts(self.read_only), str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=self.workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_until_ready(timeout_s, ready)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout_s: float, ready: set[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(self.models if ready is None else ready)
        while pending or not self.answering():
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"models {sorted(pending)} not READY after {timeout_s}s:\n{self.log_tail()}")
            for name in list(pending):
                if any(worker["status"] == "READY" for worker in self.describe(name)["workers"]):
                    pending.discard(name)
            time.sleep(0.2)  # READY is timed by the benchmarks: 0.2 s is their resolution

    def answering(self) -> bool:
        """The inference port answers and, with token auth, the key file is written."""
        if self.token_auth and not (self.workdir / "key_file.json").is_file():
            return False
        try:
            requests.get(f"{self.inference_url}/ping", timeout=5)
        except requests.ConnectionError:
            return False
        return True

    def keys(self, timeout_s: float = 10) -> dict[str, str]:
        # TorchServe writes the key file in place, so a read can catch it empty or half-written.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                data = json.loads((self.workdir / "key_file.json").read_text())
                return {kind: data[kind]["key"] for kind in ("inference", "management", "API")}
            except (json.JSONDecodeError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"} if self.token_auth else {}

    def describe(self, name: str) -> dict:
        try:
            response = requests.get(f"{self.management_url}/models/{name}", headers=self.auth("management"), timeout=10)
        except (requests.ConnectionError, FileNotFoundError):
            return {"workers": []}
        return response.json()[0] if response.status_code == 200 else {"workers": []}

    def predict(self, name: str, **kwargs) -> requests.Response:
        headers = {**self.auth("inference"), **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 300)
        return requests.post(f"{self.inference_url}/predictions/{name}", headers=headers, **kwargs)

    def client_command(self, argv: list[str]) -> list[str]:
        return argv

    def processes(self) -> list[psutil.Process]:
        return process_family(self.process)

    def workers(self) -> list[psutil.Process]:
        """The Python worker processes among the server's."""
        return [process for process in self.processes() if is_worker(process)]

    def scale(self, name: str, workers: int, timeout_s: float = 600) -> requests.Response:
        """Set the model's worker count through the management API; answers once the workers are up."""
        return requests.put(
            f"{self.management_url}/models/{name}", headers=self.auth("management"),
            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"}, timeout=timeout_s,
        )

    def __enter__(self) -> "TorchServe":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_size(self, name: str = "model_log.log") -> int:
        """Where one of TorchServe's logs ends now: log_since(size) reads what comes after."""
        path = self.workdir / "logs" / name
        return path.stat().st_size if path.exists() else 0

    def log_since(self, offset: int, name: str = "model_log.log") -> str:
        with open(self.workdir / "logs" / name, "rb") as stream:
            stream.seek(offset)
            return stream.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        text = ""
        for path in [self.workdir / "torchserve.out", *sorted((self.workdir / "logs").glob("*.log"))]:
            if path.exists():
                text += f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text
