"""The YOLO level detectors: training finds the points, ultralytics' predictor reports them in cache pixels, its
MLflow callback logs into the run the environment names, and ultralytics stays in its private settings."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lumbar_ray.config import LocalizeConfig
from lumbar_ray.localize import detector as det
from lumbar_ray.localize.detector import SagittalDetector, train_detector
from lumbar_ray.localize.levels import side_groups
from lumbar_ray.localize.study import LevelDetector
from lumbar_ray.localize.yolo_data import detector_targets, export_yolo_dataset

T2, T1 = "Sagittal T2/STIR", "Sagittal T1"
# Small and short: a test trains in seconds on two CPUs (the quickstart defaults train for about a minute).
TINY = LocalizeConfig(width=0.0625, imgsz=64, epochs=1, batch=16, num_cpus=1)


@pytest.fixture(scope="module")
def cached(sagittal_cached):
    return sagittal_cached


def _export(cached, description, out, box_fraction: float = 0.08):
    cache, points, folds = cached
    export = export_yolo_dataset(points, cache, description, folds, val_fold=0, out=out, box_fraction=box_fraction)
    return det.complete_export(points, cache, description, export.dataset_yaml)


@pytest.fixture(scope="module")
def t2_detector(cached, tmp_path_factory, ultralytics_dir):
    """A Sagittal T2 detector trained long enough to place the points of the (easy) synthetic spines."""
    out = tmp_path_factory.mktemp("t2_detector")
    # 14 px boxes (0.15 x 96): at the default 0.08 the boxes are one stride of YOLO's finest grid, almost no anchor
    # is assigned to them and what the detector learns hangs on floating-point noise (see tests/pipeline.py).
    cfg = LocalizeConfig(width=0.125, imgsz=96, epochs=30, batch=4, lr0=0.003, num_cpus=2, box_fraction=0.15)
    dataset = _export(cached, T2, out / "dataset", cfg.box_fraction)
    weights = train_detector(dataset, T2, cfg, out / "model", settings_dir=ultralytics_dir)
    return SagittalDetector(weights, T2, cfg, device="cpu", settings_dir=ultralytics_dir)


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert isinstance(t2_detector, LevelDetector)  # so localise_study can re-level its Sagittal T1 twin
    with pytest.raises(ValueError, match="n_slices, H, W"):
        t2_detector.detect(volume[0])


@pytest.mark.slow
def test_detectors_load_from_weights_and_keep_the_settings_private(t2_detector):
    from ultralytics.utils import SETTINGS_FILE

    weights = t2_detector.model.ckpt_path
    loaded = det.load_detectors({T2: weights}, t2_detector.cfg, device="cpu")
    assert list(loaded) == [T2] and loaded[T2].imgsz == 96 and loaded[T2].targets == detector_targets(T2)
    # Whichever private folder this process's first detector chose: never the user's ~/.config/Ultralytics.
    assert SETTINGS_FILE.resolve().is_relative_to(os.environ["YOLO_CONFIG_DIR"])
    settings = json.loads(SETTINGS_FILE.read_text())
    assert not any(settings[key] for key in ("sync", "mlflow", "clearml", "comet", "dvc", "raytune", "wandb"))
    assert os.environ["YOLO_OFFLINE"] == "True"


def test_train_args_keep_named_weights_and_build_a_yaml_from_scratch(tmp_path):
    # A .pt is fine-tuned: ultralytics' trainer drops the weights of a model given with pretrained=False.
    weights = LocalizeConfig(model="yolov8s.pt", width=None)
    args = det._train_args(tmp_path / "dataset.yaml", weights, tmp_path, det._model_source(weights, tmp_path / "m"))
    assert args["model"] == "yolov8s.pt" and args["pretrained"] is True
    # A yaml has nothing to load: built from scratch, nothing downloaded.
    scratch = LocalizeConfig(model="yolov8n.yaml", width=None)
    args = det._train_args(tmp_path / "dataset.yaml", scratch, tmp_path, det._model_source(scratch, tmp_path / "m"))
    assert args["model"] == "yolov8n.yaml" and args["pretrained"] is False
    assert not (tmp_path / "m").exists()  # neither was rescaled


def _one_image_dataset(folder):
    """A one-class YOLO dataset of one image per split: all ultralytics' trainer checks before it builds a model."""
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        cv2.imwrite(str(folder / "images" / split / "a.png"), np.zeros((32, 32), np.uint8))
        (folder / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    dataset = {"path": str(folder), "train": "images/train", "val": "images/val", "names": {0: "canal"}}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(dataset))
    return folder / "dataset.yaml"


