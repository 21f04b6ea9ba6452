"""The core knows no server: every module of handlers/core imports with TorchServe (`ts`) and Ray absent,
and imports neither. An engine's adapter (handlers/torchserve/, handlers/ray/) sits beside it."""

import importlib.util
import subprocess
import sys

import pytest

from devtools import REPO_ROOT

# sys.modules[name] = None makes `import name` fail, and makes optional-dependency probes
# (importlib.util.find_spec) see the package as absent, as on a machine without it.
IMPORT_WITHOUT_SERVERS = """
import importlib, pkgutil, sys
SERVERS = ("ts", "ray")
for name in SERVERS:
    sys.modules[name] = None
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=name + "."):
        importlib.import_module(module.name)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in SERVERS and sys.modules[name] is not None)
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def import_without_servers(*modules: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_SERVERS, *modules], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300,
    )


def test_the_core_imports_with_neither_torchserve_nor_ray_installed():
    result = import_without_servers("handlers.core")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout


def test_the_check_fails_for_a_module_that_needs_torchserve():
    result = import_without_servers("handlers.torchserve.handler")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr and "'ts" in result.stderr


@pytest.mark.parametrize("module", ["handlers.ray.app", "handlers.ray.proxy"])
def test_rays_ingress_and_proxy_middleware_import_neither_torch_nor_diffusers(module):
    """Ray Serve's HTTP ingress runs in processes of its own, beside every replica, and the body cap runs in
    Serve's proxy on every node: neither may cost a model's imports (about 5 s and 0.5 GB)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the ray extra is not installed here, so there is no ingress to import")
    code = f"import sys, {module}; print(sorted(name for name in ('torch', 'diffusers') if name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
