"""A real Ray cluster (a head node and optional worker nodes, each started with `ray start`) serving
handlers/ray/, inside a network namespace of its own that has only loopback.

Outside such a namespace Ray reports the machine's outward-facing address as every node's address,
even with --node-ip-address=127.0.0.1 (it replaces loopback on purpose), and this project's machines
may send traffic only to loopback. Inside it, every Ray process and every client request stays on
127.0.0.1: the processes are started there with nsenter, and requests are sent from threads that
entered the namespace (a network namespace belongs to a thread, and a socket to the namespace it was
made in). Creating the namespace needs root (CAP_SYS_ADMIN).
"""

import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
import yaml

from devtools import REPO_ROOT

CLONE_NEWNET = 0x40000000
BIN = Path(sys.executable).parent
GCS_PORT = 6380  # the namespace is new and empty: fixed ports cannot collide
SERVE_PORT = 8000  # Ray Serve's default, as users reach it
DASHBOARD_PORT = 8265  # where `serve deploy` sends the Serve config, as KubeRay's operator does
REQUEST_TIMEOUT_S = 660  # Serve's proxy answers no request later than this, as the shipped configs say
# A torn-down cluster's processes get this long after SIGTERM before SIGKILL. Some of Ray's took the whole
# 20 s they were once given, at every test module's teardown; nothing of a test cluster needs to be kept.
STOP_GRACE_S = 3


PROXY_MIDDLEWARES = "handlers.ray.proxy:middlewares"


def can_make_namespaces() -> bool:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


