"""Assembling a study's 25 points: sagittal points from a locator, axial slices and points from the geometry;
missing series and missing detections never drop the study; the localisation metrics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import LEVELS, TARGETS, target_index
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.localize.evaluate import point_errors, summarise_errors, summary_metrics
from lumbar_ray.localize.stage import axial_from_labels
from lumbar_ray.localize.study import (
    AXIAL,
    SAG_T1,
    SAG_T2,
    LevelDetector,
    assign_sides,
    axial_rows,
    canal_x_by_level,
    localise_study,
    patient_points,
    relevel_by_canal,
    side_of_canal,
    slab_centre_x,
    study_series,
)
from tests.localize.conftest import build_cache, fake_series

SAGITTAL_ORIENTATION = (0, 1, 0, 0, 0, -1)  # normal along -x: slice 0 is the patient's left (``left_first``)
AXIAL_ORIENTATION = (1, 0, 0, 0, 1, 0)

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
    # The labelled point's distance from the predicted slice's plane: 0 on its own slice and a coincident one,
    # 100 mm on the far series (another level, for an axial target).
    np.testing.assert_allclose(errors["plane_error_mm"], [0.0, 100.0, 0.0], atol=1e-9)
    summary = summarise_errors(errors)
    overall = summary[summary["level"] == "all"].iloc[0]
    assert (overall["within_5px"], overall["within_10px"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert overall["level_right"] == pytest.approx(2 / 3)
    shifted = point_errors(predicted.assign(slice=[2, 1, 1]), truth, series_of)
    assert shifted["slice_error"].tolist()[0] == 1 and not shifted["slice_correct"].iloc[0]
    assert summarise_errors(shifted).query("level == 'all'")["slice_within_1"].item() == pytest.approx(1 / 3)


def test_foramen_levels_are_reassigned_from_the_canal_on_sagittal_t2(cached):
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


# --- hardened for real scans: foramen sides, axial reach, the better of two sagittal series


def _sagittal(xs, series_id: int) -> CachedSeries:
    """A sagittal series with one slice at each patient x (mm), all at the same (y, z) origin."""
    return fake_series([(x, -50.0, 80.0) for x in xs], SAGITTAL_ORIENTATION, series_id=series_id)


class FixedLocator:
    """A plain locator: the same rows whatever volume it is shown."""

    def __init__(self, rows: pd.DataFrame) -> None:
        self.rows = rows

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        return self.rows


class HalfSidedDetector:
    """Stands in for the Sagittal T1 detector: its raw detections are sided by the half of the volume their slice
    lies in, as a 2D detector's are; each target resolves to the mean of its detections."""

    def __init__(self, level, slice_index, x, y) -> None:
        self.raw = pd.DataFrame({"level": level, "slice": slice_index, "x": x, "y": y}).astype({"x": float, "y": float})

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        first_half = self.raw["slice"] < (len(volume) - 1) / 2
        sides = np.where(first_half == left_first, "left", "right")
        targets = [target_index(f"{side}_neural_foraminal_narrowing", LEVELS[level])
                   for side, level in zip(sides, self.raw["level"], strict=True)]  # fmt: skip
        detections = self.raw.drop(columns="level").assign(target=targets, confidence=0.8)
        return detections[["target", "slice", "x", "y", "confidence"]]  # the detector's column order

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        means = detections.groupby("target", as_index=False)[["slice", "x", "y", "confidence"]].mean()
        return means.assign(slice=means["slice"].round().astype(int), filled=False)

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        return self.resolve(self.detect(volume, left_first), len(volume))


# The T1 slab runs from x = +40 to -36 mm (20 slices, 4 mm): its middle is x = 2 mm, but the canal lies at x = -16.
T1_XS = [40.0 - 4.0 * k for k in range(20)]
CANAL_X = -16.0
LEVEL_ROWS = [40.0 + 30.0 * level for level in range(len(LEVELS))]


def _off_centre_foramina() -> HalfSidedDetector:
    """Each level's left foramen on T1 slices 9-11 (x = 4, 0, -4 mm: left of the canal, slices 10 and 11 past the
    slab's middle) and its right foramen on slices 17-18 (x = -28, -32 mm)."""
    rows = [(level, k, 100.0, y) for level, y in enumerate(LEVEL_ROWS) for k in (9, 10, 11, 17, 18)]
    return HalfSidedDetector(*zip(*rows, strict=True))


def _canal_locator() -> FixedLocator:
    rows = pd.DataFrame({"target": [target_index("spinal_canal_stenosis", level) for level in LEVELS], "slice": 2,
                         "x": 100.0, "y": LEVEL_ROWS, "confidence": 0.9, "filled": False})  # fmt: skip
    return FixedLocator(rows)


def _foramen_sides(located) -> dict[str, set[float]]:
    """Side -> patient x (mm) of the slices the foramen points were placed on (slices of :data:`T1_XS`)."""
    out = {"left": set(), "right": set()}
    for row in located.points.itertuples(index=False):
        name = TARGETS[row.target]
        if "foraminal" in name:
            out[name.split("_")[0]].add(T1_XS[row.slice])
    return out


