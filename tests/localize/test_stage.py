"""The localisation stage: detectors trained as Ray tasks under MLflow child runs, the validation fold evaluated,
and a rerun that redoes nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lumbar_ray.config import Config
from lumbar_ray.constants import DETECTED_SERIES_TYPES
from lumbar_ray.localize.stage import (
    DETECTOR_TAG,
    RESULTS_NAME,
    SUMMARY_NAME,
    VAL_POINTS_NAME,
    run_localize,
    train_packed_detector,
)
from lumbar_ray.paths import detector_dir_for, localize_dir_for, trained_detectors

TINY = {"width": 0.0625, "imgsz": 64, "epochs": 1, "batch": 16, "num_cpus": 1}


def _config(workdir: Path, data: Path, cache: str) -> Config:
    """The sagittal test cache (96 px, its 3 seeded folds) with tiny detectors and a store in ``workdir``."""
    return Config.model_validate({
        "workdir": str(workdir),
        "data": {"root": str(data)},
        "preprocess": {"image_size": 96, "cache": cache},
        "cv": {"n_folds": 3, "seed": 0},
        "localize": TINY,
        "tracking": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "localize_test"},
    })  # fmt: skip


def test_an_empty_cache_is_a_clear_error(synthetic_dir, tmp_path):
    cfg = _config(tmp_path / "work", synthetic_dir, str(tmp_path / "no_cache"))
    with pytest.raises(FileNotFoundError, match="is empty"):
        run_localize(cfg)
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing started


@pytest.mark.ray
@pytest.mark.slow
def test_run_localize_trains_on_ray_evaluates_then_reuses_everything(
    sagittal_cached, synthetic_dir, ray_local, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    cache, _, _ = sagittal_cached
    cfg = _config(tmp_path / "work", synthetic_dir, cache.root)
    driver_env = dict(os.environ)

    result = run_localize(cfg)

    assert result.folder == localize_dir_for(cfg) and (result.folder / SUMMARY_NAME).is_file()
    assert result.weights == trained_detectors(cfg) and list(result.weights) == list(DETECTED_SERIES_TYPES)
    assert all(path.parent == detector_dir_for(cfg, d) for d, path in result.weights.items())
    folds = pd.read_csv(result.folder / "folds.csv")
    val = set(folds.loc[folds["fold"] == cfg.localize.val_fold, "study_id"])
    assert (result.folder / VAL_POINTS_NAME).is_file() and set(result.val_points["study_id"]) <= val
    errors = result.val_errors  # one row per placed target that has a label: what the training jitter comes from
    assert len(errors) == int(result.summary.loc[result.summary["level"] == "all", "points"].sum())
    assert set(errors["study_id"]) <= val and {"error_px", "slice_error", "series_type"} <= set(errors.columns)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["localize.epochs"] == "1"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags[DETECTOR_TAG] for r in children) == ["sagittal_t1", "sagittal_t2_stir"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.info.run_name for r in children) == ["detector_sagittal_t1", "detector_sagittal_t2_stir"]
    assert {p.name for p in tmp_path.iterdir()} == {"work"}  # no mlruns, mlflow.db or runs/ in the cwd
    # What each task returned, written by the driver beside the weights (the task's own folder was its node's).
    assert all((path.parent / RESULTS_NAME).is_file() for path in result.weights.values())
    assert {key: value for key, value in os.environ.items() if key.startswith("MLFLOW")} == {
        key: value for key, value in driver_env.items() if key.startswith("MLFLOW")
    }
    stamps = {d: p.stat().st_mtime_ns for d, p in result.weights.items()}

    again = run_localize(cfg)

    assert again.weights == result.weights and {d: p.stat().st_mtime_ns for d, p in again.weights.items()} == stamps
    assert again.mlflow_run_id == result.mlflow_run_id
    pd.testing.assert_frame_equal(again.summary, result.summary.reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(again.val_errors, result.val_errors)
    assert len(client.search_runs([parent.info.experiment_id])) == 3  # no new parent or child run
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_training_marks_its_child_run_and_the_stage_run_failed(
    sagittal_cached, synthetic_dir, ray_local, tmp_path
):
    from mlflow import MlflowClient
    from ray.exceptions import RayTaskError

    cache, _, _ = sagittal_cached
    cfg = _config(tmp_path / "work", synthetic_dir, cache.root)
    cfg.localize.model = "no_such_model.yaml"

    with pytest.raises(RayTaskError, match="no_such_model"):
        run_localize(cfg)

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("localize_test").experiment_id])
    assert sorted((r.data.tags.get(DETECTOR_TAG, "stage"), r.info.status) for r in runs) == [
        ("sagittal_t1", "FAILED"), ("sagittal_t2_stir", "FAILED"), ("stage", "FAILED")
    ]  # fmt: skip
    assert trained_detectors(cfg) == {}


@pytest.mark.slow
def test_a_detector_task_trains_from_the_packed_export_and_the_shipped_model_file_alone(sagittal_cached, tmp_path,
                                                                                       ultralytics_dir):  # fmt: skip
    """What runs on another node, without Ray: the export and a model yaml of the driver's reach the task by value
    (both are gone from the driver's disk before it runs), and the weights come back as bytes."""
    from ultralytics.nn.tasks import yaml_model_load

    from lumbar_ray.config import LocalizeConfig
    from lumbar_ray.localize.detector import _ultralytics, complete_export
    from lumbar_ray.localize.yolo_data import export_yolo_dataset, pack_dataset
    from lumbar_ray.paths import DETECTOR_WEIGHTS, ShippedFile, ship_if_local

    _ultralytics(ultralytics_dir)
    cache, points, folds = sagittal_cached
    export = export_yolo_dataset(points, cache, "Sagittal T2/STIR", folds, val_fold=0, out=tmp_path / "driver" / "yolo")
    packed = pack_dataset(complete_export(points, cache, "Sagittal T2/STIR", export.dataset_yaml))
    custom = tmp_path / "driver" / "yolov8n.yaml"  # a model file of the driver's own
    custom.write_text(yaml.safe_dump({k: v for k, v in yaml_model_load("yolov8n.yaml").items() if k != "yaml_file"}))
    shipped = ship_if_local(str(custom))
    assert isinstance(shipped, ShippedFile) and ship_if_local("yolov8n.yaml") is None and ship_if_local(None) is None
    cfg = LocalizeConfig(**(TINY | {"model": str(custom)}))
    shutil.rmtree(tmp_path / "driver")  # what the task's node cannot see

    outputs = train_packed_detector(packed, "Sagittal T2/STIR", cfg, track=False, model_file=shipped)

    assert set(outputs) == {DETECTOR_WEIGHTS, RESULTS_NAME} and len(outputs[DETECTOR_WEIGHTS]) > 10_000
    assert shipped.local_path().name == "yolov8n.yaml" and shipped.local_path().read_bytes() == shipped.data
