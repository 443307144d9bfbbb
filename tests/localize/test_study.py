"""Assembling a study's 25 points: sagittal points from a locator, axial slices and points from the geometry;
missing series and missing detections never drop the study; the localisation metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import TARGETS, target_index
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.localize.evaluate import point_errors, summarise_errors, summary_metrics
from lumbar_ray.localize.stage import axial_from_labels
from lumbar_ray.localize.study import AXIAL, SAG_T1, SAG_T2, LevelDetector, localise_study, study_series
from tests.localize.conftest import build_cache, fake_series

N_STUDIES = 8


@pytest.fixture(scope="module")
def cached(synthetic_dir, tmp_path_factory):
    """Every series of the first training studies in a 96 px cache, with the label points."""
    studies = sorted(load_rsna(synthetic_dir).train_series["study_id"].unique())[:N_STUDIES]
    cache, points, data = build_cache(synthetic_dir, tmp_path_factory.mktemp("study_cache"), studies)
    series = data.train_series[data.train_series["study_id"].isin(studies)]
    cached_keys = set(zip(series["study_id"], series["series_id"], strict=True))
    return cache, points, series, cached_keys, studies


class LabelLocator:
    """Stands in for a detector: returns the labelled points of the series it is shown (minus ``drop``)."""

    def __init__(self, points: pd.DataFrame, drop: tuple[int, ...] = ()) -> None:
        self.points, self.drop = points, drop

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        rows = self.points[self.points["series_id"] == self.series_id]
        out = rows[["target", "slice", "x", "y"]].astype(float).assign(confidence=0.9, filled=False)
        out.loc[out["target"].isin(self.drop), ["slice", "x", "y"]] = np.nan
        return out.astype({"target": int})


def _locators(points: pd.DataFrame, series: dict, drop: tuple[int, ...] = ()) -> dict:
    locators = {}
    for description in (SAG_T2, SAG_T1):
        if series.get(description):
            locator = LabelLocator(points, drop)
            locator.series_id = int(series[description][0].meta.series_id)
            locators[description] = locator
    return locators


def _complete_study(cache, points, series_frame, cached_keys, studies):
    for study_id in studies:
        series = study_series(cache, series_frame, int(study_id), cached_keys)
        labelled = points[points["study_id"] == study_id]
        if all(series.get(d) for d in (SAG_T2, SAG_T1, AXIAL)) and len(labelled) == len(TARGETS):
            return int(study_id), series, labelled
    pytest.fail("no complete study among the first synthetic studies")


def test_study_series_loads_sagittal_volumes_and_leaves_out_what_is_not_cached(cached):
    cache, points, series_frame, cached_keys, studies = cached
    study_id, series, _ = _complete_study(cache, points, series_frame, cached_keys, studies)
    assert all(entry.volume.shape[0] > 0 for description in (SAG_T2, SAG_T1) for entry in series[description])
    assert all(entry.volume.shape[0] == 0 and len(entry.meta.slices) > 0 for entry in series[AXIAL])  # metadata only
    t1_id = int(series[SAG_T1][0].meta.series_id)
    without_t1 = study_series(cache, series_frame, study_id, cached_keys - {(study_id, t1_id)})
    assert SAG_T1 not in without_t1 or t1_id not in [int(e.meta.series_id) for e in without_t1[SAG_T1]]


def test_labelled_sagittal_points_place_all_25_targets_and_the_axial_slices(cached):
    cache, points, series_frame, cached_keys, studies = cached
    study_id, series, labelled = _complete_study(cache, points, series_frame, cached_keys, studies)
    assert not isinstance(LabelLocator(labelled), LevelDetector)  # located, never re-levelled
    located = localise_study(study_id, series, _locators(labelled, series))
    assert located.unplaced == [] and located.missing_series == []
    assert located.points["target"].tolist() == list(range(len(TARGETS)))
    sagittal = located.points[located.points["source"] == "detector"]
    merged = sagittal.merge(labelled, on=["study_id", "target"], suffixes=("", "_true"))
    assert len(merged) == 15
    assert (merged["series_id"] == merged["series_id_true"]).all() and (merged["slice"] == merged["slice_true"]).all()
    axial = located.points[located.points["source"] == "geometry"]
    assert len(axial) == 10
    errors = point_errors(axial, labelled, lambda s, r: cache.read(s, r))
    assert errors["slice_correct"].mean() >= 0.9  # geometry on exact synthetic geometry: near-perfect
    assert errors["error_px"].median() < 3.0
    report = located.to_json()
    assert set(report["points"]) == set(TARGETS) and report["points"][TARGETS[0]]["source"] == "detector"


def test_a_missing_detection_and_a_missing_series_still_place_what_they_can(cached):
    cache, points, series_frame, cached_keys, studies = cached
    study_id, series, labelled = _complete_study(cache, points, series_frame, cached_keys, studies)
    spinal_l1 = target_index("spinal_canal_stenosis", "l1_l2")
    located = localise_study(study_id, series, _locators(labelled, series, drop=(spinal_l1,)))
    # No spinal L1/L2 point: the canal there is the foramina's midpoint, so the axial L1/L2 points still exist.
    assert TARGETS[spinal_l1] in located.unplaced and len(located.unplaced) == 1
    for side in ("left", "right"):
        assert target_index(f"{side}_subarticular_stenosis", "l1_l2") in set(located.points["target"])
    without_t1 = {key: value for key, value in series.items() if key != SAG_T1}
    located = localise_study(study_id, without_t1, _locators(labelled, without_t1))
    assert located.missing_series == [SAG_T1]
    assert len(located.unplaced) == 10 and all("foraminal" in name for name in located.unplaced)
    axial = located.points[located.points["source"] == "geometry"]
    assert len(axial) == 10  # foramina assumed at the anatomical lateral offset
    errors = point_errors(axial, labelled, lambda s, r: cache.read(s, r))
    assert errors["slice_correct"].mean() >= 0.8
    nothing = localise_study(study_id, {AXIAL: series[AXIAL]}, {})
    assert nothing.points.empty and len(nothing.unplaced) == len(TARGETS)


def test_axial_assignment_from_labels_over_studies_and_the_metric_names(cached):
    cache, points, series_frame, _, _ = cached
    axial_ids = set(series_frame.loc[series_frame["series_description"] == AXIAL, "series_id"])
    placed = axial_from_labels(points, series_frame, cache, fraction=0.4)
    truth = points[points["series_id"].isin(axial_ids)]
    summary = summarise_errors(point_errors(placed, truth, lambda s, r: cache.read(s, r)))
    overall = summary[summary["level"] == "all"].iloc[0]
    assert overall["points"] == len(truth) and overall["slice_accuracy"] >= 0.9
    metrics = summary_metrics(summary)
    assert metrics["loc.axial_t2.all.slice_accuracy"] == overall["slice_accuracy"]
    assert {f"loc.axial_t2.{level}.within_10px" for level in ("l1_l2", "l5_s1")} <= set(metrics)


def test_point_errors_in_plane_and_across_series():
    def series(series_id: int, z: float):
        positions = [(0.0, 0.0, z + k) for k in range(3)]
        return fake_series(positions, (1, 0, 0, 0, 1, 0), (0.5, 0.5), series_id=series_id, volume=np.zeros((0, 0, 0)))

    entries = {1: series(1, 0.0), 2: series(2, 100.0), 3: series(3, 0.0)}

    def series_of(study_id, series_id):
        return entries[series_id]

    truth = pd.DataFrame({"study_id": [7, 7, 7], "target": [0, 1, 2], "series_id": [1, 1, 1], "slice": [1, 1, 1],
                          "x": [10.0, 20.0, 20.0], "y": [10.0, 20.0, 20.0]})  # fmt: skip
    # target 0: 5 cache px off on its slice; 1: on a series 100 mm away; 2: the same point on a coincident stack
    predicted = truth.assign(x=[13.0, 20.0, 20.0], y=[14.0, 20.0, 20.0], series_id=[1, 2, 3])
    errors = point_errors(predicted, truth, series_of)
    assert errors.loc[0, "error_px"] == pytest.approx(5.0) and errors.loc[0, "error_mm"] == pytest.approx(1.25)
    assert errors.loc[1, "error_mm"] == pytest.approx(100.0) and np.isnan(errors.loc[1, "slice_error"])
    assert errors.loc[2, "error_mm"] == pytest.approx(0.0)
    assert errors["slice_correct"].tolist() == [True, False, False]  # coincident planes count on axial series only
    summary = summarise_errors(errors)
    overall = summary[summary["level"] == "all"].iloc[0]
    assert (overall["within_5px"], overall["within_10px"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    shifted = point_errors(predicted.assign(slice=[2, 1, 1]), truth, series_of)
    assert shifted["slice_error"].tolist()[0] == 1 and not shifted["slice_correct"].iloc[0]
    assert summarise_errors(shifted).query("level == 'all'")["slice_within_1"].item() == pytest.approx(1 / 3)


def test_foramen_levels_are_reassigned_from_the_canal_on_sagittal_t2(cached):
    from lumbar_ray.localize.study import patient_points, relevel_by_canal

    cache, points, series_frame, cached_keys, studies = cached
    _, series, labelled = _complete_study(cache, points, series_frame, cached_keys, studies)
    t1, t2 = series[SAG_T1][0], series[SAG_T2][0]
    foramina = labelled[labelled["series_id"] == int(t1.meta.series_id)]
    # A detector that confuses every level with the next one down (L5/S1 wraps to L1/L2), on both sides.
    wrong = foramina[["target", "slice", "x", "y"]].assign(
        target=lambda f: f["target"] - f["target"] % 5 + (f["target"] % 5 + 1) % 5, confidence=0.8
    )
    t2_id = int(t2.meta.series_id)
    canal = patient_points(labelled[labelled["series_id"] == t2_id], {t2_id: t2})
    fixed = relevel_by_canal(wrong, t1, canal)
    assert sorted(fixed["target"]) == sorted(foramina["target"])
    far = wrong.assign(y=wrong["y"] - 500.0)  # far above the whole spine: no canal level near, dropped
    assert relevel_by_canal(far, t1, canal).empty
