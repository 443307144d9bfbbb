"""``localize.method``: the U-Net localiser behind the YOLO detector's interface, its files and keys (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lumbar_ray.config import Config, LocalizeConfig, SegmentConfig
from lumbar_ray.constants import DETECTED_SERIES_TYPES, LEVELS, TARGETS
from lumbar_ray.localize.levels import DETECTION_COLUMNS, LOCATE_COLUMNS, detector_targets
from lumbar_ray.localize.locators import load_locators, unet_segmenter
from lumbar_ray.localize.study import LevelDetector, StudyPoints
from lumbar_ray.paths import cv_run_id, localize_key, trained_detectors, unet_weights_for
from lumbar_ray.segment.data import classes_for
from lumbar_ray.segment.measure import MEASURE_COLUMNS, measurements_table
from lumbar_ray.segment.unet import LoadedUnet, build_unet, save_unet, unet_meta

T2, T1 = "Sagittal T2/STIR", "Sagittal T1"
TINY = {"image_size": 32, "channels": (4, 8), "num_res_units": 0}


def _saved_unet(path, source: str = "masks"):
    cfg = SegmentConfig(source=source, **TINY)
    torch.manual_seed(0)
    return save_unet(path, build_unet(cfg, len(classes_for(source))), unet_meta(cfg))


class _FixedUnet(LoadedUnet):
    """A loaded U-Net whose probabilities are given: what the segmenter makes of them, without a network."""

    def __init__(self, probabilities: np.ndarray, source: str) -> None:
        super().__init__(torch.nn.Identity(), SegmentConfig(source=source, **TINY), classes_for(source), source)
        self.fixed = probabilities

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        return self.fixed


@pytest.mark.parametrize("source", ["masks", "points"])
def test_a_unet_locator_is_a_level_detector_with_the_yolo_detectors_columns(tmp_path, source):
    weights = _saved_unet(tmp_path / "unet.pt", source)
    locators = load_locators(dict.fromkeys(DETECTED_SERIES_TYPES, weights), LocalizeConfig(method="unet"), "cpu")
    assert sorted(locators) == sorted(DETECTED_SERIES_TYPES)
    volume = np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8)
    for description, locator in locators.items():
        assert isinstance(locator, LevelDetector)
        detections = locator.detect(volume, left_first=True)
        assert tuple(detections.columns) == DETECTION_COLUMNS
        assert set(detections["target"]) <= set(detector_targets(description))
        located = locator.locate(volume)
        assert tuple(located.columns) == LOCATE_COLUMNS
        assert located["target"].tolist() == detector_targets(description)  # one row per target, filled or found


def test_a_points_unet_reads_only_its_own_series_types_levels_and_their_confidences():
    n, size = 3, 24
    probabilities = np.full((n, 11, size, size), 0.01, dtype=np.float32)
    probabilities[:, 0] = 0.9
    probabilities[1, 2, 4:8, 4:8] = 0.95  # a T2 blob of level index 1 (l2_l3) on slice 1
    probabilities[1, 0, 4:8, 4:8] = 0.0
    probabilities[2, 6 + 3, 10:14, 10:14] = 0.8  # a T1 blob of level index 3 (l4_l5) on slice 2
    probabilities[2, 0, 10:14, 10:14] = 0.0
    volume = np.zeros((n, size, size), dtype=np.uint8)
    t2 = unet_segmenter(_FixedUnet(probabilities, "points"), T2)(volume)
    t1 = unet_segmenter(_FixedUnet(probabilities, "points"), T1)(volume)
    assert set(np.unique(t2.classes)) == {0, 2} and set(np.unique(t1.classes)) == {0, 4}
    assert t2.probabilities.shape == t1.probabilities.shape == (n, 1 + len(LEVELS), size, size)
    assert t1.probabilities[2, 4, 11, 11] == pytest.approx(0.8)  # the T1 level's own channel, not the T2 one


def test_load_locators_keeps_the_yolo_path_for_method_yolo(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("lumbar_ray.localize.locators.load_detectors", lambda *args, **kwargs: calls.append(args))
    load_locators({T2: tmp_path / "detector.pt"}, LocalizeConfig(), "cpu")
    assert len(calls) == 1 and calls[0][1].method == "yolo"


def _config(tmp_path, **localize) -> Config:
    return Config.model_validate({"workdir": str(tmp_path), "localize": localize})


def test_under_unet_both_series_types_localise_with_the_one_trained_unet(tmp_path):
    cfg = _config(tmp_path, method="unet")
    assert trained_detectors(cfg) == {}
    _saved_unet(unet_weights_for(cfg))
    assert trained_detectors(cfg) == dict.fromkeys(DETECTED_SERIES_TYPES, unet_weights_for(cfg))
    assert trained_detectors(_config(tmp_path)) == {}  # the YOLO detectors are elsewhere


def test_the_unets_settings_move_the_localisation_and_cv_ids_only_under_unet(tmp_path):
    yolo, unet = _config(tmp_path), _config(tmp_path, method="unet")
    other = {"segment": {"epochs": 3}}
    yolo_other = yolo.model_copy(update={"segment": SegmentConfig(**other["segment"])})
    unet_other = unet.model_copy(update={"segment": SegmentConfig(**other["segment"])})
    assert localize_key(yolo) == localize_key(yolo_other) and cv_run_id(yolo) == cv_run_id(yolo_other)
    assert localize_key(unet) != localize_key(unet_other) and cv_run_id(unet) != cv_run_id(unet_other)
    assert localize_key(yolo) != localize_key(unet) and cv_run_id(yolo) != cv_run_id(unet)


def test_measurements_reach_the_study_report_as_millimetres_or_null():
    measured = pd.DataFrame({"level": list(LEVELS), "canal_ap_mm": [12.346, np.nan, 10.0, 9.0, 8.0],
                             "disc_height_mm": 9.0, "foramen_left_mm2": 90.0, "foramen_right_mm2": np.nan})  # fmt: skip
    points = pd.DataFrame(columns=["study_id", "target", "series_id", "slice", "x", "y", "confidence", "filled",
                                   "source"])  # fmt: skip
    report = StudyPoints(7, points, unplaced=list(TARGETS), measurements=measured).to_json()
    assert report["measurements"]["l1_l2"]["canal_ap_mm"] == 12.35
    assert report["measurements"]["l2_l3"]["canal_ap_mm"] is None
    assert report["measurements"]["l5_s1"]["foramen_right_mm2"] is None
    table = measurements_table([report, StudyPoints(8, points).to_json()])
    assert list(table.columns) == ["study_id", *MEASURE_COLUMNS] and len(table) == len(LEVELS)
    assert table["study_id"].eq(7).all() and np.isnan(table.loc[1, "canal_ap_mm"])


def test_only_an_anatomy_segmentation_is_measured(sagittal_cached, synthetic_dir):
    """A points U-Net's blobs are levels, not discs or canal: its studies carry no measurements."""
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.localize.study import localise_study, study_series
    from lumbar_ray.segment.measure import with_measurements
    from lumbar_ray.segment.post import MaskLocator

    cache, points, _ = sagittal_cached
    study_id = int(points["study_id"].iloc[0])
    series = load_rsna(synthetic_dir).train_series
    study = study_series(cache, series, study_id, cache.cached_keys())
    blank = {kind: {d: MaskLocator(d, lambda v: np.zeros(v.shape, np.uint8), kind) for d in DETECTED_SERIES_TYPES}
             for kind in ("anatomy", "points")}  # fmt: skip
    for kind, locators in blank.items():
        located = with_measurements(localise_study(study_id, study, locators), study, locators)
        if kind == "points":
            assert located.measurements is None
        else:  # nothing segmented: every level measured as unmeasurable, not left out
            assert list(located.measurements["level"]) == list(LEVELS)
            assert located.measurements[list(MEASURE_COLUMNS[1:])].isna().all().all()


def test_a_stale_ray_run_of_the_unets_key_is_forgotten(tmp_path):
    from lumbar_ray.segment.stage import forget_ray_run

    cfg = Config.model_validate({"workdir": str(tmp_path), "train": {"storage": str(tmp_path / "ray")}})
    forget_ray_run(cfg, "seg-abc")  # nothing there: nothing to do
    (tmp_path / "ray" / "seg-abc" / "checkpoint_000009").mkdir(parents=True)
    (tmp_path / "ray" / "seg-other").mkdir()
    forget_ray_run(cfg, "seg-abc")
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["seg-other"]
