"""cluster.yaml (the AWS cluster launcher config) against Ray's own schema and the project's invariants.

Validation is what ``ray up`` does before it contacts AWS: ``prepare_config`` (merge with Ray's AWS defaults) then
``validate_config`` (``ray/autoscaler/ray-schema.json`` plus Ray's cross-field checks). Nothing here calls AWS or
starts Ray.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def prepared(raw) -> dict[str, Any]:
    return prepare_config(copy.deepcopy(raw))


def _validate(config: dict[str, Any]) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _run_options(config: dict[str, Any], node_type: str) -> list[str]:
    """The docker run options a node of this type starts with, merged as Ray merges them."""
    docker = copy.deepcopy(config["docker"])
    if node_type == config["head_node_type"]:
        return docker.get("run_options", []) + docker.get("head_run_options", [])
    docker.update(config["available_node_types"][node_type].get("docker", {}))
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def _inbound_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["provider"].get("security_group", {}).get("IpPermissions", [])


def test_cluster_yaml_validates_with_rays_schema(raw):
    _validate(raw)


def test_unknown_top_level_key_is_rejected(raw):
    raw["not_a_ray_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="not_a_ray_key"):
        _validate(raw)


def test_unknown_node_type_key_is_rejected(raw):
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validate(raw)


def _images(config: dict[str, Any]) -> list[str]:
    """Every image a node can run: the cluster's, the head's and workers' overrides, each node type's."""
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])]
    node_types = config["available_node_types"].values()
    return images + [t.get("docker", {}).get("worker_image", docker["image"]) for t in node_types]


def test_every_node_runs_the_projects_image_at_the_projects_version(raw):
    """The Dockerfile's image (Ray's GPU image plus this project), tagged with the version of pyproject.toml."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = set(_images(raw))
    assert len(images) == 1, images  # one environment on every node
    (image,) = images
    assert re.fullmatch(rf"\S+/lumbar-ray:{re.escape(version)}", image), f"{image}: the project's image, tag {version}"
    assert "rayproject/" not in image and "ray-ml" not in image  # a bare Ray image lacks the project


def test_every_host_logs_in_to_the_images_registry_before_pulling(raw):
    registry = raw["docker"]["image"].split("/")[0]
    assert any("docker login" in c and registry in c for c in raw.get("initialization_commands", []))


def test_every_node_has_file_limits_and_shared_memory(raw):
    for node_type in raw["available_node_types"]:
        options = _run_options(raw, node_type)
        assert "--ulimit nofile=65536:65536" in options, node_type
        assert any(option.startswith("--shm-size=") for option in options), node_type


def test_dashboard_is_bound_to_loopback_only(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_no_inbound_rule_beyond_ssh(raw):
    """Extra rules (provider.security_group.IpPermissions), if any, open SSH only: never 8265 (dashboard, jobs)."""
    for rule in _inbound_rules(raw):
        assert rule.get("IpProtocol") == "tcp", rule  # "-1" would open every port
        assert rule.get("FromPort") == rule.get("ToPort") == 22, rule


def test_the_security_group_ray_creates_opens_only_ssh_from_outside(raw):
    """With no SecurityGroupIds, ``ray up`` creates the group with these rules (computed offline, no AWS call)."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules  # needs boto3 (dev extra)

    assert not any("SecurityGroupIds" in t["node_config"] for t in raw["available_node_types"].values())
    rules = _create_default_inbound_rules({"sg-cluster"}, _inbound_rules(raw))
    from_outside = [rule for rule in rules if rule.get("IpRanges") or rule.get("Ipv6Ranges")]
    assert from_outside
    assert all(rule["IpProtocol"] == "tcp" and rule["FromPort"] == rule["ToPort"] == 22 for rule in from_outside)
    within = [rule for rule in rules if rule not in from_outside]
    assert all(pair == {"GroupId": "sg-cluster"} for rule in within for pair in rule["UserIdGroupPairs"])


def test_worker_counts_are_bounded(raw):
    cluster_max = raw["max_workers"]
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head.get("max_workers", 0) == 0
    workers = _worker_types(raw)
    assert workers
    for name, node_type in workers.items():
        assert "min_workers" in node_type and "max_workers" in node_type, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cluster_max, name


def test_resources_keep_gpu_work_on_gpu_workers(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU", 1) > 0  # job drivers and small tasks run on the head
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in _worker_types(raw).values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types


def test_every_node_gets_s3_access_through_an_instance_profile(raw):
    for name, node_type in raw["available_node_types"].items():
        assert "Arn" in node_type["node_config"].get("IamInstanceProfile", {}), name


def test_no_node_installs_the_project_it_runs_from_the_image(raw, prepared):
    """No per-node `pip install` of the project or its stack (the image has them); no checkout synced to install."""
    assert not raw.get("file_mounts"), raw.get("file_mounts")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in prepared.get(key, []):
            if "pip install" in command:
                assert key == "head_setup_commands" and re.fullmatch(r'pip install "boto3[^"]*"', command), command


def test_every_node_gets_the_shared_storage_root(prepared):
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any("LUMBAR_RAY_STORAGE=s3://" in command for command in commands)