def _trainer_model(args):
    """The state of the model ultralytics' trainer sets up from ``args``, before any training step."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    with det._torch_determinism_restored():
        trainer = DetectionTrainer(overrides=args)
        trainer.setup_model()
    return trainer.model.state_dict()


@pytest.mark.slow
def test_the_trainer_starts_from_the_weights_a_pt_names(tmp_path, ultralytics_dir):
    # ultralytics' own behaviour under the arguments train_detector passes: no download, no training step.
    ultralytics = det._ultralytics(ultralytics_dir)
    torch.manual_seed(1234)  # not the trainer's seed: a model it builds afresh cannot equal this one
    start = ultralytics.YOLO(det._model_source(LocalizeConfig(), tmp_path / "yaml"))  # the quickstart's width
    start.save(tmp_path / "start.pt")
    cfg = LocalizeConfig(model=str(tmp_path / "start.pt"), width=None)
    args = det._train_args(_one_image_dataset(tmp_path / "dataset"), cfg, tmp_path / "out", cfg.model)
    expected = start.model.state_dict()

    def kept(state):  # the .pt's conv weights found in the trainer's model (the 1-class head's differ in shape)
        keys = [k for k in expected if k.endswith("conv.weight") and state[k].shape == expected[k].shape]
        return sum(torch.allclose(state[k].float(), expected[k].float(), atol=1e-3) for k in keys), len(keys)

    same, compared = kept(_trainer_model(args))
    assert compared >= 40 and same == compared
    same, _ = kept(_trainer_model(args | {"pretrained": False}))  # what train_detector used to pass
    assert same <= 1


def _stub(description: str, detections: pd.DataFrame) -> SagittalDetector:
    """A detector whose raw detections are given (no model): locate's resolution alone."""
    stub = SagittalDetector.__new__(SagittalDetector)
    stub.description, stub.targets = description, detector_targets(description)
    stub.groups = side_groups(description)
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


def test_t1_provisional_side_comes_from_the_volume_half():
    stub = _stub(T1, pd.DataFrame())
    left, right = stub.groups
    assert stub._target(2, 1, 11, left_first=True) == left[2]
    assert stub._target(7, 1, 11, left_first=True) == left[2]  # a 10-class model's "right" on the left half
    assert stub._target(2, 9, 11, left_first=True) == right[2]
    assert stub._target(2, 9, 11, left_first=False) == left[2]
    # The centre slice is kept (with the first half): the study-level localisation sides it by patient x.
    assert stub._target(2, 5, 11, left_first=True) == left[2]


def test_complete_export_adds_background_and_makes_t1_classes_per_level(cached, tmp_path):
    dataset_yaml = _export(cached, T1, tmp_path / "t1")
    det.merge_sides(dataset_yaml)  # idempotent
    assert len(yaml.safe_load(dataset_yaml.read_text())["names"]) == 5
    labels = list((tmp_path / "t1" / "labels").rglob("*.txt"))
    classes = {int(line.split()[0]) for f in labels for line in f.open()}
    assert classes == set(range(5))
    assert any(f.read_text() == "" for f in labels)  # background slices: images without a box


def test_the_environment_points_ultralytics_and_its_mlflow_callback_at_ours(tmp_path):
    env = det.ultralytics_env(tmp_path / "settings")
    assert env == {"YOLO_CONFIG_DIR": str((tmp_path / "settings").resolve()), "YOLO_OFFLINE": "True",
                   "ULTRALYTICS_API_KEY": ""}  # fmt: skip
    routed = det.mlflow_env("sqlite:////store/mlflow.db", "lumbar_ray", "abc123", "detector_sagittal_t1")
    assert routed == {"MLFLOW_TRACKING_URI": "sqlite:////store/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "lumbar_ray",
                      "MLFLOW_RUN_ID": "abc123", "MLFLOW_RUN": "detector_sagittal_t1"}  # fmt: skip
    with pytest.raises(ValueError, match="MLFLOW_RUN_ID"):
        train_detector(tmp_path / "dataset.yaml", T2, TINY, tmp_path / "out", track=True)


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_metrics_of_ultralytics_land_in_the_run_the_task_environment_names(cached, ray_local, tmp_path):
    # Routed as the stage routes it: the MLflow variables reach only the Ray task's process. The name matters:
    # ultralytics' MLflow callback only runs under pytest in tests named test_mlflow*, hence PYTEST_CURRENT_TEST.
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("detectors", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="detector_sagittal_t2_stir").info.run_id
    dataset_yaml = _export(cached, T2, tmp_path / "out" / "dataset")
    driver_uri, driver_env = mlflow.get_tracking_uri(), dict(os.environ)
    env = det.ultralytics_env(tmp_path / "ultralytics") | det.mlflow_env(uri, "detectors", run_id,
                                                                          "detector_sagittal_t2_stir")  # fmt: skip
    env["PYTEST_CURRENT_TEST"] = "test_mlflow (call)"
    task = ray_local.remote(train_detector).options(num_cpus=1, runtime_env={"env_vars": env})
    cwd = ray_local.get(ray_local.remote(lambda: os.getcwd()).options(runtime_env={"env_vars": env}).remote())
    before = set(os.listdir(cwd))

    weights = ray_local.get(task.remote(dataset_yaml, T2, TINY, tmp_path / "out" / "model", track=True))

    assert weights == tmp_path / "out" / "model" / "detector.pt" and weights.is_file()
    run = client.get_run(run_id)
    assert "metrics/mAP50B" in run.data.metrics and "train/box_loss" in run.data.metrics
    assert run.data.params["epochs"] == "1" and run.info.run_name == "detector_sagittal_t2_stir"
    assert run.info.status == "FINISHED"  # ultralytics ended the run it resumed: nothing left active in the worker
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    assert {e.name for e in client.search_experiments()} == {"detectors", "Default"}  # no experiment "out"
    assert set(os.listdir(cwd)) == before  # no mlflow.db, mlruns, runs/ where the worker runs
    assert mlflow.get_tracking_uri() == driver_uri and dict(os.environ) == driver_env  # the driver untouched
    settings = json.loads(next((tmp_path / "ultralytics").rglob("settings.json")).read_text())
    assert settings["mlflow"] and not any(settings[key] for key in ("sync", "clearml", "comet", "dvc", "wandb"))
