"""End to end on the real Ray Tune, Optuna, Ray Train and MLflow: a tuning driver killed after its first
trial, then ``lumbar-ray tune --resume``: exactly ``num_samples`` trials, the finished one kept, not retrained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lumbar_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = [
    "synth.train_studies=20", "synth.test_studies=1", "synth.image_sizes=[96]", "synth.seed=5",
    "preprocess.image_size=96", "preprocess.workers=1", "cv.n_folds=2", "crop.size=16", "crop.region=24",
    "crop.slices=3", "train.epochs=1", "train.num_workers=1", "train.batch_size=4", "tune.name=resume-test",
    "tune.num_samples=2", "tune.max_concurrent_trials=1", "tune.folds=[0]",  # one fold a trial: the resume is the point
]  # fmt: skip


def finished_trials(experiment: Path) -> list[dict]:
    """Last results of the trials that reported their out-of-fold score (their last fold) so far."""
    done = []
    for path in experiment.glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and "oof_score" in lines[-1]:
            done.append(lines[-1])
    return done


def test_killed_tuning_driver_resumes_to_exactly_num_samples(tmp_path):
    args = [*SMALL, f"workdir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    command = [sys.executable, "-m", "lumbar_ray", "tune", *args]
    env = os.environ | {"TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    experiment = tmp_path / "ray_tune" / "resume-test"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while not finished_trials(experiment) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        first = finished_trials(experiment)
        assert first, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(3)  # let the driver persist the experiment state once more, as it does every second
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: a crashed machine
        driver.wait()
    first_trial = first[0]
    run_dir = tmp_path / "runs" / first_trial["run_id"]
    stamps = {path.name: path.stat().st_mtime_ns for path in run_dir.glob("fold*.pt")}
    assert len(stamps) == 1  # the finished trial's fold

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tuning 'resume-test': 2 trials" in resumed.stdout

    trials = pd.read_csv(tmp_path / "tune" / "resume-test" / "trials.csv")
    assert len(trials) == 2 and trials["trial_id"].is_unique  # none lost, none duplicated
    kept = trials.set_index("trial_id").loc[first_trial["trial_id"]]
    assert kept["cv_score"] == pytest.approx(first_trial["cv_score"])
    assert {path.name: path.stat().st_mtime_ns for path in run_dir.glob("fold*.pt")} == stamps  # not retrained

    best = load_config(tmp_path / "tune" / "resume-test" / "best.yaml")  # `lumbar-ray train --config` takes it
    assert best.tracking.register_model and best.train.folds is None

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("lumbar_ray").experiment_id
    runs = client.search_runs([experiment_id])
    tune_runs = [r for r in runs if r.data.tags.get("lumbar_ray.kind") == "tune"]
    assert len(tune_runs) == 1  # the resumed driver found its tuning run again
    parent = tune_runs[0]
    assert parent.data.metrics["trials"] == 2 and "best_cv_score" in parent.data.metrics
    assert "space.loss.any_severe_weight" in parent.data.params
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/score_by_trial.png" in plots
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:
        assert "loss.any_severe_weight" in child.data.params and "lumbar_ray.trial" in child.data.tags
        assert client.get_metric_history(child.info.run_id, "running_cv_score")
