"""The YOLO level detectors: training finds the points, MLflow gets ultralytics' metrics, Ray trains and resumes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import yaml

from lumbar_ray.config import LocalizeConfig
from lumbar_ray.localize import detector as det
from lumbar_ray.localize.detector import SagittalDetector, fit_detectors, slab_centre, train_detector
from lumbar_ray.localize.yolo_data import detector_targets, export_yolo_dataset

T2, T1 = "Sagittal T2/STIR", "Sagittal T1"
# Small and short: a test trains in seconds on two CPUs (the quickstart defaults train for about a minute).
TINY = LocalizeConfig(width=0.0625, imgsz=64, epochs=1, batch=16, num_cpus=1)


@pytest.fixture(scope="module")
def cached(sagittal_cached):
    return sagittal_cached


def _export(cached, description, out):
    cache, points, folds = cached
    export = export_yolo_dataset(points, cache, description, folds, val_fold=0, out=out)
    det.add_background(points, cache, description, export.dataset_yaml, det.BACKGROUND_OFFSET[description])
    return export.dataset_yaml


@pytest.fixture(scope="module")
def t2_detector(cached, tmp_path_factory):
    """A Sagittal T2 detector trained long enough to place the points of the (easy) synthetic spines."""
    out = tmp_path_factory.mktemp("t2_detector")
    cfg = LocalizeConfig(width=0.125, imgsz=96, epochs=30, batch=4, lr0=0.003, num_cpus=2)
    weights = train_detector(_export(cached, T2, out / "dataset"), T2, cfg, out / "model")
    return SagittalDetector(weights, T2, cfg, device="cpu")


def test_trained_detector_finds_the_validation_points(cached, t2_detector):
    # A test-sized detector (27 training slices, seconds of CPU) finds where the canal is, on the right slices;
    # telling its five levels apart takes the quickstart's data and schedule (see the module's report).
    cache, points, folds = cached
    val = set(folds.loc[folds["fold"] == 0, "study_id"].astype(int))
    expected = points[points["target"].isin(detector_targets(T2)) & points["study_id"].isin(val)]
    hits = []
    for (study_id, series_id), group in expected.groupby(["study_id", "series_id"]):
        found = t2_detector.detect(cache.read(int(study_id), int(series_id)).volume)
        for row in group.itertuples():
            near = found[(found["slice"] - row.slice).abs() <= 1]
            hits.append(bool((np.hypot(near["x"] - row.x, near["y"] - row.y) <= 4).any()))
    assert len(hits) >= 40
    assert np.mean(hits) >= 0.9  # 4 px of 96 = 10 px of the quickstart's 256


def test_detect_reports_cache_pixels_on_every_slice(cached, t2_detector):
    cache, points, _ = cached
    study_id, series_id = points.loc[points["target"] == 0, ["study_id", "series_id"]].iloc[0]
    volume = cache.read(int(study_id), int(series_id)).volume
    found = t2_detector.detect(volume)
    assert list(found.columns) == ["target", "slice", "x", "y", "confidence"]
    assert set(found["target"]) <= set(detector_targets(T2))
    assert found["slice"].between(0, len(volume) - 1).all()
    assert found["x"].between(-0.5, 95.5).all() and found["y"].between(-0.5, 95.5).all()
    assert (found["confidence"] >= t2_detector.cfg.conf).all()


def test_slab_centre_is_the_middle_of_the_run_around_the_peak():
    # The canal seen on slices 5..9 at about the same confidence, a weak stray on 12 (not adjacent to the run).
    detections = pd.DataFrame(
        {
            "target": 0,
            "slice": [5, 6, 7, 7, 8, 9, 12],
            "x": [50.0, 50.0, 50.0, 10.0, 50.0, 50.0, 80.0],
            "y": [40.0] * 7,
            "confidence": [0.8, 0.82, 0.8, 0.2, 0.81, 0.8, 0.3],
        }
    )
    centre = slab_centre(detections)
    assert centre["slice"] == pytest.approx(7.0, abs=0.02)
    assert centre["x"] == pytest.approx(50.0) and centre["confidence"] == pytest.approx(0.82)
    assert slab_centre(detections.assign(confidence=[0.1, 0.1, 0.9, 0.2, 0.2, 0.1, 0.3]))["slice"] == 7.0


def _stub(description: str, detections: pd.DataFrame) -> SagittalDetector:
    """A detector whose raw detections are given (no model): locate's resolution alone."""
    stub = SagittalDetector.__new__(SagittalDetector)
    stub.description, stub.targets = description, detector_targets(description)
    stub.groups = det._side_groups(description)
    stub.detect = lambda volume, left_first=True: detections
    return stub