def test_foramen_sides_come_from_patient_x_against_the_canal_not_the_slab_half():
    t1 = _sagittal(T1_XS, series_id=1)
    t2 = _sagittal([CANAL_X + 8.0 - 4.0 * k for k in range(5)], series_id=2)  # slice 2 at the canal's x
    detectors = {SAG_T2: _canal_locator(), SAG_T1: _off_centre_foramina()}
    located = localise_study(7, {SAG_T2: [t2], SAG_T1: [t1]}, detectors)
    # Left foramina at the middle of slices 9-11 (x = 0), right ones at slices 17-18 (x = -28 or -32).
    sides = _foramen_sides(located)
    assert sides["left"] == {0.0} and sides["right"] <= {-28.0, -32.0}
    assert len(located.points) == 15  # 5 canal and 10 foramen points (no axial series)


def test_without_sagittal_t2_the_canal_lies_between_a_levels_two_foramina():
    located = localise_study(7, {SAG_T1: [_sagittal(T1_XS, series_id=1)]}, {SAG_T1: _off_centre_foramina()})
    sides = _foramen_sides(located)
    assert sides["left"] == {0.0} and sides["right"] <= {-28.0, -32.0}


def test_canal_reference_falls_back_from_t2_to_the_foramina_to_other_levels_to_the_slab():
    t1 = _sagittal(T1_XS, series_id=1)
    spinal = {target_index("spinal_canal_stenosis", LEVELS[0]): (np.array([-10.0, 0.0, 0.0]), 0.9)}
    level = np.array([1, 1, 2, 3, 4])
    xs = np.array([6.0, -30.0, 4.0, 5.0, -9.0])  # level 1: both sides seen; levels 2-4: one foramen each
    np.testing.assert_allclose(canal_x_by_level(level, xs, spinal, t1), [-10.0, -12.0, -11.0, -11.0, -11.0])
    alone = canal_x_by_level(level[2:], xs[2:], {}, t1)  # nothing places the canal: the slab's middle
    assert slab_centre_x(t1) == pytest.approx(2.0) and np.allclose(alone, 2.0)


def test_axial_rows_leave_a_level_no_axial_stack_reaches_without_a_point():
    axial = fake_series([(-30.0, -30.0, z) for z in (-4.0, 0.0, 4.0)], AXIAL_ORIENTATION, series_id=3)
    canal = {target_index("spinal_canal_stenosis", LEVELS[0]): (np.array([0.0, 0.0, 1.0]), 0.9),
             target_index("spinal_canal_stenosis", LEVELS[1]): (np.array([0.0, 0.0, -35.0]), 0.9)}  # fmt: skip
    rows = axial_rows(7, [axial], canal, fraction=0.4)
    placed = sorted(row["target"] for row in rows)
    assert placed == sorted(target_index(f"{side}_subarticular_stenosis", LEVELS[0]) for side in ("left", "right"))
    assert {row["slice"] for row in rows} == {1}


def test_a_study_with_two_series_of_one_sagittal_type_uses_the_better(tmp_path):
    partial = _sagittal([CANAL_X + 4.0 * k for k in range(-2, 2)], series_id=1)  # 4 slices: 16 mm
    complete = _sagittal([CANAL_X + 28.0 - 4.0 * k for k in range(15)], series_id=2)
    located = localise_study(7, {SAG_T2: [partial, complete]}, {SAG_T2: _canal_locator()})
    assert set(located.points["series_id"]) == {2}
    cache = SeriesCache(tmp_path, {"test": "two sagittal series"})
    cache.prepare()
    for entry in (partial, complete):
        meta = replace(entry.meta, study_id=7, split="train", series_description=SAG_T2)
        cache.write(7, int(meta.series_id), np.zeros((len(meta.slices), 4, 4), np.uint8), meta)
    frame = pd.DataFrame({"study_id": [7, 7], "series_id": [1, 2], "series_description": [SAG_T2, SAG_T2]})
    listed = study_series(cache, frame, 7, {(7, 1), (7, 2)})
    assert [int(entry.meta.series_id) for entry in listed[SAG_T2]] == [2, 1]  # the better one first


def test_labelled_foramina_get_their_labelled_sides_back_from_patient_space(cached):
    cache, points, series_frame, cached_keys, studies = cached
    checked = 0
    for study_id in studies:
        series = study_series(cache, series_frame, int(study_id), cached_keys)
        labelled = points[points["study_id"] == study_id]
        if not (series.get(SAG_T1) and series.get(SAG_T2)):
            continue
        t1, t2 = series[SAG_T1][0], series[SAG_T2][0]
        foramina = labelled[labelled["series_id"] == int(t1.meta.series_id)]
        foramina = foramina[foramina["target"].map(lambda t: "foraminal" in TARGETS[t])]
        # Every detection claims the left side: the sides must come back from patient x alone.
        claimed = foramina[["target", "slice", "x", "y"]].assign(confidence=0.8)
        claimed["target"] = target_index("left_neural_foraminal_narrowing", LEVELS[0]) + claimed["target"] % 5
        t2_id = int(t2.meta.series_id)
        canal = patient_points(labelled[labelled["series_id"] == t2_id], {t2_id: t2})
        for reference in (canal, {}):  # the Sagittal T2 canal, then the gap between the two foramina
            sided = assign_sides(claimed, t1, reference)
            assert sorted(sided["target"]) == sorted(foramina["target"]), (study_id, bool(reference))
        checked += 1
    assert checked >= 3


def test_a_detection_on_the_canals_midline_has_no_side():
    assert side_of_canal(2.0, 0.0) is None and side_of_canal(-4.9, 0.0) is None  # a mid-line false positive
    assert side_of_canal(15.0, 0.0) == "left" and side_of_canal(-15.0, 0.0) == "right"  # +x is patient left
    assert side_of_canal(21.0, 20.0, min_offset_mm=0.5) == "left"
