"""``ray job submit`` of the jobs/ entrypoints against a real local Ray head on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from lumbar_ray.config import PreprocessConfig, SynthConfig, cache_settings
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.metrics import validate_submission
from tests.net import RAY, free_port, ray_node_command, start_process, stop_process, wait_for_http

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """A Ray head on loopback (:func:`tests.net.ray_node_command`), with its dashboard for ``ray job submit``."""
    tmp_path = tmp_path_factory.mktemp("head")
    dashboard = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="rayhead_", dir="/tmp")
    command = ray_node_command(temp_dir, "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
                               "--dashboard-port", str(dashboard))  # fmt: skip
    head = start_process(command, tmp_path / "head.log", env)
    address = f"http://127.0.0.1:{dashboard}"
    json.loads(wait_for_http(f"{address}/api/version", head, tmp_path / "head.log", "local Ray head"))
    yield address, env
    stop_process(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _agent_log_tail() -> str:
    """The newest dashboard agent log of any test head, for the failure message."""
    logs = sorted(Path("/tmp").glob("rayhead_*/session_latest/logs/dashboard_agent.log"), key=os.path.getmtime)
    return "\n--- dashboard_agent.log ---\n" + logs[-1].read_text()[-3000:] if logs else ""


def _submit(address: str, env: dict, job: list[str]) -> subprocess.CompletedProcess:
    command = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "lumbar_ray_work"]}),
        "--", sys.executable, *job,  # this interpreter: the head's PATH need not lead to it
    ]  # fmt: skip
    for _ in range(10):  # the dashboard answers before the node's job agent registers: retry only that
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in result.stderr + result.stdout:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + _agent_log_tail()
    assert "succeeded" in result.stdout
    return result


@pytest.mark.ray
@pytest.mark.slow
def test_preprocess_job_submitted_to_a_local_head(local_head, tmp_path):
    address, env = local_head
    root = write_dataset(tmp_path / "rsna", SynthConfig(train_studies=3, test_studies=1, image_sizes=[96])).root
    job = ["jobs/preprocess.py", "--data", str(root), "--cache", str(tmp_path / "cache"), "--workers", "1",
           "preprocess.image_size=64"]  # fmt: skip
    _submit(address, env, job)
    data = load_rsna(root)
    manifest = SeriesCache(tmp_path / "cache", cache_settings(PreprocessConfig(image_size=64))).read_manifest()
    assert len(manifest) == len(data.train_series) + len(data.test_series)
    assert set(manifest["split"]) == {"train", "test"}


@pytest.mark.ray
@pytest.mark.slow
def test_predict_job_submitted_to_a_local_head(local_head, trained_pipeline, tmp_path):
    address, env = local_head
    cfg, result = trained_pipeline
    out = tmp_path / "job" / "submission.csv"
    job = ["jobs/predict.py", "--model", "models:/pipeline_ensemble@champion", "--out", str(out),
           f"workdir={cfg.workdir}", f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]  # fmt: skip
    completed = _submit(address, env, job)
    test_ids = sorted(load_rsna(result.data_root).test_series["study_id"].unique())
    submission = validate_submission(pd.read_csv(out), study_ids=test_ids)
    assert len(submission) == 25 * len(test_ids) and "submission:" in completed.stdout
    assert sorted(int(p.stem) for p in (out.parent / "points").glob("*.json")) == test_ids