def test_locate_gives_one_row_per_target_and_fills_a_removed_level():
    left = detector_targets(T1)[:5]
    # Left foramina on slice 3 at y = 10, 20, (level 2 removed), 40, 50; no right-side detection at all.
    detections = pd.DataFrame(
        {
            "target": [left[0], left[1], left[3], left[4]],
            "slice": [3, 3, 3, 3],
            "x": [30.0] * 4,
            "y": [10.0, 20.0, 40.0, 50.0],
            "confidence": [0.9, 0.8, 0.7, 0.9],
        }
    )
    located = _stub(T1, detections).locate(np.zeros((12, 64, 64), np.uint8))
    assert located["target"].tolist() == detector_targets(T1)
    assert list(located.columns) == ["target", "slice", "x", "y", "confidence", "filled"]
    by_target = located.set_index("target")
    assert by_target.loc[left[2], "filled"] and by_target.loc[left[2], "confidence"] == 0
    assert by_target.loc[left[2], ["x", "y", "slice"]].tolist() == [30.0, 30.0, 3]
    assert not by_target.loc[[left[0], left[1], left[3], left[4]], "filled"].any()
    right = located[located["target"].isin(detector_targets(T1)[5:])]
    assert right["filled"].all() and right["x"].isna().all() and (right["confidence"] == 0).all()


def test_t1_side_comes_from_the_volume_half():
    stub = _stub(T1, pd.DataFrame())
    left, right = stub.groups
    assert stub._target(2, 1, 11, left_first=True) == left[2]
    assert stub._target(7, 1, 11, left_first=True) == left[2]  # a 10-class model's "right" on the left half
    assert stub._target(2, 9, 11, left_first=True) == right[2]
    assert stub._target(2, 9, 11, left_first=False) == left[2]
    assert stub._target(2, 5, 11, left_first=True) is None  # the centre slice has no side
    assert det.left_first({"stacks": [{"normal": [-1.0, 0.0, 0.0]}]})
    assert not det.left_first({"stacks": [{"normal": [1.0, 0.0, 0.0]}]})


def test_merge_sides_makes_t1_classes_per_level(cached, tmp_path):
    dataset_yaml = _export(cached, T1, tmp_path / "t1")
    det.merge_sides(dataset_yaml)
    det.merge_sides(dataset_yaml)  # idempotent
    assert len(yaml.safe_load(dataset_yaml.read_text())["names"]) == 5
    classes = {int(line.split()[0]) for f in (tmp_path / "t1" / "labels").rglob("*.txt") for line in f.open()}
    assert classes == set(range(5))


def test_mlflow_metrics_of_ultralytics_land_in_our_run(cached, tmp_path, monkeypatch):
    # The name matters: ultralytics' MLflow callback only runs under pytest in tests named test_mlflow*.
    from mlflow import MlflowClient
    from ultralytics.utils import SETTINGS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings_before = dict(SETTINGS)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("detectors", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    dataset_yaml = _export(cached, T2, tmp_path / "out" / "dataset")

    weights = train_detector(dataset_yaml, T2, TINY, tmp_path / "out" / "model", uri, run_id)

    assert weights == tmp_path / "out" / "model" / "detector.pt" and weights.is_file()
    run = client.get_run(run_id)
    assert "metrics/mAP50B" in run.data.metrics and "train/box_loss" in run.data.metrics
    assert run.data.params["epochs"] == "1"
    assert run.info.status == "RUNNING"  # ultralytics did not end our run
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    assert {e.name for e in client.search_experiments()} == {"detectors", "Default"}  # no experiment "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # no mlflow.db, mlruns, runs/ in cwd
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    assert dict(SETTINGS) == settings_before


def test_fit_detectors_trains_both_on_ray_then_resumes(cached, ray_local, tmp_path):
    from mlflow import MlflowClient

    cache, points, folds = cached
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cv", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id

    weights = fit_detectors(points, cache, folds, TINY, tmp_path / "detectors", uri, parent)

    assert list(weights) == [T2, T1] and all(path.is_file() for path in weights.values())
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags[det.DETECTOR_TAG] for r in children) == ["sagittal_t1", "sagittal_t2_stir"]
    assert {r.info.status for r in children} == {"FINISHED"}
    stamps = {description: path.stat().st_mtime_ns for description, path in weights.items()}

    again = fit_detectors(points, cache, folds, TINY, tmp_path / "detectors", uri, parent)

    assert again == weights and {d: p.stat().st_mtime_ns for d, p in again.items()} == stamps
    assert len(client.search_runs([experiment])) == 3  # no new child run either
    study_id, series_id = points.loc[points["target"] == detector_targets(T1)[0], ["study_id", "series_id"]].iloc[0]
    located = SagittalDetector(weights[T1], T1, TINY).locate(cache.read(int(study_id), int(series_id)).volume)
    assert located["target"].tolist() == detector_targets(T1)  # a 1-epoch model: rows, not accuracy
