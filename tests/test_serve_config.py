"""The Serve config files: what ``lumbar-ray serve --write-config`` writes and ``deploy/serve.yaml`` validate
against Ray Serve's own deploy schema and against the project's ``serve`` section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from lumbar_ray.config import Config, ServeConfig
from lumbar_ray.serve import deployment_options, serve_config

REPO = Path(__file__).resolve().parents[1]


def _check(config: dict) -> None:
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "lumbar_ray.serve:build_app"
    args = dict(app["args"])
    assert args.pop("tracking_uri")
    ServeConfig(**args)  # strict: an unknown key fails


def test_the_written_serve_config_is_a_valid_serve_deploy_file(tmp_path):
    cfg = Config.model_validate({"workdir": str(tmp_path), "serve": {"port": 8123, "max_batch_size": 8}})
    config = serve_config(cfg)
    _check(config)
    assert config["http_options"]["port"] == 8123 and config["applications"][0]["args"]["max_batch_size"] == 8


def test_the_cluster_serve_config_is_valid_and_asks_for_gpu_replicas_that_autoscale():
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    _check(config)
    args = ServeConfig(**{k: v for k, v in config["applications"][0]["args"].items() if k != "tracking_uri"})
    options = deployment_options(args)
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["autoscaling_config"]["max_replicas"] >= 2
    assert "num_replicas" not in options


@pytest.mark.parametrize("update", [{"num_replicas": 3}, {"autoscaling": None}])
def test_a_fixed_replica_count_without_autoscaling(update):
    options = deployment_options(ServeConfig(**update))
    assert options["num_replicas"] == update.get("num_replicas", 1) and "autoscaling_config" not in options
