"""What ships beyond one machine: the container's TorchServe config serves a .mar, the Dockerfiles
copy what exists, and the files agree with each other and with their base images. (No image is
built here: this machine has no registry to pull the bases from.)"""

import json
from pathlib import Path
import re
import sys

import pytest
import requests
import yaml

from archiver.build import ServingConfig
from handlers.core.limits import Limits
from handlers.core.weights import ROOT_VARIABLE
from devtools import REPO_ROOT
from devtools.harness.torchserve import TorchServe
from tests.integration.conftest import TINY, read_properties

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from client import INFERENCE_PORT  # noqa: E402 - scripts/ is not a package

DOCKER_CONFIG = REPO_ROOT / "docker" / "config.properties"
SECURE_SETTINGS = (
    "disable_token_authorization", "enable_model_api", "enable_envvars_config", "install_py_dep_per_model",
    "allowed_urls", "grpc_inference_address", "grpc_management_address", "metrics_mode", "model_metrics_auto_detect",
)


def dockerfile_steps(path) -> list[tuple[str, str]]:
    return [tuple(line.split(maxsplit=1)) for line in path.read_text().splitlines() if re.match(r"^[A-Z]+ ", line)]


def test_the_container_config_has_the_same_secure_settings_as_the_local_one():
    local, container = read_properties(REPO_ROOT / "config.properties"), read_properties(DOCKER_CONFIG)
    assert {key: container[key] for key in SECURE_SETTINGS} == {key: local[key] for key in SECURE_SETTINGS}


def test_the_container_config_serves_a_mar_with_token_auth(tmp_path, model_store):
    with TorchServe(tmp_path, model_store, {TINY: f"{TINY}.mar"}, base_config=DOCKER_CONFIG) as torchserve:
        url = f"{torchserve.inference_url}/predictions/{TINY}"
        assert requests.post(url, data="a cat", timeout=60).status_code == 400  # no token
        response = torchserve.predict(TINY, data="a cat", headers={"Content-Type": "text/plain"})
        assert response.status_code == 200, response.text
        assert len(json.loads(response.text)) == 64


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "kserve/Dockerfile"])
def test_dockerfiles_copy_files_that_exist(dockerfile):
    steps = dockerfile_steps(REPO_ROOT / dockerfile)
    copies = [argument.split()[:-1] for instruction, argument in steps if instruction == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile} copies {source}, which is missing"


