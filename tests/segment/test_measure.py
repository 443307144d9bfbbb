"""Measurements from masks: canal lumen along the disc's axis, disc height, foramen fat, in millimetres, against
the synthetic phantom rendered 40 times finer, and on drawn volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import LEVELS, target_index
from lumbar_ray.data.phantom import SeriesSpec, SliceSpec, render_labels
from lumbar_ray.localize.geometry import cache_point_to_patient
from lumbar_ray.localize.study import SAG_T1, SAG_T2
from lumbar_ray.segment.labels import CANAL, disc_value, footprint, foramen_value
from lumbar_ray.segment.measure import MEASURE_COLUMNS, disc_height, measure_levels, measure_study
from lumbar_ray.segment.post import CANAL as CANAL_CLASS
from lumbar_ray.segment.post import DISC, FORAMEN, LESION, as_semantic
from tests.localize.conftest import fake_series
from tests.segment.studies import masked_studies
from tests.segment.test_post import _spine_slice

FINE = 0.05  # mm: the phantom sampled for the expected values
SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # row along +y (posterior), column along -z (caudal)


def _fine_line(primitives, start: np.ndarray, length_mm: float, along: str) -> np.ndarray:
    """The phantom's labels on a line from ``start`` (patient mm) along +y (``posterior``) or -z (``caudal``)."""
    count = int(length_mm / FINE)
    if along == "posterior":
        spec = SeriesSpec(0, "fine", 1, count, (FINE, FINE), FINE)
    else:
        spec = SeriesSpec(0, "fine", count, 1, (FINE, FINE), FINE)
    return render_labels(primitives, SliceSpec(np.asarray(start, float), SAGITTAL_ORIENTATION, 1), spec).ravel()


def _fine_patch(primitives, centre: np.ndarray, half_mm: float) -> np.ndarray:
    count = int(2 * half_mm / FINE)
    spec = SeriesSpec(0, "fine", count, count, (FINE, FINE), FINE)
    top_left = np.asarray(centre, float) + np.array([0.0, -half_mm, half_mm])
    return render_labels(primitives, SliceSpec(top_left, SAGITTAL_ORIENTATION, 1), spec)


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return masked_studies(tmp_path_factory.mktemp("easy_measure"), "easy", studies=4, seed=3)


def test_measurements_match_the_phantom_on_the_easy_preset(easy):
    compared = {"canal": 0, "disc": 0, "foramen": 0}
    height_errors, canal_errors = [], []
    for study_id, series in easy.series.items():
        spec = easy.plan(study_id)
        anatomy, primitives = spec.anatomy, spec.primitives
        points = easy.points[easy.points["study_id"] == study_id]
        t2, t1 = series[SAG_T2][0], series[SAG_T1][0]
        t2_labels, t1_labels = (easy.labels[(study_id, int(e.meta.series_id))] for e in (t2, t1))
        measured = measure_study([(t2_labels, t2), (t1_labels, t1)], points).set_index("level")
        for k, level in enumerate(LEVELS):
            spinal = points[points["target"] == target_index("spinal_canal_stenosis", level)]
            if not spinal.empty:
                index = int(spinal["slice"].iloc[0])
                x = cache_point_to_patient(t2, index, 48.0, 48.0)[0]
                mm_x, mm_y = t2.mm_per_pixel(index)
                z = anatomy.disc_z[k]
                # The canal's lumen along the (level) disc's axis: the phantom's canal pixels on that line.
                line = _fine_line(primitives, np.array([x, anatomy.body_y, z]), 60.0, "posterior")
                lumen = (line == CANAL).sum() * FINE
                assert measured.at[level, "canal_ap_mm"] == pytest.approx(lumen, abs=1.5 * mm_x)
                canal_errors.append(abs(measured.at[level, "canal_ap_mm"] - lumen) / mm_x)
                column = _fine_line(primitives, np.array([x, anatomy.body_y, z + 10.0]), 20.0, "caudal")
                disc = (column == disc_value(len(LEVELS) - 1 - k)).sum() * FINE
                assert disc == pytest.approx(0.26 * anatomy.pitch, abs=2 * FINE)
                # A disc ~4 cache pixels high, sampled on the DICOM grid and then the cache's: +-1 pixel each time.
                assert measured.at[level, "disc_height_mm"] == pytest.approx(disc, abs=1.5 * mm_y)
                height_errors.append(abs(measured.at[level, "disc_height_mm"] - disc) / mm_y)
                compared["canal"] += 1
                compared["disc"] += 1
            for side, sign in (("left", 1), ("right", -1)):
                if points["target"].eq(target_index(f"{side}_neural_foraminal_narrowing", level)).sum() == 0:
                    continue
                value = foramen_value(len(LEVELS) - 1 - k, side)
                largest = int(np.argmax(footprint(t1_labels, value).sum(axis=(1, 2))))
                x = cache_point_to_patient(t1, largest, 48.0, 48.0)[0]
                centre = anatomy.foramen_point(sign)[k]
                patch = _fine_patch(primitives, np.array([x, centre[1], centre[2]]), 9.0)
                expected = (patch == value).sum() * FINE**2
                pixel = float(np.prod(t1.mm_per_pixel(largest)))
                area = measured.at[level, f"foramen_{side}_mm2"]
                assert area == pytest.approx((t1_labels[largest] == value).sum() * pixel)  # the mask's own fat
                # A foramen is ~20 cache pixels: its outline sampled on the DICOM grid, then the cache's, moves its
                # area by up to ~5 of them.
                assert area == pytest.approx(expected, abs=max(0.3 * expected, 6 * pixel))
                compared["foramen"] += 1
    assert compared["canal"] >= 15 and compared["foramen"] >= 30
    assert np.mean(height_errors) <= 0.75 and np.mean(canal_errors) <= 0.6  # in cache pixels


