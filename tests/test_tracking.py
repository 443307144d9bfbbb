"""MLflow tracking of a CV: runs found again on rerun, fold children, epoch metrics, CV artifacts (SQLite, no Ray)."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lumbar_ray.config import Config, load_config
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.metrics import labels_to_submission, score_arrays
from lumbar_ray.tracking import RunLogger, Tracker, flatten_config, resolve_tracking_uri
from lumbar_ray.train.cv import CVResult, FoldOutcome


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating one costs a second of migrations); one experiment per test."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def cfg(tmp_path: Path, store: Path, request) -> Config:
    return Config.model_validate({
        "workdir": str(tmp_path / "work"),
        "crop": {"size": 32, "slices": 3},
        "train": {"run_id": "cv-test"},
        "tracking": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "experiment": request.node.name},
    })  # fmt: skip


@pytest.fixture
def tracker(cfg: Config, tmp_path: Path, monkeypatch) -> Tracker:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must land beside the database, not in the working directory
    return Tracker(cfg)


def _client(tracker: Tracker) -> MlflowClient:
    return MlflowClient(tracking_uri=tracker.uri)


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(workdir=str(tmp_path / "new" / "work"))
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'new' / 'work').resolve()}/mlflow.db"
    assert (tmp_path / "new" / "work").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    cfg.tracking.tracking_uri = "sqlite:///x.db"
    assert resolve_tracking_uri(cfg) == "sqlite:///x.db"


def test_parent_run_is_found_again_and_holds_the_config(
    tracker: Tracker, cfg: Config, tmp_path: Path, store: Path
) -> None:
    before = mlflow.get_tracking_uri()
    parent = tracker.parent_run("cv-test")
    tracker.finish(parent)
    client = _client(tracker)
    assert client.get_run(parent).info.status == "FINISHED"

    again = Tracker(cfg).parent_run("cv-test")  # a rerun of the same CV, e.g. after an interruption
    assert again == parent
    assert client.get_run(parent).info.status == "RUNNING"
    assert Tracker(cfg).parent_run("cv-other") != parent
    assert mlflow.get_tracking_uri() == before  # no global MLflow state was touched

    run = client.get_run(parent)
    assert run.data.tags["lumbar_ray.run_id"] == "cv-test"
    assert run.data.tags["lumbar_ray.version"]
    assert run.data.params["crop.size"] == "32"
    assert run.data.params["model.encoder"] == "null"
    assert run.data.params["synth.image_sizes"] == "[128, 144, 160]"
    assert run.data.params == flatten_config(cfg)
    config_yaml = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path)))
    assert load_config(config_yaml) == cfg
    assert (store / "mlartifacts").is_dir() and not (tmp_path / "cwd" / "mlartifacts").exists()


def test_params_can_be_replayed_as_overrides(cfg: Config) -> None:
    overrides = [f"{key}={value}" for key, value in flatten_config(cfg).items() if key != "workdir"]
    replayed = load_config(overrides=[*overrides, f"workdir={cfg.workdir}"])
    assert replayed == cfg


def test_fold_runs_are_children_and_reused(tracker: Tracker) -> None:
    parent = tracker.parent_run("cv-test")
    child0, child1 = tracker.fold_run(parent, 0), tracker.fold_run(parent, 1)
    assert child0 != child1
    assert tracker.fold_run(parent, 0) == child0
    other_parent = tracker.parent_run("cv-other")
    assert tracker.fold_run(other_parent, 0) not in (child0, child1)
    run = _client(tracker).get_run(child1)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["lumbar_ray.fold"] == "1"
    assert run.info.run_name == "fold1"


def test_run_logger_logs_steps_and_pickles(tracker: Tracker) -> None:
    child = tracker.fold_run(tracker.parent_run("cv-test"), 0)
    run_logger = pickle.loads(pickle.dumps(RunLogger(tracker.uri, child)))
    run_logger.log_epoch(0, {"train_loss": 1.5, "val_score": 0.9, "note": "ignored"})
    run_logger.log_epoch(1, {"train_loss": 1.0, "val_score": 0.7})
    assert len(pickle.dumps(run_logger)) < 500  # the client is not shipped once created
    history = _client(tracker).get_metric_history(child, "val_score")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.7)]
    assert "note" not in _client(tracker).get_run(child).data.metrics


def test_finish_fold(tracker: Tracker) -> None:
    child = tracker.fold_run(tracker.parent_run("cv-test"), 2)
    history = [{"epoch": e, "train_loss": 1.0 - e / 10, "val_loss": 0.9, "val_score": 0.8 - e / 20} for e in range(3)]
    outcome = FoldOutcome(2, 0.7, 2, np.arange(3), np.full((3, 25, 3), 1 / 3), history, {"w": torch.zeros(1)})
    tracker.finish_fold(child, outcome)
    client = _client(tracker)
    run = client.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_score"] == pytest.approx(0.7)
    assert run.data.metrics["best_epoch"] == 2
    assert [a.path for a in client.list_artifacts(child, "plots")] == ["plots/training_curves.png"]


def _cv_result(n: int = 30, seed: int = 0) -> tuple[CVResult, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(n, 25))
    labels[rng.random(labels.shape) < 0.05] = IGNORE_INDEX
    probs = rng.dirichlet([2.0, 1.0, 1.0], size=(n, 25))
    prior = np.broadcast_to(np.array([0.6, 0.3, 0.1]), probs.shape)
    study_ids = np.arange(1000, 1000 + n)
    folds = pd.DataFrame({"study_id": study_ids, "fold": np.arange(n) % 3})
    result = CVResult(
        "cv-test", score_arrays(labels, probs), score_arrays(labels, prior), labels_to_submission(study_ids, probs),
        folds, {0: None, 1: None, 2: None}, [0, 1, 2], [],
    )  # fmt: skip
    return result, labels, probs


def test_log_cv_metrics_and_artifacts(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.parent_run("cv-test")
    result, labels, probs = _cv_result()
    skipped = pd.DataFrame({"study_id": [1000], "series_id": [5], "instance_number": [3], "reason": ["no slice"]})
    tracker.log_cv(parent, result, labels, probs, skipped)
    tracker.finish(parent)
    client = _client(tracker)
    metrics = client.get_run(parent).data.metrics
    assert metrics["cv_total"] == pytest.approx(result.score.total)
    assert metrics["cv_any_severe_spinal"] == pytest.approx(result.score.any_severe_spinal)
    assert metrics["prior_total"] == pytest.approx(result.baseline.total)
    assert metrics["prior_total"] != pytest.approx(metrics["cv_total"])
    assert metrics["cv_studies"] == 30
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"oof.csv", "folds.csv", "skipped_points.csv", "config.yaml", "plots"} <= names
    pngs = {a.path for a in client.list_artifacts(parent, "plots")}
    assert pngs == {"plots/confusion_matrices.png", "plots/level_scores.png"}
    oof = pd.read_csv(client.download_artifacts(parent, "oof.csv", str(tmp_path)))
    pd.testing.assert_frame_equal(oof, result.oof, check_exact=False, rtol=1e-12)
    assert Path(client.download_artifacts(parent, "plots/level_scores.png", str(tmp_path))).read_bytes()[:4] == (
        b"\x89PNG"
    )


def test_log_cv_without_skipped_points(tracker: Tracker) -> None:
    parent = tracker.parent_run("cv-clean")
    result, labels, probs = _cv_result(seed=1)
    tracker.log_cv(parent, result, labels, probs, pd.DataFrame())
    assert "skipped_points.csv" not in {a.path for a in _client(tracker).list_artifacts(parent)}
