"""The pipeline on a two-node Ray cluster where the second node cannot see the driver's files.

A head (the driver's node) and a second node started in its own mount namespace with a tmpfs over the driver's
workdir: whatever the driver writes there is invisible to the second node, and whatever the second node writes
there never reaches the driver, as on two machines. The second node carries the custom resource ``node_b`` that the
detector trainings and the training workers ask for (``localize.resources``, ``train.resources``), so they run
there, two at a time. Shared storage is a folder outside the workdir (``$LUMBAR_RAY_STORAGE``, as a shared mount
would be; the cache is given as its ``file://`` URI, as an ``s3://`` one would be, so the training workers read
their node's copy of it), MLflow an ``mlflow server`` on loopback: localise, train two folds at once, register and
predict must pass every input and output through them or the object store. (Preprocessing and prediction actors,
and the folds' zero-CPU driver tasks, may run on either node.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lumbar_ray.config import SynthConfig
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.metrics import validate_submission
from lumbar_ray.registry import read_contract
from tests.net import free_port, ray_node_command, start_process, stop_process, wait_for_http

LUMBAR_RAY = str(Path(sys.executable).parent / "lumbar-ray")
MODEL = "models:/cluster_ensemble@champion"


def _can_hide_folders() -> bool:
    """Whether this process may start a node in its own mount namespace (root and ``unshare``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.skipif(not _can_hide_folders(), reason="needs root and unshare --mount to hide the driver's files"),
]


def _config(root: Path, shared: Path, tracking_uri: str) -> Path:
    """The CI-sized pipeline with the detectors and the training workers kept on the second node."""
    cfg = {
        "workdir": str(root / "driver"),
        "data": {"root": str(shared / "rsna")},
        # A URI: the training workers read a node-local copy of it (data/cache.copy_to_node).
        "preprocess": {"image_size": 64, "workers": 1, "cache": f"file://{shared / 'cache'}"},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "augment": {"jitter_measured": False},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 1, "parallel_folds": 2, "resources": {"node_b": 1}},
        "localize": {"imgsz": 64, "epochs": 1, "batch": 4, "width": 0.25, "num_cpus": 1, "box_fraction": 0.15,
                     "resources": {"node_b": 1}},
        "tracking": {"tracking_uri": tracking_uri, "model_name": "cluster_ensemble"},
        "predict": {"model": MODEL},
    }  # fmt: skip
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cluster(tmp_path):
    """A head, a node blind to the workdir, an MLflow server: (driver env, workdir, shared folder, MLflow URI)."""
    shared, workdir = tmp_path / "shared", tmp_path / "driver"
    shared.mkdir()
    workdir.mkdir()
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "LUMBAR_RAY_STORAGE": str(shared)}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = []
    temp_dir = tempfile.mkdtemp(prefix="raymn_", dir="/tmp")  # short: Ray's unix socket paths are length-capped
    try:
        port = free_port()
        server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{shared / 'mlflow.db'}",
                  "--artifacts-destination", str(shared / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"]  # fmt: skip
        mlflow = start_process(server, tmp_path / "mlflow.log", env)
        processes.append(mlflow)
        gcs = f"127.0.0.1:{free_port()}"
        head_command = ray_node_command(temp_dir, "--port", gcs.split(":")[1], "--include-dashboard", "false")
        head = start_process(head_command, tmp_path / "head.log", env)
        processes.append(head)
        node = ray_node_command(temp_dir, head=gcs, resources={"node_b": 2})  # both folds (or detectors) at once
        hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', str(workdir)]  # fmt: skip
        processes.append(start_process(hide + node, tmp_path / "node_b.log", env))
        wait_for_http(f"http://127.0.0.1:{port}/health", mlflow, tmp_path / "mlflow.log", "mlflow server")
        _wait_for_nodes(gcs, env, tmp_path)
        yield env | {"RAY_ADDRESS": gcs}, workdir, shared, f"http://127.0.0.1:{port}"
    finally:
        stop_process(*reversed(processes))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(gcs: str, env: dict[str, str], tmp_path: Path) -> None:
    """Block until both nodes have joined (the second one's resource is visible), or fail with the logs."""
    script = ("import ray, time\nray.init(address='auto', log_to_driver=False)\n"
              "deadline = time.time() + 120\n"
              "while ray.cluster_resources().get('node_b', 0) < 2 and time.time() < deadline: time.sleep(1)\n"
              "print(ray.cluster_resources())\nassert ray.cluster_resources().get('node_b', 0) >= 2\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=env | {"RAY_ADDRESS": gcs}, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    logs = "".join((tmp_path / f"{name}.log").read_text()[-1500:] for name in ("head", "node_b"))
    assert done.returncode == 0, done.stderr[-2000:] + logs


def _run(env: dict[str, str], cwd: Path, *args: str) -> str:
    """A ``lumbar-ray`` command on the cluster from the driver; its output, or the test fails showing it."""
    done = subprocess.run([LUMBAR_RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"lumbar-ray {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_localise_train_register_and_predict_with_nothing_passed_as_a_driver_path(cluster):
    env, workdir, shared, tracking_uri = cluster
    config = _config(workdir.parent, shared, tracking_uri)
    write_dataset(shared / "rsna", SynthConfig(train_studies=24, test_studies=2, image_sizes=[64], seed=2))
    _run(env, workdir, "localize", "--config", str(config))  # preprocesses first, into the shared cache
    _run(env, workdir, "train", "--config", str(config))
    out = workdir / "submission.csv"
    _run(env, workdir, "predict", "--config", str(config), "--out", str(out))

    contract = read_contract(MODEL, tracking_uri)
    assert sorted(contract["localize"]["detectors"]) == ["Sagittal T1", "Sagittal T2/STIR"]
    test_ids = sorted(load_rsna(shared / "rsna").test_series["study_id"].unique())
    submission = validate_submission(pd.read_csv(out), study_ids=test_ids)
    assert len(submission) == 25 * len(test_ids)
    reports = [json.loads((out.parent / "points" / f"{study_id}.json").read_text()) for study_id in test_ids]
    assert [report["study_id"] for report in reports] == test_ids