def test_the_container_starts_torchserve_with_its_config_and_documents_its_cuda_build():
    steps = dockerfile_steps(REPO_ROOT / "docker" / "Dockerfile")
    config_destination = next(argument.split()[-1] for instruction, argument in steps if argument.startswith("docker/config"))
    command = json.loads(next(argument for instruction, argument in steps if instruction == "CMD"))
    assert command[command.index("--ts-config") + 1] == config_destination
    assert "--foreground" in command  # TorchServe stays the container's main process
    assert read_properties(DOCKER_CONFIG)["model_store"] in (REPO_ROOT / "docker" / "Dockerfile").read_text()
    bases = [argument for instruction, argument in steps if instruction == "ARG" and argument.startswith("BASE_IMAGE")]
    assert bases == ["BASE_IMAGE=debian:bookworm-slim"]  # CPU by default; the CUDA base is a build argument
    # The CUDA variant is a documented build command in the Dockerfile's header, not an instruction:
    # what can be checked is that the command it documents swaps in a CUDA runtime base and PyPI's torch.
    [cuda_build] = re.findall(r"CUDA: (docker build .*\n#.*)", (REPO_ROOT / "docker" / "Dockerfile").read_text())
    assert re.search(r"--build-arg BASE_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+ ", cuda_build)
    assert "--build-arg TORCH_INDEX_URL= " in cuda_build


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_kserve_manifests_use_torchserve_with_their_protocol(protocol):
    manifest = yaml.safe_load((REPO_ROOT / "kserve" / f"inferenceservice-{protocol}.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"  # KServe's TorchServe runtime
    assert model["protocolVersion"] == protocol
    assert model["storageUri"] and model["image"]
    snapshot = json.loads(read_properties(REPO_ROOT / "kserve" / "config.properties")["model_snapshot"])
    assert list(snapshot["models"]) == ["stable_diffusion"]
    version = snapshot["models"]["stable_diffusion"]["1.0"]
    # Every row of a batch may take the archive's request_timeout_s: the batch's reply must be awaited as long.
    assert version["responseTimeout"] >= version["batchSize"] * Limits().request_timeout_s


# python3 of each base image's distribution: Debian 12 ships 3.11, Ubuntu 24.04 3.12.
DISTRIBUTION_PYTHON = {"debian:bookworm": (3, 11), "ubuntu24.04": (3, 12)}
DOCKERFILES = ["docker/Dockerfile", "kserve/Dockerfile"]


def base_images(dockerfile: str) -> list[str]:
    """The default base, and the ones the header's documented build commands swap in."""
    text = (REPO_ROOT / dockerfile).read_text()
    return re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M) + re.findall(r"--build-arg BASE_IMAGE=(\S+)", text)


def required_python() -> tuple[int, ...]:
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    return int(floor[1]), int(floor[2])


def test_every_base_image_brings_a_python_the_package_installs_on():
    bases = base_images("docker/Dockerfile")
    assert bases
    for base in bases:
        [python] = [version for name, version in DISTRIBUTION_PYTHON.items() if name in base]
        assert python >= required_python() >= (3, 10), base
    assert "python3 python3-venv" in (REPO_ROOT / "docker" / "Dockerfile").read_text()  # the distribution's own
    # The KServe image builds on ours, never on pytorch/torchserve-kfs (Python 3.9, pytorch/serve#3374).
    kserve_bases = base_images("kserve/Dockerfile")
    assert kserve_bases and all(base.startswith("torchserve-diffusers:") for base in kserve_bases), kserve_bases
    assert "-f docker/Dockerfile" in (REPO_ROOT / "kserve" / "Dockerfile").read_text()  # its documented first step


def test_uid_1000_is_freed_before_the_server_user_takes_it():
    text = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    freeing = text.index('userdel --remove "$(getent passwd 1000 | cut -d: -f1)"')
    assert "if getent passwd 1000 >/dev/null; then" in text
    assert freeing < text.index("useradd --create-home --uid 1000 model-server")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pid_1_is_an_init_that_signals_the_whole_process_group(dockerfile):
    steps = dockerfile_steps(REPO_ROOT / dockerfile)
    [entrypoint] = [json.loads(argument) for instruction, argument in steps if instruction == "ENTRYPOINT"]
    assert entrypoint[:3] == ["tini", "-g", "--"]
    assert re.search(r"apt-get install .*\btini\b", (REPO_ROOT / "docker" / "Dockerfile").read_text())


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_the_container_exposes_what_its_config_binds_and_probes_it_with_the_shipped_script():
    steps = dockerfile_steps(REPO_ROOT / "docker" / "Dockerfile")
    config = read_properties(DOCKER_CONFIG)
    bound = {port(config[key]) for key in ("inference_address", "management_address", "metrics_address")}
    [exposed] = [argument for instruction, argument in steps if instruction == "EXPOSE"]
    assert {int(value) for value in exposed.split()} == bound
    [healthcheck] = [argument for instruction, argument in steps if instruction == "HEALTHCHECK"]
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    script = probe[1]
    copied = [argument.split() for instruction, argument in steps if instruction == "COPY" and "scripts/manage.py" in argument]
    assert copied and all(script.startswith(sources[-1]) for sources in copied)
    assert {"scripts/manage.py", "scripts/client.py"} <= {source for sources in copied for source in sources[:-1]}
    [workdir] = [argument for instruction, argument in steps if instruction == "WORKDIR"]
    assert probe[probe.index("--key-file") + 1] == f"{workdir}/key_file.json"  # TorchServe writes it in its cwd
    # manage.py health calls /ping on its default inference URL: the port the config binds.
    assert INFERENCE_PORT == port(config["inference_address"])


def test_the_kserve_probe_readme_gives_calls_the_port_its_config_binds():
    text = (REPO_ROOT / "docs" / "production.md").read_text()
    [url] = re.findall(r"scripts/manage.py health --inference-url (http://\S+)`", text.replace("\n", " "))
    assert port(url) == port(read_properties(REPO_ROOT / "kserve" / "config.properties")["inference_address"])
    # The KServe image inherits the scripts from ours, and turns off our HEALTHCHECK (port 8080 is the wrapper's there).
    copies = [argument for instruction, argument in dockerfile_steps(REPO_ROOT / "docker" / "Dockerfile") if instruction == "COPY"]
    assert "scripts/manage.py scripts/client.py /home/model-server/scripts/" in copies
    kserve_steps = dockerfile_steps(REPO_ROOT / "kserve" / "Dockerfile")
    assert ("HEALTHCHECK", "NONE") in kserve_steps and ("CMD", "[]") in kserve_steps


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_each_kserve_manifest_runs_the_shipped_config_and_an_archive_of_its_protocol(protocol):
    """One config for both protocols, with no service_envelope: the archive says which protocol the handler
    reads and answers (kserve/README.md builds it with --set kserve_protocol=...)."""
    manifest_text = (REPO_ROOT / "kserve" / f"inferenceservice-{protocol}.yaml").read_text()
    assert "a copy of kserve/config.properties" in manifest_text
    assert yaml.safe_load(manifest_text)["spec"]["predictor"]["model"]["protocolVersion"] == protocol
    assert "service_envelope" not in read_properties(REPO_ROOT / "kserve" / "config.properties")
    readme = (REPO_ROOT / "kserve" / "README.md").read_text()
    assert "--set kserve_protocol=v2" in readme and "(or `v1`, for the v1 manifest's `storageUri`)" in readme


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_the_kserve_wrapper_waits_as_long_as_an_archive_may_take_to_start(protocol):
    manifest = yaml.safe_load((REPO_ROOT / "kserve" / f"inferenceservice-{protocol}.yaml").read_text())
    env = {item["name"]: item["value"] for item in manifest["spec"]["predictor"]["model"]["env"]}
    # TorchServe's wrapper (TorchserveModel.load): MODEL_LOAD_MAX_TRY tries, MODEL_LOAD_DELAY s apart.
    assert int(env["MODEL_LOAD_MAX_TRY"]) * int(env["MODEL_LOAD_DELAY"]) >= ServingConfig.startup_timeout_s


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_each_kserve_manifest_finds_the_referenced_weights_in_its_storage(protocol):
    """KServe's storage initializer puts storageUri at /mnt/models: the config and the small archive where
    kserve/config.properties reads them, the weights where the variable points."""
    model = yaml.safe_load((REPO_ROOT / "kserve" / f"inferenceservice-{protocol}.yaml").read_text())["spec"]["predictor"]["model"]
    env = {item["name"]: item["value"] for item in model["env"]}
    assert env[ROOT_VARIABLE] == "/mnt/models/weights"
    assert read_properties(REPO_ROOT / "kserve" / "config.properties")["model_store"] == "/mnt/models/model-store"
    readme = (REPO_ROOT / "kserve" / "README.md").read_text()
    assert "--weights reference --set kserve_protocol=v2" in readme and "storage/weights" in readme


def test_the_kserve_image_runs_the_command_kserve_passes_then_the_wrapper():
    """Through our wrapper.py, which adds the request schema as v2 metadata, then runs the wrapper's __main__.py."""
    script = (REPO_ROOT / "kserve" / "entrypoint.sh").read_text()
    assert '\n"$@"\nexec python /home/model-server/kserve_wrapper/diffusers_wrapper.py\n' in script
    dockerfile = (REPO_ROOT / "kserve" / "Dockerfile").read_text()
    assert "COPY kserve/wrapper.py /home/model-server/kserve_wrapper/diffusers_wrapper.py" in dockerfile
    wrapper = (REPO_ROOT / "kserve" / "wrapper.py").read_text()
    assert 'runpy.run_path(str(WRAPPER / "__main__.py"), run_name="__main__")' in wrapper
    assert "ARG TORCHSERVE_TAG=v0.12.0" in dockerfile and '"torchserve==0.12.0"' in (REPO_ROOT / "pyproject.toml").read_text()
    for wrapper_file in ("__main__.py", "TorchserveModel.py", "TSModelRepository.py", "gprc_utils.py"):
        assert f"kserve_wrapper/{wrapper_file}" in dockerfile


RAYSERVICE = REPO_ROOT / "kuberay" / "rayservice.yaml"


def rayservice() -> tuple[dict, dict]:
    """The RayService manifest, and its Serve config (serveConfigV2, itself YAML in a string)."""
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    return manifest, yaml.safe_load(manifest["spec"]["serveConfigV2"])


def ray_containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    return [container for pod in pods for container in pod["spec"]["containers"]]


def test_the_rayservice_runs_our_app_at_the_request_apis_path():
    import handlers.ray.app as ray_app

    _, serve_config = rayservice()
    [app] = serve_config["applications"]
    module, attribute = app["import_path"].split(":")
    assert module == ray_app.__name__ and callable(getattr(ray_app, attribute))
    args = ray_app.AppArgs(**app["args"])  # the builder's own argument model refuses unknown keys
    assert app["route_prefix"] == f"/predictions/{args.model_name}"
    assert [deployment["name"] for deployment in app["deployments"]] == [args.model_name]  # build_app's name


def test_the_rayservice_autoscales_on_queue_length_with_valid_settings():
    from ray.serve.config import AutoscalingConfig

    _, serve_config = rayservice()
    [deployment] = serve_config["applications"][0]["deployments"]
    autoscaling = AutoscalingConfig(**deployment["autoscaling_config"])
    assert autoscaling.target_ongoing_requests and autoscaling.max_replicas > autoscaling.min_replicas


def test_the_rayservice_serves_the_port_its_containers_expose_and_mounts_the_archive():
    manifest, serve_config = rayservice()
    port = serve_config["http_options"]["port"]
    source = serve_config["applications"][0]["args"]["source"]
    for container in ray_containers(manifest):
        assert port in [entry["containerPort"] for entry in container["ports"]], container["name"]
        mounts = [mount["mountPath"] for mount in container["volumeMounts"]]
        assert any(source.startswith(mount.rstrip("/") + "/") for mount in mounts), container["name"]


def test_the_container_points_referenced_weights_at_the_mount_it_documents():
    steps = dockerfile_steps(REPO_ROOT / "docker" / "Dockerfile")
    root = next(argument.split("=", 1)[1] for instruction, argument in steps
                if instruction == "ENV" and argument.startswith(f"{ROOT_VARIABLE}="))
    assert f":{root}:ro]" in (REPO_ROOT / "docker" / "Dockerfile").read_text()


def test_every_rayservice_container_finds_the_referenced_weights_on_its_volume():
    manifest, _ = rayservice()
    for container in ray_containers(manifest):
        root = {item["name"]: item["value"] for item in container["env"]}[ROOT_VARIABLE]
        mounts = [mount for mount in container["volumeMounts"] if root.startswith(mount["mountPath"].rstrip("/") + "/")]
        assert mounts and all(mount["readOnly"] for mount in mounts), container["name"]


def test_the_rayservice_runs_the_ray_we_test_in_the_image_built_with_the_ray_extra():
    manifest, serve_config = rayservice()
    pinned = re.search(r"^ray==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == pinned
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG EXTRAS=" in dockerfile and "${EXTRAS:+[$EXTRAS]}" in dockerfile
    for container in ray_containers(manifest):
        image = container["image"].split(":")[0]
        assert f"-t {image}:" in dockerfile and "--build-arg EXTRAS=ray" in dockerfile, image
    gpus = serve_config["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"]
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(gpus <= group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for group in workers)


def test_the_rayservice_keeps_rays_token_authentication_on():
    manifest, _ = rayservice()
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_the_networkpolicy_admits_only_ray_pods_the_operator_and_the_gateway_to_their_ports():
    manifest, serve_config = rayservice()
    policy = yaml.safe_load((REPO_ROOT / "kuberay" / "networkpolicy.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    pod_templates = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for template in pod_templates:  # a pod the policy does not select would be open to anyone
        assert selected.items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    ray_pods, operator, gateway = rules
    assert ray_pods == {"from": [{"podSelector": {"matchLabels": selected}}]}  # every port, Ray pods only
    assert [port["port"] for port in operator["ports"]] == [8265]
    assert "kuberay-operator" in str(operator["from"])
    assert [port["port"] for port in gateway["ports"]] == [serve_config["http_options"]["port"]]
    assert all("ports" in rule for rule in (operator, gateway))  # only the Ray pods reach the GCS (6379)


def test_the_local_serve_config_deploys_what_the_rayservice_does():
    _, cluster_config = rayservice()
    local_config = yaml.safe_load((REPO_ROOT / "scripts" / "ray-serve.yaml").read_text())
    assert local_config["http_options"]["host"] == "127.0.0.1"  # loopback on a workstation
    assert local_config["http_options"]["request_timeout_s"] == cluster_config["http_options"]["request_timeout_s"]
    [local_app], [cluster_app] = local_config["applications"], cluster_config["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert local_app[key] == cluster_app[key], key
    assert local_app["args"]["model_name"] == cluster_app["args"]["model_name"]
    assert Path(local_app["args"]["source"]).name == Path(cluster_app["args"]["source"]).name


def test_no_request_outlives_the_proxys_timeout_on_either_config():
    _, cluster_config = rayservice()
    local_config = yaml.safe_load((REPO_ROOT / "scripts" / "ray-serve.yaml").read_text())
    for config in (cluster_config, local_config):  # generation's own bound, then the proxy's, never none
        assert config["http_options"]["request_timeout_s"] > Limits().request_timeout_s


def test_every_ray_node_caps_bodies_in_serves_proxy_as_the_local_script_does():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    from devtools.harness.ray_cluster import PROXY_MIDDLEWARES

    manifest, _ = rayservice()
    for container in ray_containers(manifest):  # Serve may run a proxy on every node
        env = {entry["name"]: entry["value"] for entry in container.get("env", [])}
        assert env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == PROXY_MIDDLEWARES, container["name"]
    assert f"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH={PROXY_MIDDLEWARES}" in (REPO_ROOT / "scripts" / "serve_ray.sh").read_text()
    module, name = PROXY_MIDDLEWARES.split(":")
    assert validate_http_proxy_callback_return(getattr(__import__(module, fromlist=[name]), name)())  # as Serve checks it