def _series(volume: np.ndarray, spacing=(0.8, 0.8), series_id: int = 5):
    """A cached series of the drawn volume: sagittal slices 4 mm apart, ``spacing`` mm per (row, column) pixel."""
    positions = [(-4.0 * k, 0.0, 0.0) for k in range(len(volume))]
    return fake_series(positions, SAGITTAL_ORIENTATION, spacing=spacing, shape=volume.shape[1:], scale=(1.0, 1.0),
                       series_id=series_id, volume=volume)  # fmt: skip


def test_the_lumen_is_measured_along_the_tilted_disc_and_a_bulge_narrows_it():
    tilted, centres = _spine_slice(15.0, bulge=0.5)
    volume = np.stack([tilted, tilted, tilted])
    entry = _series(volume)
    canal_rows = [target_index("spinal_canal_stenosis", level) for level in LEVELS]
    points = pd.DataFrame({"target": canal_rows, "series_id": 5, "slice": 1, "x": centres[:, 0],
                           "y": centres[:, 1]})  # fmt: skip
    measured = measure_levels(volume, entry, points)
    assert list(measured.columns) == list(MEASURE_COLUMNS) and measured["level"].tolist() == list(LEVELS)
    # The canal is 14 px deep along the disc's axis, the bulge fills half of it: 7 px of 0.8 mm remain.
    np.testing.assert_allclose(measured["canal_ap_mm"], 7 * 0.8, atol=0.8)
    np.testing.assert_allclose(measured["disc_height_mm"], 5 * 0.8, atol=0.5)  # 2 x 2.5 px, tilted
    assert measured[["foramen_left_mm2", "foramen_right_mm2"]].isna().all().all()  # no foramen point on a T2
    whole = measure_levels(np.where(volume == LESION, CANAL_CLASS, volume), entry, points)
    np.testing.assert_allclose(whole["canal_ap_mm"], 14 * 0.8, atol=0.8)


def test_foramen_fat_on_its_largest_slice_and_what_is_missing_is_nan():
    volume = np.zeros((5, 40, 40), np.uint8)
    yy, xx = np.mgrid[0:40, 0:40]
    for index, radius in ((1, 3), (2, 5), (3, 4)):
        volume[index][(xx - 20) ** 2 + (yy - 20) ** 2 <= radius**2] = FORAMEN
    volume[2][(xx - 20) ** 2 + (yy - 20) ** 2 <= 2**2] = LESION  # the lesion narrowing its fat
    entry = _series(volume, spacing=(0.5, 0.5))
    left = target_index("left_neural_foraminal_narrowing", "l3_l4")
    right = target_index("right_neural_foraminal_narrowing", "l3_l4")
    points = pd.DataFrame({"target": [left, right], "slice": [1, 2], "x": [20.0, 35.0], "y": [20.0, 35.0]})
    measured = measure_levels(volume, entry, points).set_index("level")
    fat = ((xx - 20) ** 2 + (yy - 20) ** 2 <= 25).sum() - ((xx - 20) ** 2 + (yy - 20) ** 2 <= 4).sum()
    assert measured.at["l3_l4", "foramen_left_mm2"] == pytest.approx(fat * 0.25)  # slice 2, the largest
    assert np.isnan(measured.at["l3_l4", "foramen_right_mm2"])  # no foramen near that point
    a_slice_off = measure_levels(volume, entry, points.assign(slice=[0, 2])).set_index("level")
    assert a_slice_off.at["l3_l4", "foramen_left_mm2"] == pytest.approx(fat * 0.25)
    assert measured.drop(index="l3_l4").isna().all().all()
    with pytest.raises(ValueError, match="volume"):
        measure_levels(volume[:3], entry, points)


def test_a_label_volume_and_its_semantic_classes_measure_alike_and_the_study_takes_each_from_its_series():
    labels = np.zeros((3, 30, 30), np.int16)
    labels[:, 10:13, 2:14] = disc_value(2)
    labels[:, 5:25, 16:24] = CANAL
    labels[:, 10:13, 16:18] = CANAL + 1000
    semantic_volume = as_semantic(labels)
    assert semantic_volume.dtype == np.uint8 and set(np.unique(semantic_volume)) == {0, DISC, 3, LESION}
    assert as_semantic(semantic_volume) is semantic_volume
    entry = _series(labels)
    points = pd.DataFrame({"target": [target_index("spinal_canal_stenosis", "l3_l4")], "series_id": [5], "slice": [1],
                           "x": [20.0], "y": [11.0]})  # fmt: skip
    from_labels, from_classes = measure_levels(labels, entry, points), measure_levels(semantic_volume, entry, points)
    pd.testing.assert_frame_equal(from_labels, from_classes)
    assert from_labels.set_index("level").at["l3_l4", "canal_ap_mm"] == pytest.approx(6 * 0.8, abs=0.3)
    other = _series(labels, series_id=6)
    study = measure_study([(labels, other), (labels, entry)], points)  # the points lie on series 5 only
    pd.testing.assert_frame_equal(study, from_labels)
    assert disc_height(np.ones((3, 12), bool), np.array([0.8, 0.8])) == pytest.approx(2.4)
