"""MLflow records of a CV (SQLite, no Ray): fold runs with curves, CV scores against the prior, tables, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from lumbar_ray.config import Config
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.metrics import labels_to_submission, score_arrays
from lumbar_ray.tracking import Tracker
from lumbar_ray.train import report


@pytest.fixture
def tracker(tmp_path: Path, request, monkeypatch) -> Tracker:
    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({"workdir": str(tmp_path / "work"), "tracking": {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": request.node.name}})  # fmt: skip
    return Tracker.from_config(cfg)


def test_fold_runs_are_children_reused_on_rerun(tracker: Tracker) -> None:
    parent = tracker.parent_run("cv-test", kind="cv")
    child0, child1 = report.fold_run(tracker, parent, 0), report.fold_run(tracker, parent, 1)
    assert child0 != child1 and report.fold_run(tracker, parent, 0) == child0
    run = tracker.client.get_run(child1)
    assert run.data.tags["lumbar_ray.fold"] == "1" and run.info.run_name == "fold1"


def test_finish_fold(tracker: Tracker) -> None:
    child = report.fold_run(tracker, tracker.parent_run("cv-test", kind="cv"), 2)
    history = [{"epoch": e, "train_loss": 1.0 - e / 10, "val_loss": 0.9, "val_score": 0.8 - e / 20} for e in range(3)]
    report.finish_fold(tracker, child, 0.7, 2, history)
    run = tracker.client.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_score"] == pytest.approx(0.7)
    assert run.data.metrics["best_epoch"] == 2
    assert [a.path for a in tracker.client.list_artifacts(child, "plots")] == ["plots/training_curves.png"]


def _scored(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(n, 25))
    labels[rng.random(labels.shape) < 0.05] = IGNORE_INDEX
    probs = rng.dirichlet([2.0, 1.0, 1.0], size=(n, 25))
    prior = np.broadcast_to(np.array([0.6, 0.3, 0.1]), probs.shape)
    folds = pd.DataFrame({"study_id": np.arange(1000, 1000 + n), "fold": np.arange(n) % 3})
    return labels, probs, prior, folds


def test_log_cv_metrics_and_artifacts(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.parent_run("cv-test", kind="cv")
    labels, probs, prior, folds = _scored()
    oof = labels_to_submission(folds["study_id"].to_numpy(), probs)
    skipped = pd.DataFrame({"study_id": [1000], "series_id": [5], "instance_number": [3], "reason": ["no slice"]})
    flat = np.broadcast_to(np.array([1 / 3, 1 / 3, 1 / 3]), probs.shape)
    scores = {"best epoch": score_arrays(labels, probs), "last epoch": score_arrays(labels, flat),
              "prior": score_arrays(labels, prior)}  # fmt: skip
    report.log_cv(tracker, parent, scores, {"oof.csv": oof, "folds.csv": folds, "skipped_points.csv": skipped},
                  labels, probs)  # fmt: skip
    client = MlflowClient(tracker.uri)
    metrics = client.get_run(parent).data.metrics
    assert metrics["cv_total"] == pytest.approx(scores["best epoch"].total)
    assert metrics["cv_any_severe_spinal"] == pytest.approx(scores["best epoch"].any_severe_spinal)
    assert metrics["prior_total"] == pytest.approx(scores["prior"].total) != pytest.approx(metrics["cv_total"])
    assert metrics["cv_last_epoch_total"] == pytest.approx(scores["last epoch"].total)
    assert not any(name.startswith("floor_") for name in metrics)  # no floor given, none logged
    assert metrics["cv_studies"] == 30
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"oof.csv", "folds.csv", "skipped_points.csv", "plots"} <= names
    pngs = {a.path for a in client.list_artifacts(parent, "plots")}
    assert pngs == {"plots/confusion_matrices.png", "plots/level_scores.png", "plots/reliability.png"}
    assert "calibration.csv" in names
    assert {f"ece_{group}" for group in ("spinal", "foraminal", "subarticular")} <= set(metrics)
    assert 0 < metrics["ece_spinal"] < 1
    logged = pd.read_csv(client.download_artifacts(parent, "oof.csv", str(tmp_path)))
    pd.testing.assert_frame_equal(logged, oof, check_exact=False, rtol=1e-12)
    assert Path(client.download_artifacts(parent, "plots/level_scores.png", str(tmp_path))).read_bytes()[:4] == (
        b"\x89PNG"
    )


def test_log_cv_leaves_out_empty_tables(tracker: Tracker) -> None:
    parent = tracker.parent_run("cv-clean", kind="cv")
    labels, probs, prior, folds = _scored(seed=1)
    scores = {"best epoch": score_arrays(labels, probs), "prior": score_arrays(labels, prior)}
    report.log_cv(tracker, parent, scores, {"folds.csv": folds, "skipped_points.csv": pd.DataFrame()}, labels, probs)
    assert "skipped_points.csv" not in {a.path for a in tracker.client.list_artifacts(parent)}
