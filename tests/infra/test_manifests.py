"""The infra files parse, and every entrypoint, module, script, config file, extra and image they name exists.

Names checked: the images dml-pipeline:latest / dml-pipeline:cuda (built by infra/Dockerfile and
infra/Dockerfile.cuda), configs/fashion_mnist.yaml with each file's overrides, the `dml` command
(`flows.cli:app`), `flows/retrain.py:retrain_flow`, `tasks.prefect_server`, infra/ray-head.sh,
infra/ray-worker.sh, infra/ray-env.sh, infra/prefect-server.sh, infra/seaweedfs.py, the `cpu` and `gpu` extras."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml

from dml_core.config import load_config, parse_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFRA = os.path.join(REPO, "infra")
IMAGE_ROOT = "/app/"  # WORKDIR of both images: the repository's layout


def _yaml(*path: str) -> list[dict]:
    with open(os.path.join(INFRA, *path)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _repo_path(path: str) -> str:
    """A path in the image (/app/...) as the repository file it was copied from."""
    assert path.startswith(IMAGE_ROOT), f"{path} is not under the image's {IMAGE_ROOT}"
    return os.path.join(REPO, path[len(IMAGE_ROOT):])


def _check_config(path: str, overrides: list[str]) -> None:
    """The config file exists and loads with these overrides (so each overridden field exists and is valid)."""
    load_config(_repo_path(path), parse_overrides(overrides))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _built_images() -> dict[str, str]:
    """image tag -> the Dockerfile whose header says it builds it (`docker build -f infra/X -t TAG .`)."""
    images = {}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = open(os.path.join(INFRA, name)).read()
        images.update({tag: name for tag in re.findall(rf"-f infra/{re.escape(name)} -t (\S+)", text)})
    return images


def _containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("path", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_run_nodes_from_our_images_with_the_node_settings(path):
    (manifest,) = _yaml("k8s", path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path]
    images = _built_images()
    containers = _containers(manifest)
    assert len(containers) >= 2
    for c in containers:
        assert c["image"] in images, f"{path}: {c['image']} is built by no Dockerfile in infra/ ({images})"
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["RAY_worker_niceness"] == "0" and env["RAY_preload_python_modules"] == "torch"


def test_rayjob_runs_dml_on_a_config_of_the_image():
    (job,) = _yaml("k8s", "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dml", "run"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert overrides and len(argv) == 3 + 2 * len(overrides)
    _check_config(argv[2], overrides)  # `dml` itself: test_the_flow_and_the_command_the_manifests_name_exist


def test_prefect_yaml_deploys_the_retrain_flow_on_a_valid_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    (project,) = _yaml("prefect.yaml")
    workdir = project["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir + "/" == IMAGE_ROOT
    (deployment,) = project["deployments"]
    assert deployment["entrypoint"] == "flows/retrain.py:retrain_flow"
    params = deployment["parameters"]
    _check_config(params["config"], params["overrides"])
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))


# The flow and the command that infra/prefect.yaml and infra/k8s/rayjob.yaml name.
@pytest.mark.parametrize("module, attr, params", [
    ("flows.retrain", "retrain_flow", {"config", "overrides"}),
    ("flows.cli", "app", None),
])
def test_the_flow_and_the_command_the_manifests_name_exist(module, attr, params):
    target = getattr(importlib.import_module(module), attr)
    if module == "flows.cli":  # the `dml` command of infra/k8s/rayjob.yaml
        assert _pyproject()["project"]["scripts"]["dml"] == f"{module}:{attr}"
    if params is not None:  # the prefect.yaml deployment's parameters are the flow's
        from prefect import Flow

        assert isinstance(target, Flow)
        assert params <= set(inspect.signature(target.fn).parameters)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_install_real_extras(name):
    text = open(os.path.join(INFRA, name)).read()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert os.path.exists(os.path.join(REPO, src)), f"{name}: COPY {src}: no such file in the repository"
    assert "WORKDIR /app" in text.splitlines()
    extras = re.findall(r'-e "\.\[([\w,]+)\]"', text)
    assert extras == [{"Dockerfile": "cpu", "Dockerfile.cuda": "gpu"}[name]]
    assert set(extras[0].split(",")) <= set(_pyproject()["project"]["optional-dependencies"])
    assert "-c constraints.txt" in text or "constraints-gpu.txt" in text


def test_node_scripts_set_the_node_environment():
    for script in ("ray-env.sh", "ray-head.sh", "ray-worker.sh", "prefect-server.sh"):
        subprocess.run(["bash", "-n", os.path.join(INFRA, script)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(["bash", "-c", f"source {INFRA}/ray-env.sh && env"], env={**env, "RAY_BIN": "/bin/true"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert {"RAY_worker_niceness=0", "RAY_preload_python_modules=torch"} <= set(out)
    usage = subprocess.run(["bash", os.path.join(INFRA, "ray-worker.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    assert callable(importlib.import_module("tasks.prefect_server").main)  # what prefect-server.sh runs
    assert os.path.exists(os.path.join(INFRA, "seaweedfs.py"))


def test_infra_readme_documents_every_file():
    readme = open(os.path.join(INFRA, "README.md")).read()
    files = [os.path.relpath(os.path.join(d, f), INFRA) for d, _, fs in os.walk(INFRA) for f in fs
             if "__pycache__" not in d and f != "README.md"]
    assert [f for f in files if f not in readme] == []