class LoopbackNamespace:
    """A network namespace with only loopback up, held open by a sleeping process."""

    def __init__(self):
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        if self.holder.stdout.readline().strip() != "up":
            self.holder.kill()
            raise RuntimeError("could not bring loopback up in a new network namespace")
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self._entered = threading.local()

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", *argv]

    def enter_this_thread(self) -> None:
        """Move the calling thread into the namespace: sockets it makes from now on are the namespace's."""
        if getattr(self._entered, "done", False):
            return
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(descriptor, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the loopback namespace failed")
        finally:
            os.close(descriptor)
        self._entered.done = True

    def members(self) -> list[psutil.Process]:
        """The processes inside the namespace, but the holder."""
        ours = os.readlink(self.path)
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != self.holder.pid and os.readlink(f"/proc/{process.pid}/ns/net") == ours:
                    found.append(process)
            except (OSError, psutil.Error):
                continue
        return found

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


class RayServeCluster:
    """`ray start` nodes with Ray's token authentication on, and the app deployed from a Serve config file
    with `serve deploy`, in a LoopbackNamespace; requests go through namespaced threads.

    models: each model's name and source (a .mar, a directory or a hub id); nodes: each node's custom
    resources, head first, so that every node carries a label of its own; app_args: more of the
    application's arguments (handlers/ray/app.py's AppArgs).
    """

    def __init__(self, workdir: Path, models: dict[str, Path | str], nodes: tuple[dict, ...] = ({"head_node": 1},),
                 replicas: int = 1, cpus_per_node: int = 2, app_args: dict | None = None):
        self.workdir, self.models = workdir, {name: str(source) for name, source in models.items()}
        self.nodes, self.replicas, self.cpus_per_node = nodes, replicas, cpus_per_node
        self.app_args = app_args or {}
        self.namespace: LoopbackNamespace | None = None
        self.clients = ThreadPoolExecutor(16, initializer=self._enter_namespace)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO_ROOT),  # replicas import this checkout's handlers, as TorchServe's workers do
            "RAY_USAGE_STATS_ENABLED": "0",
            # Token authentication on Ray's control plane, as in production (kuberay/rayservice.yaml).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            # Serve's proxy caps bodies as they arrive (handlers/ray/proxy.py), as serve_ray.sh and KubeRay set it.
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_MIDDLEWARES,
        }
        # Ray's Unix sockets live under its temp dir, whose path must stay short (108 bytes with the socket's name).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{SERVE_PORT}"

    def _enter_namespace(self) -> None:
        self.namespace.enter_this_thread()

    def run(self, argv: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
        """A command inside the namespace; fails loudly with its output."""
        result = subprocess.run(self.namespace.command(argv), env=self.env, capture_output=True, text=True,
                                timeout=timeout_s, cwd=self.workdir)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def start(self) -> "RayServeCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespace = LoopbackNamespace()
        try:
            common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--disable-usage-stats"]
            head, *others = self.nodes
            self.run(["ray", "start", "--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={self.temp_dir}",
                      f"--resources={json.dumps(head)}", *common])
            for resources in others:
                self.run(["ray", "start", f"--address=127.0.0.1:{GCS_PORT}", f"--resources={json.dumps(resources)}", *common])
            self.deploy(self.serve_config())
        except BaseException:
            self.stop()
            raise
        return self

    def serve_config(self) -> dict:
        """One application per model, at /predictions/<name>, as serve_ray.sh and KubeRay deploy them."""
        applications = [{"name": name, "route_prefix": f"/predictions/{name}", "import_path": "handlers.ray.app:build_app",
                         "args": {"source": source, "model_name": name, "replicas": self.replicas, **self.app_args}}
                        for name, source in self.models.items()]
        return {"http_options": {"host": "127.0.0.1", "port": SERVE_PORT, "request_timeout_s": REQUEST_TIMEOUT_S},
                "applications": applications}

    def deploy(self, config: dict, timeout_s: float = 600) -> None:
        """`serve deploy` a Serve config file, then wait until every application runs."""
        path = self.workdir / "serve.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.run(["serve", "deploy", str(path), "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"])
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.run(["serve", "status", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}"]).stdout
            states = {name: application["status"]
                      for name, application in (yaml.safe_load(status).get("applications") or {}).items()}
            if states and all(state == "RUNNING" for state in states.values()) and set(states) >= set(self.models):
                return
            if any(state in ("DEPLOY_FAILED", "UNHEALTHY") for state in states.values()) or time.monotonic() > deadline:
                raise RuntimeError(f"the Serve applications did not start: {status[-3000:]}")
            time.sleep(1)


    def predict(self, name: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 300)
        return self.clients.submit(requests.post, f"{self.inference_url}/predictions/{name}", **kwargs).result()

    def get(self, path: str, **kwargs) -> requests.Response:
        """GET a path of Serve's HTTP proxy, from inside the namespace."""
        kwargs.setdefault("timeout", 60)
        return self.clients.submit(requests.get, f"{self.inference_url}{path}", **kwargs).result()

    def client_command(self, argv: list[str]) -> list[str]:
        """A client command line that runs where it reaches the cluster: inside the namespace."""
        return self.namespace.command(argv)

    def replica_log(self) -> str:
        """What the replicas and ingresses logged: Serve's own log files (our modules log through Serve's
        logger), and their processes' output."""
        logs = self.temp_dir / "session_latest" / "logs"
        paths = [*sorted((logs / "serve").glob("replica_*")), *sorted(logs.glob("worker-*"))]
        return "".join(path.read_text(errors="replace") for path in paths)

    def state(self, code: str) -> object:
        """Evaluate Python against the cluster's state API inside the namespace; code sets `result`."""
        script = (f"import json, ray\nray.init(address='127.0.0.1:{GCS_PORT}', log_to_driver=False)\n{code}\n"
                  "print('RESULT', json.dumps(result))")
        output = self.run([sys.executable, "-c", script]).stdout
        return json.loads(output.split("RESULT ", 1)[1])

    def stop(self) -> None:
        """End every process in the cluster's namespace, then the namespace."""
        if self.namespace is None:
            return
        try:
            stop_processes(self.processes())
            left = self.processes()
        finally:
            self.clients.shutdown(wait=False)
            self.namespace.close()
            self.namespace = None
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"the Ray cluster left processes behind: {left}"

    def processes(self) -> list[psutil.Process]:
        """Every process in the cluster's namespace but its holder: Ray's daemons leave the process tree."""
        return self.namespace.members() if self.namespace else []

    def __enter__(self) -> "RayServeCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def stop_processes(processes: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is still running after a grace period."""
    for signal_name in ("terminate", "kill"):
        for process in processes:
            try:
                getattr(process, signal_name)()
            except psutil.NoSuchProcess:
                pass
        _, processes = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
        if not processes:
            return
