"""2.5D target crops: the crop geometry, label points mapped into the cache, the study dataset, the planted signal."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lumbar_ray.config import AugmentConfig, CropConfig, PreprocessConfig, cache_settings
from lumbar_ray.constants import CONDITION_TITLES, CONDITIONS, IGNORE_INDEX, LEVEL_TITLES, LEVELS, TARGETS
from lumbar_ray.data.augment import flip_permutation, flip_targets
from lumbar_ray.data.cache import CachedSeries, SeriesCache, manifest_row
from lumbar_ray.data.crops import (
    POINT_COLUMNS,
    CropDataset,
    crop_affine,
    crop_region,
    crop_slices,
    crop_stack,
    points_from_coordinates,
    second_view_points,
    slice_target,
)
from lumbar_ray.data.preprocess import process_row, series_items
from lumbar_ray.data.rsna import RsnaData, load_rsna
from lumbar_ray.labels import encode_labels
from tests.data.conftest import stacked_meta

CROP = CropConfig(size=16, region=24, slices=3)
ONE_TO_ONE = CropConfig(size=17, region=17, slices=3)  # one crop pixel per cache pixel, centre pixel (8, 8)
OFF = AugmentConfig(jitter_px=0, jitter_slices=0, rotate_deg=0, scale=0, brightness=0, contrast=0, gamma=0, flip_p=0)


# --- crop_stack geometry


def _marked_volume(marks: list[tuple[int, int, int]], shape=(7, 64, 64)) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.uint8)
    for index, x, y in marks:
        volume[index, y, x] = 255
    return volume


def _peak(image: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(np.argmax(image), image.shape)
    return int(row), int(col)


def test_point_lands_at_the_crop_centre_and_identity_crop_is_a_plain_cut():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (7, 64, 64), dtype=np.uint8)
    out = crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE)
    assert out.shape == (3, 17, 17) and out.dtype == np.float32
    for k, index in enumerate((2, 3, 4)):
        np.testing.assert_allclose(out[k], volume[index, 12:29, 22:39] / 255.0, atol=1e-6)

    marked = crop_stack(_marked_volume([(3, 30, 20)]), 3, 30.0, 20.0, CROP)
    assert marked[0].max() == 0 and marked[2].max() == 0  # the mark is on the centre slice only
    # even output size: the centre lies between pixels 7 and 8, so the mark is shared by the central 2x2
    row, col = _peak(marked[1])
    assert row in (7, 8) and col in (7, 8)
    assert marked[1, 7:9, 7:9].sum() == pytest.approx(marked[1].sum(), rel=1e-5)


def test_rotation_by_90_degrees_turns_an_off_centre_mark_counter_clockwise():
    volume = _marked_volume([(3, 34, 20)])  # 4 px right of the point (30, 20)
    assert _peak(crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE)[1]) == (8, 12)
    assert _peak(crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE, angle_deg=90.0)[1]) == (4, 8)  # right -> up
    assert _peak(crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE, angle_deg=-90.0)[1]) == (12, 8)  # right -> down


def test_zoom_magnifies_around_the_point():
    volume = _marked_volume([(3, 33, 20)])
    volume[3, 30:33, 40:43] = 255  # a 3x3 square elsewhere (x 40..42, y 30..32)
    plain = crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE)
    zoomed = crop_stack(volume, 3, 30.0, 20.0, ONE_TO_ONE, zoom=2.0)
    assert _peak(plain[1]) == (8, 11) and _peak(zoomed[1]) == (8, 14)  # 3 cache px = 6 crop px at zoom 2
    square = crop_stack(volume, 3, 41.0, 31.0, ONE_TO_ONE)
    square_zoomed = crop_stack(volume, 3, 41.0, 31.0, ONE_TO_ONE, zoom=2.0)
    assert (square_zoomed[1] > 0.5).sum() >= 2.5 * (square[1] > 0.5).sum()  # 5x5 vs 3x3 (linear)


def test_edge_slices_repeat():
    volume = np.broadcast_to((np.arange(7) * 30).astype(np.uint8)[:, None, None], (7, 32, 32)).copy()

    def levels(centre: int) -> list[float]:
        return [round(float(v) * 255) for v in crop_stack(volume, centre, 16.0, 16.0, ONE_TO_ONE)[:, 8, 8]]

    assert levels(0) == [0, 0, 30]
    assert levels(6) == [150, 180, 180]
    assert levels(-4) == [0, 0, 0]  # a jittered slice beyond the volume clamps too
    assert levels(3) == [60, 90, 120]
    wide = crop_stack(volume, 0, 16.0, 16.0, CropConfig(size=8, region=8, slices=5))
    np.testing.assert_allclose(wide[:, 4, 4] * 255, [0, 0, 0, 30, 60], atol=1e-3)


def test_bounds_keep_a_crop_inside_its_block():
    volume = np.broadcast_to((np.arange(7) * 30).astype(np.uint8)[:, None, None], (7, 32, 32)).copy()

    def levels(centre: int, bounds: tuple[int, int]) -> list[float]:
        crop = crop_stack(volume, centre, 16.0, 16.0, ONE_TO_ONE, bounds=bounds)
        return [round(float(v) * 255) for v in crop[:, 8, 8]]

    assert levels(2, (0, 3)) == [30, 60, 60]  # the block's last slice repeats; slice 3 is another block's
    assert levels(3, (3, 7)) == [90, 90, 120]
    assert levels(5, (3, 4)) == [90, 90, 90]  # a jittered centre beyond a one-slice block


def _slice_cache(tmp_path: Path) -> SeriesCache:
    """Study 1: series 1 (one block of 8 slices, slice i uniformly 20 (i + 1)) and series 2 (two blocks of 4
    slices, slice i uniformly 200 + 5 i): a crop slice's value says which slice of which series it shows."""
    cache = SeriesCache(tmp_path, {"test": "slice targets"})
    cache.prepare()
    offsets = [0.0, 4.0, 8.0, 12.0]
    one_block = stacked_meta([(0.0, [*offsets, 16.0, 20.0, 24.0, 28.0])], size=32, series_id=1)
    two_blocks = stacked_meta([(-8.0, offsets), (8.0, offsets)], size=32, series_id=2)
    for series_id, meta, values in ((1, one_block, 20 * (np.arange(8) + 1)), (2, two_blocks, 200 + 5 * np.arange(8))):
        cache.write(1, series_id, np.broadcast_to(values.astype(np.uint8)[:, None, None], (8, 32, 32)).copy(), meta)
    return cache


# target: (crop point's series, slice), (label point's series, slice), expected slice target (S = 3, no jitter)
SLICE_CASES = {
    0: ((1, 3), (1, 3), 1),  # the crop cut at the label point
    1: ((1, 3), (1, 4), 2),  # a predicted point one slice off, on the label's series
    2: ((1, 3), (1, 6), IGNORE_INDEX),  # the labelled slice outside the crop
    3: ((1, 0), (1, 0), 1),  # the crop [0, 0, 1] at the volume's edge
    4: ((2, 4), (2, 3), IGNORE_INDEX),  # the crop point's block is 4..7, the labelled slice is in block 0..3
    5: ((1, 5), (1, 4), 0),
    6: ((1, 3), None, IGNORE_INDEX),  # no label point
    7: ((1, 3), (2, 3), IGNORE_INDEX),  # a predicted point on another series than the label's
    8: (None, (1, 3), IGNORE_INDEX),  # no crop
    15: ((1, 2), (1, 3), 2),  # an axial target
}


def _slice_points(which: int) -> pd.DataFrame:
    rows = [{"study_id": 1, "target": t, "series_id": case[which][0], "slice": case[which][1], "x": 16.0, "y": 16.0}
            for t, case in SLICE_CASES.items() if case[which] is not None]  # fmt: skip
    return pd.DataFrame(rows, columns=list(POINT_COLUMNS))


def _label_value(target: int) -> int:
    series_id, index = SLICE_CASES[target][1]
    return 20 * (index + 1) if series_id == 1 else 200 + 5 * index


def _same_series(target: int) -> bool:
    """Whether ``target`` has a crop and a label point, both on one series."""
    crop, label, _ = SLICE_CASES.get(target, (None, None, None))
    return crop is not None and label is not None and crop[0] == label[0]


def _shown(item: dict, target: int) -> list[int]:
    """The value of each crop slice of ``target`` (its uniform intensity, i.e. which slice it shows)."""
    return [round(float(v) * 255) for v in item["crops"][target, :, 8, 8]]


def test_slice_targets_of_a_hand_made_study(tmp_path):
    cache = _slice_cache(tmp_path)
    crop_points, label_points = _slice_points(0), _slice_points(1)
    item = CropDataset(cache, [1], crop_points, ONE_TO_ONE, slice_points=label_points)[0]
    expected = np.full(len(TARGETS), IGNORE_INDEX)
    expected[list(SLICE_CASES)] = [case[2] for case in SLICE_CASES.values()]
    np.testing.assert_array_equal(item["slice_target"].numpy(), expected)
    assert item["slice_target"].dtype == torch.int64
    for target in np.flatnonzero(expected >= 0):
        assert _shown(item, target)[expected[target]] == _label_value(target)
    assert _label_value(4) not in _shown(item, 4)  # the other block's slice is really not in the crop
    # Without label points (inference at predicted points) no slice is known.
    unknown = CropDataset(cache, [1], crop_points, ONE_TO_ONE)[0]["slice_target"]
    assert (unknown == IGNORE_INDEX).all()


def test_slice_targets_move_with_the_slice_jitter_and_the_flip(tmp_path):
    cache = _slice_cache(tmp_path)
    crop_points, label_points = _slice_points(0), _slice_points(1)
    jitter = OFF.model_copy(update={"jitter_slices": 2, "flip_p": 0.5})
    dataset = CropDataset(cache, [1], crop_points, ONE_TO_ONE, augment=jitter, seed=18, slice_points=label_points)
    order = flip_permutation()
    shifts, flips = set(), set()
    for epoch in range(10):
        dataset.set_epoch(epoch)
        params, item = dataset.params(0), dataset[0]
        targets = item["slice_target"].numpy()
        shifts.add(int(params.shift_slice[0]))
        flips.add(params.flip)
        spinal = 1 - int(params.shift_slice[0])  # the spinal target 0 sits mid-volume: nothing clamps it
        spinal = spinal if 0 <= spinal < 3 else IGNORE_INDEX
        assert targets[0] == (2 - spinal if params.flip and spinal >= 0 else spinal)  # sagittal: reversed by a flip
        for target in range(len(TARGETS)):
            source = order[target] if params.flip else target
            if targets[target] >= 0:  # it points at the labelled slice, wherever the jitter and flip put it
                assert _shown(item, target)[targets[target]] == _label_value(source)
            elif _same_series(source):
                assert _label_value(source) not in _shown(item, target)  # unknown only where the crop lacks it
    assert {-2, -1, 0, 1, 2} <= shifts and flips == {False, True}  # the draws covered every case


def test_a_dataset_crop_never_mixes_the_stacks_of_a_series(tmp_path):
    """Two tilted per-level blocks in one axial series: a point on a block's end slice repeats that slice."""
    meta = stacked_meta([(-8.0, [0.0, 4.0, 8.0]), (8.0, [0.0, 4.0, 8.0])], size=32)
    volume = np.broadcast_to((np.arange(6) * 30 + 30).astype(np.uint8)[:, None, None], (6, 32, 32)).copy()
    cache = SeriesCache(tmp_path, {"test": "stacks"})
    cache.prepare()
    cache.write(1, 1, volume, meta)
    points = pd.DataFrame({"study_id": [1, 1], "target": [0, 1], "series_id": [1, 1], "slice": [2, 3],
                           "x": [16.0, 16.0], "y": [16.0, 16.0]})  # fmt: skip
    crops = CropDataset(cache, [1], points, ONE_TO_ONE)[0]["crops"].numpy()
    assert [round(float(v) * 255) for v in crops[0, :, 8, 8]] == [60, 90, 90]  # slice 3 is the other block's
    assert [round(float(v) * 255) for v in crops[1, :, 8, 8]] == [120, 120, 150]


def test_slice_target_is_the_labelled_slices_place_in_the_crop():
    def target(label: int, centre: int, count: int = 3, n: int = 8, bounds: tuple[int, int] | None = None) -> int:
        return slice_target(label, crop_slices(centre, count, n, bounds), centre)

    assert target(3, 3) == 1  # labelled points: the centre
    assert [target(3, 3 + shift) for shift in (-1, 0, 1)] == [2, 1, 0]  # a slice jitter of +j moves it to 1 - j
    assert target(3, 5) == IGNORE_INDEX and target(3, 1) == IGNORE_INDEX  # jittered out of the crop
    assert target(5, 4, count=5) == 3
    assert target(0, 0) == 1  # the crop [0, 0, 1] repeats slice 0: the unclamped place is taken
    assert target(0, -2) == 2  # the crop [0, 0, 0]: the nearest place to the unclamped 3
    assert target(3, 4, bounds=(4, 8)) == IGNORE_INDEX  # the labelled slice is another block's
    assert target(4, 4, bounds=(4, 8)) == 1  # [4, 4, 5]: the crop point's block begins at 4
    assert target(4, 3, bounds=(4, 8)) == 2  # [4, 4, 4]: the centre jittered out of the block


def test_outside_the_image_is_zero():
    volume = np.full((3, 32, 32), 200, dtype=np.uint8)
    out = crop_stack(volume, 1, -3.0, 16.0, ONE_TO_ONE)  # crop column u samples x = u - 11
    assert np.all(out[:, :, :10] == 0.0)
    np.testing.assert_allclose(out[:, :, 11:], 200 / 255, atol=1e-6)
    assert not crop_stack(volume, 1, -500.0, 16.0, ONE_TO_ONE).any()
    assert not crop_stack(volume, 1, 16.0, 1e4, ONE_TO_ONE, angle_deg=30.0).any()


def test_output_is_float32_in_unit_range_under_any_geometry():
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 256, (9, 48, 48), dtype=np.uint8)
    volume[:, 10:20, 10:20] = 255
    for angle, zoom, x, y in ((0.0, 1.0, 15.0, 15.0), (33.0, 1.3, 2.5, 40.2), (-170.0, 0.7, 47.9, 0.1)):
        out = crop_stack(volume, 4, x, y, CROP, angle_deg=angle, zoom=zoom)
        assert out.dtype == np.float32 and out.shape == (CROP.slices, CROP.size, CROP.size)
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5


# --- the crop region in millimetres

# One phantom seen at two fields of view: 1 mm cache pixels, and finer, non-square ones (0.625 mm across, 0.75 mm
# down: a 0.5 mm original resized by 0.8 across and 2/3 down).
WIDE = {"spacing": (1.0, 1.0), "scale": (1.0, 1.0), "size": 64, "mm": (1.0, 1.0)}
FINE = {"spacing": (0.5, 0.5), "scale": (2 / 3, 0.8), "size": 96, "mm": (0.625, 0.75)}
POINT_MM = (30.0, 32.0)  # (x, y) in the phantom, mm from the image's corner
IN_MM = CropConfig(size=24, region=24, region_mm=24.0, slices=3)
IN_PX = CropConfig(size=24, region=24, slices=3)


def _phantom(view: dict, slices: int = 3) -> np.ndarray:
    """uint8 ``(slices, size, size)``: a smooth pattern of the patient's millimetres, sampled at the centres of the
    view's cache pixels (cache pixel i covers ``[i, i + 1)`` pixels, its centre at ``(i + 0.5) * mm``)."""
    mm_x, mm_y = view["mm"]
    x, y = np.meshgrid((np.arange(view["size"]) + 0.5) * mm_x, (np.arange(view["size"]) + 0.5) * mm_y)
    image = 0.5 + 0.25 * np.sin(2 * np.pi * x / 23) * np.cos(2 * np.pi * y / 29)
    image += 0.2 * np.exp(-((x - 36) ** 2 + (y - 26) ** 2) / 50)  # an off-centre blob: no symmetry to hide behind
    return np.broadcast_to(np.round(255 * image).astype(np.uint8), (slices, view["size"], view["size"])).copy()


def _series(view: dict, series_id: int) -> CachedSeries:
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0])], size=view["size"], series_id=series_id, spacing=view["spacing"],
                        scale=view["scale"])  # fmt: skip
    return CachedSeries(_phantom(view), meta)


def _cache_point(view: dict) -> tuple[float, float]:
    return POINT_MM[0] / view["mm"][0] - 0.5, POINT_MM[1] / view["mm"][1] - 0.5


def test_region_in_mm_is_converted_with_each_slices_own_spacing():
    wide, fine = _series(WIDE, 1), _series(FINE, 2)
    np.testing.assert_allclose(fine.mm_per_pixel(1), FINE["mm"])
    assert crop_region(IN_MM, wide, 1) == pytest.approx((24.0, 24.0))
    assert crop_region(IN_MM, fine, 1) == pytest.approx((24.0 / 0.625, 24.0 / 0.75))
    assert crop_region(IN_PX, fine, 1) == (24, 24)  # the default: cache pixels, whatever the spacing


def test_region_in_mm_cuts_the_same_anatomy_at_two_fields_of_view():
    wide, fine = _series(WIDE, 1), _series(FINE, 2)
    for angle, zoom in ((0.0, 1.0), (30.0, 1.0), (-65.0, 1.2)):
        crops = []
        for series, view in ((wide, WIDE), (fine, FINE)):
            crops.append(crop_stack(series.volume, 1, *_cache_point(view), IN_MM, angle_deg=angle, zoom=zoom,
                                    region=crop_region(IN_MM, series, 1)))  # fmt: skip
        assert np.abs(crops[0] - crops[1]).max() < 0.03, (angle, zoom)
    in_px = [crop_stack(s.volume, 1, *_cache_point(v), IN_PX) for s, v in ((wide, WIDE), (fine, FINE))]
    assert np.abs(in_px[0] - in_px[1]).mean() > 0.03  # in cache pixels the finer view shows less anatomy


def test_dataset_crops_in_mm_show_the_same_anatomy_at_two_fields_of_view(tmp_path):
    cache = SeriesCache(tmp_path, {"test": "region in mm"})
    cache.prepare()
    rows = []
    for study_id, view in ((1, WIDE), (2, FINE)):
        series = _series(view, study_id)
        cache.write(study_id, study_id, series.volume, series.meta)
        x, y = _cache_point(view)
        rows += [{"study_id": study_id, "target": t, "series_id": study_id, "slice": 1, "x": x, "y": y}
                 for t in (0, 7, 15)]  # fmt: skip
    points = pd.DataFrame(rows, columns=list(POINT_COLUMNS))
    in_mm = CropDataset(cache, [1, 2], points, IN_MM)
    for target in (0, 7, 15):
        assert (in_mm[0]["crops"][target] - in_mm[1]["crops"][target]).abs().max() < 0.03
    in_px = CropDataset(cache, [1, 2], points, IN_PX)
    assert (in_px[0]["crops"][0] - in_px[1]["crops"][0]).abs().mean() > 0.03


def test_a_slice_without_pixel_spacing_falls_back_to_the_region_in_cache_pixels(caplog):
    series = _series(FINE, 2)
    table = series.meta.slices
    meta = replace(series.meta, slices=replace(table, pixel_spacing=(None,) * len(table)))
    with caplog.at_level("WARNING"):
        assert crop_region(IN_MM, CachedSeries(series.volume, meta), 1) == (24, 24)
    assert "PixelSpacing" in caplog.text


def test_without_region_mm_the_affine_is_the_cache_pixel_rule_bit_for_bit():
    """The cache-pixel rule as it was before regions in mm: crops at the default geometry are unchanged."""
    series = _series(FINE, 2)
    for angle, zoom in ((0.0, 1.0), (17.0, 1.1), (-120.0, 0.85)):
        step = CROP.region / zoom / CROP.size
        theta = np.radians(angle)
        cos, sin = np.cos(theta) * step, np.sin(theta) * step
        linear = np.array([[cos, -sin], [sin, cos]])
        centre = (CROP.size - 1) / 2.0
        expected = np.hstack([linear, (np.array([30.5, 20.25]) - linear @ np.array([centre, centre]))[:, None]])
        np.testing.assert_array_equal(crop_affine(30.5, 20.25, CROP, angle, zoom), expected)
        region = crop_region(CROP, series, 1)
        np.testing.assert_array_equal(crop_affine(30.5, 20.25, CROP, angle, zoom, region), expected)
        volume = _phantom(FINE)
        np.testing.assert_array_equal(crop_stack(volume, 1, 30.5, 20.25, CROP, angle, zoom, region=region),
                                      crop_stack(volume, 1, 30.5, 20.25, CROP, angle, zoom))  # fmt: skip


# --- the synthetic cache


@dataclass
class CacheEnv:
    data: RsnaData
    cache: SeriesCache
    size: int
    removed: tuple[int, int]  # never cached
    vanished: tuple[int, int]  # in the manifest, entry deleted afterwards


@pytest.fixture(scope="module")
def cache_env(synthetic_dir: Path, tmp_path_factory) -> CacheEnv:
    """The train series of the synthetic dataset cached without Ray, less one series and one lost entry."""
    data = load_rsna(synthetic_dir)
    cfg = PreprocessConfig(image_size=96)
    cache = SeriesCache(tmp_path_factory.mktemp("crops_cache"), cache_settings(cfg))
    cache.prepare()
    labelled = data.coordinates.drop_duplicates(["study_id", "series_id"])
    removed = (int(labelled.iloc[0].study_id), int(labelled.iloc[0].series_id))
    vanished = (int(labelled.iloc[-1].study_id), int(labelled.iloc[-1].series_id))
    rows = []
    for item in series_items(synthetic_dir):
        if item["split"] != "train" or (item["study_id"], item["series_id"]) == removed:
            continue
        status = process_row(item, cache, cfg)
        assert status["status"] == "done", status
        rows.append(manifest_row(cache.read_meta(item["study_id"], item["series_id"])))
    cache.write_manifest(pd.DataFrame(rows))
    Path(cache._entry(*vanished, "json")).unlink()
    return CacheEnv(data, cache, cfg.image_size, removed, vanished)


@pytest.fixture(scope="module")
def points(cache_env: CacheEnv):
    return points_from_coordinates(cache_env.data.coordinates, cache_env.cache, cache_env.data.train_series)


# --- points_from_coordinates


def test_every_coordinate_row_is_mapped_or_skipped_with_a_reason(cache_env, points):
    coordinates = cache_env.data.coordinates
    assert tuple(points.points.columns) == POINT_COLUMNS
    assert len(points.points) + len(points.skipped) == len(coordinates)
    assert points.skipped["reason"].str.len().gt(0).all()
    assert not points.points.duplicated(["study_id", "target"]).any()
    assert points.points["target"].between(0, len(TARGETS) - 1).all()
    for column in ("study_id", "target", "series_id", "slice"):
        assert points.points[column].dtype == np.int64


def test_removed_and_vanished_series_are_skipped_and_named(cache_env, points):
    skipped = points.skipped.set_index(["study_id", "series_id"])
    for pair, reason in ((cache_env.removed, "manifest"), (cache_env.vanished, "missing")):
        expected = (cache_env.data.coordinates.study_id == pair[0]) & (cache_env.data.coordinates.series_id == pair[1])
        assert pair in skipped.index and len(skipped.loc[[pair]]) == expected.sum() > 0
        assert skipped.loc[[pair], "reason"].str.contains(reason).all()
    mapped = set(zip(points.points.study_id, points.points.series_id, strict=True))
    assert cache_env.removed not in mapped and cache_env.vanished not in mapped


def test_mapped_points_lie_inside_the_image_and_map_back(cache_env, points):
    frame = points.points
    assert len(frame) > 0.9 * len(cache_env.data.coordinates)
    assert frame["x"].between(0, cache_env.size - 1).all() and frame["y"].between(0, cache_env.size - 1).all()
    coordinates = cache_env.data.coordinates
    sample = frame.iloc[:: max(1, len(frame) // 40)]
    for row in sample.itertuples(index=False):
        entry = cache_env.cache.read(row.study_id, row.series_id, mmap=True)
        assert 0 <= row.slice < entry.volume.shape[0]
        instance, x, y = entry.cache_to_original(row.slice, row.x, row.y)
        condition, level = TARGETS[row.target][:-6], TARGETS[row.target][-5:]
        source = coordinates[
            (coordinates.study_id == row.study_id)
            & (coordinates.condition == CONDITION_TITLES[condition])
            & (coordinates.level == LEVEL_TITLES[level])
        ].iloc[0]
        assert instance == source.instance_number and (x, y) == pytest.approx((source.x, source.y), abs=1e-6)


def test_duplicates_unknown_instances_and_conditions_are_skipped(cache_env, points):
    coordinates = cache_env.data.coordinates
    kept = points.points.iloc[0]
    first = coordinates[(coordinates.study_id == kept.study_id) & (coordinates.series_id == kept.series_id)].iloc[0]
    duplicate = first.copy()
    duplicate["x"] = first.x + 10.0
    orphan = coordinates[coordinates.study_id == kept.study_id].iloc[-1].copy()
    bad_instance = orphan.copy()
    bad_instance["instance_number"] = 9999
    bad_condition = first.copy()
    bad_condition["condition"] = "Cervical Stenosis"
    edited = pd.concat(
        [coordinates[~coordinates.index.isin([orphan.name])], pd.DataFrame([duplicate, bad_instance, bad_condition])]
    )
    result = points_from_coordinates(edited, cache_env.cache, cache_env.data.train_series)
    assert len(result.points) + len(result.skipped) == len(edited)
    reasons = result.reasons()
    assert reasons.get("duplicate (study, target): first row kept") == 1
    assert reasons.get("instance not in the cached series") == 1
    assert reasons.get("unknown condition or level") == 1
    before = points.points.set_index(["study_id", "target"])
    after = result.points.set_index(["study_id", "target"])
    key = (int(kept.study_id), int(kept.target))
    assert after.loc[key, "x"] == before.loc[key, "x"]  # the first row wins, not the shifted duplicate
    assert len(after) == len(before) - 1


# --- CropDataset


@pytest.fixture(scope="module")
def labelled(cache_env, points):
    study_ids, labels = encode_labels(cache_env.data.train)
    return study_ids, labels, points.points


def test_items_have_the_contract_shapes_masks_and_labels(cache_env, labelled):
    study_ids, labels, frame = labelled
    dataset = CropDataset(cache_env.cache, study_ids, frame, CROP, labels=labels)
    assert len(dataset) == len(study_ids)
    present = {(int(s), int(t)) for s, t in zip(frame.study_id, frame.target, strict=True)}
    some_missing = False
    for index in range(0, len(dataset), 5):
        item = dataset[index]
        assert item["crops"].dtype == torch.float32 and item["crops"].shape == (25, 3, 16, 16)
        assert item["labels"].dtype == torch.int64 and item["labels"].shape == (25,)
        assert item["mask"].dtype == torch.bool and item["mask"].shape == (25,)
        assert item["study_id"].dtype == torch.int64 and item["study_id"].ndim == 0
        study = int(item["study_id"])
        assert study == study_ids[index]
        mask = item["mask"].numpy()
        np.testing.assert_array_equal(mask, [(study, t) in present for t in range(25)])
        crops, item_labels = item["crops"].numpy(), item["labels"].numpy()
        assert np.all(crops[~mask] == 0) and np.all(crops[mask].reshape(mask.sum(), -1).max(axis=1) > 0)
        np.testing.assert_array_equal(item_labels[~mask], IGNORE_INDEX)
        np.testing.assert_array_equal(item_labels[mask], labels[index][mask])
        some_missing |= not mask.all()
    assert some_missing  # missing series and empty cells exist in the synthetic data


def test_a_study_without_any_point_is_kept_with_everything_ignored(cache_env, labelled):
    study_ids, labels, frame = labelled
    lonely = int(study_ids[0])
    dataset = CropDataset(cache_env.cache, study_ids[:2], frame[frame.study_id != lonely], CROP, labels=labels[:2])
    assert len(dataset) == 2
    item = dataset[0]
    assert not item["mask"].any() and not item["crops"].any()
    assert (item["labels"] == IGNORE_INDEX).all() and int(item["study_id"]) == lonely
    unlabelled = CropDataset(cache_env.cache, study_ids[:2], frame, CROP)
    assert (unlabelled[1]["labels"] == IGNORE_INDEX).all() and unlabelled[1]["mask"].any()
    with pytest.raises(ValueError, match="shape"):
        CropDataset(cache_env.cache, study_ids[:2], frame, CROP, labels=labels[:3])


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in ("crops", "labels", "mask", "study_id"))


def test_eval_crops_are_deterministic_and_augmented_ones_follow_seed_epoch_index(cache_env, labelled):
    study_ids, labels, frame = labelled
    ids, lab = study_ids[:4], labels[:4]
    evaluation = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab)
    assert _same(evaluation[1], evaluation[1])
    evaluation.set_epoch(5)
    assert _same(evaluation[1], CropDataset(cache_env.cache, ids, frame, CROP, labels=lab)[1])

    train = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab, augment=AugmentConfig(), seed=3)
    first = train[1]
    assert not torch.equal(first["crops"], evaluation[1]["crops"])
    train.set_epoch(1)
    assert not torch.equal(train[1]["crops"], first["crops"])
    again = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab, augment=AugmentConfig(), seed=3)
    assert _same(again[1], first)  # same (seed, epoch 0, index)
    again.set_epoch(1)
    assert _same(again[1], train[1])
    other_seed = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab, augment=AugmentConfig(), seed=4)
    assert not torch.equal(other_seed[1]["crops"], first["crops"])


def test_dataset_flip_and_zero_strengths_match_the_eval_item(cache_env, labelled):
    study_ids, labels, frame = labelled
    ids, lab = study_ids[:3], labels[:3]
    evaluation = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab)
    off = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab, augment=OFF)
    flip = CropDataset(cache_env.cache, ids, frame, CROP, labels=lab, augment=OFF.model_copy(update={"flip_p": 1.0}))
    for index in range(3):
        reference = evaluation[index]
        assert _same(off[index], reference)
        expected = flip_targets(*(reference[key].numpy() for key in ("crops", "labels", "mask")))
        flipped = flip[index]
        for key, value in zip(("crops", "labels", "mask"), expected, strict=True):
            np.testing.assert_array_equal(flipped[key].numpy(), value)


def test_pickling_round_trip_keeps_items_and_epoch(cache_env, labelled):
    study_ids, labels, frame = labelled
    dataset = CropDataset(cache_env.cache, study_ids[:3], frame, CROP, labels=labels[:3], augment=AugmentConfig())
    dataset.set_epoch(2)
    dataset[0]  # opened volumes must not leak into the pickle
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.epoch == 2 and len(clone) == 3
    for index in range(3):
        assert _same(clone[index], dataset[index])


def test_persistent_loader_workers_follow_set_epoch(cache_env, labelled):
    study_ids, labels, frame = labelled
    dataset = CropDataset(cache_env.cache, study_ids[:4], frame, CROP, labels=labels[:4], augment=AugmentConfig())
    dataset = pickle.loads(pickle.dumps(dataset))  # as Ray ships it to a training worker
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        expected = torch.stack([dataset[i]["crops"] for i in range(4)])
        assert torch.equal(torch.cat([batch["crops"] for batch in batches]), expected), epoch


# --- the planted signal


def _central_mean(crops: np.ndarray) -> np.ndarray:
    """Mean of the centre slice's central 4x4 crop pixels (6x6 cache pixels) per target crop."""
    centre = CROP.slices // 2
    return crops[:, centre, 6:10, 6:10].mean(axis=(1, 2))


@pytest.mark.parametrize("condition", ["spinal_canal_stenosis", "left_neural_foraminal_narrowing"])
def test_crops_are_centred_on_the_planted_lesions(cache_env, labelled, condition):
    """Lesions replace bright CSF (T2) or foraminal fat (T1) by dark tissue: severe centres are darker."""
    study_ids, labels, frame = labelled
    dataset = CropDataset(cache_env.cache, study_ids, frame, CROP, labels=labels)
    targets = [CONDITIONS.index(condition) * len(LEVELS) + level for level in range(len(LEVELS))]
    by_class: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for index in range(len(dataset)):
        item = dataset[index]
        means = _central_mean(item["crops"].numpy()[targets])
        present = item["mask"].numpy()[targets]
        for value, label in zip(means[present], item["labels"].numpy()[targets][present], strict=True):
            by_class[int(label)].append(float(value))
    normal, lesion = np.mean(by_class[0]), np.mean(by_class[1] + by_class[2])
    assert len(by_class[0]) >= 20 and len(by_class[1] + by_class[2]) >= 5
    assert lesion < normal - 0.1, (normal, lesion, {k: len(v) for k, v in by_class.items()})
    if len(by_class[2]) >= 3:
        assert np.mean(by_class[2]) < np.mean(by_class[1]) + 0.05


# --- the second view (crop.second_view)


def _t(condition: str, level: str) -> int:
    return TARGETS.index(f"{condition}_{level}")


def _point(study: int, condition: str, level: str, series: int, index: int, x: float, y: float) -> dict:
    return {"study_id": study, "target": _t(condition, level), "series_id": series, "slice": index, "x": x, "y": y}


LEFT_SUB, RIGHT_SUB = "left_subarticular_stenosis", "right_subarticular_stenosis"
SPINAL, LEFT_FORAMEN, RIGHT_FORAMEN = CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]


def test_second_view_points_follow_the_subarticular_points_of_the_level():
    rows = [
        _point(1, LEFT_SUB, "l1_l2", 9, 4, 10.0, 20.0),  # both sides on one slice: the canal midway
        _point(1, RIGHT_SUB, "l1_l2", 9, 4, 30.0, 24.0),
        _point(1, RIGHT_SUB, "l2_l3", 9, 6, 31.0, 33.0),  # one side missing: the one that exists
        _point(1, LEFT_SUB, "l4_l5", 9, 7, 11.0, 40.0),  # different slices: midway, on the left one's slice
        _point(1, RIGHT_SUB, "l4_l5", 9, 8, 29.0, 41.0),
        _point(1, LEFT_SUB, "l5_s1", 9, 10, 12.0, 50.0),  # different series, same slice index: the left one
        _point(1, RIGHT_SUB, "l5_s1", 10, 10, 28.0, 52.0),
        _point(1, SPINAL, "l3_l4", 5, 7, 40.0, 40.0),  # sagittal points place no second view (l3_l4: none)
        _point(1, LEFT_FORAMEN, "l3_l4", 6, 3, 40.0, 40.0),
        _point(2, LEFT_SUB, "l1_l2", 19, 2, 5.0, 6.0),
        _point(3, LEFT_SUB, "l1_l2", 29, 2, float("nan"), 6.0),  # no coordinates: no point
    ]
    frame = pd.DataFrame(rows, columns=list(POINT_COLUMNS))
    views = second_view_points(frame.sample(frac=1.0, random_state=0))  # any row order
    assert tuple(views.columns) == POINT_COLUMNS
    assert views.dtypes.to_dict() == {"study_id": np.int64, "target": np.int64, "series_id": np.int64,
                                      "slice": np.int64, "x": np.float64, "y": np.float64}  # fmt: skip
    got = {(int(r.study_id), TARGETS[r.target]): (int(r.series_id), int(r.slice), r.x, r.y)
           for r in views.itertuples(index=False)}  # fmt: skip
    expected = {
        (1, f"{SPINAL}_l1_l2"): (9, 4, 20.0, 22.0),
        (1, f"{LEFT_FORAMEN}_l1_l2"): (9, 4, 10.0, 20.0),
        (1, f"{RIGHT_FORAMEN}_l1_l2"): (9, 4, 30.0, 24.0),
        (1, f"{SPINAL}_l2_l3"): (9, 6, 31.0, 33.0),
        (1, f"{RIGHT_FORAMEN}_l2_l3"): (9, 6, 31.0, 33.0),  # and no left foramen: its side's point is missing
        (1, f"{SPINAL}_l4_l5"): (9, 7, 20.0, 40.5),
        (1, f"{LEFT_FORAMEN}_l4_l5"): (9, 7, 11.0, 40.0),
        (1, f"{RIGHT_FORAMEN}_l4_l5"): (9, 8, 29.0, 41.0),
        (1, f"{SPINAL}_l5_s1"): (9, 10, 12.0, 50.0),
        (1, f"{LEFT_FORAMEN}_l5_s1"): (9, 10, 12.0, 50.0),
        (1, f"{RIGHT_FORAMEN}_l5_s1"): (10, 10, 28.0, 52.0),
        (2, f"{SPINAL}_l1_l2"): (19, 2, 5.0, 6.0),
        (2, f"{LEFT_FORAMEN}_l1_l2"): (19, 2, 5.0, 6.0),
    }
    assert got == expected  # subarticular targets, l3_l4 and study 3 get none
    assert list(zip(views.study_id, views.target, strict=True)) == sorted(zip(views.study_id, views.target,
                                                                              strict=True))  # fmt: skip
    assert second_view_points(frame.iloc[:0]).empty
    assert second_view_points(frame[frame.target == _t(SPINAL, "l3_l4")]).empty


def _two_view_cache(tmp_path: Path) -> tuple[SeriesCache, pd.DataFrame]:
    """Study 1: a random "sagittal" series 1 and a random "axial" series 2 (8 slices of 32 px each), and points:
    at L1/L2 every target (both subarticular points on axial slice 4); at L2/L3 the right foramen and the left
    subarticular point only (so the canal and the left foramen have only their second view, the right foramen
    only its own)."""
    cache = SeriesCache(tmp_path, {"test": "second view"})
    cache.prepare()
    rng = np.random.default_rng(0)
    for series_id in (1, 2):
        meta = stacked_meta([(0.0, [4.0 * i for i in range(8)])], size=32, series_id=series_id)
        cache.write(1, series_id, rng.integers(1, 256, (8, 32, 32), dtype=np.uint8), meta)
    points = pd.DataFrame([
        _point(1, SPINAL, "l1_l2", 1, 3, 16.0, 16.0),
        _point(1, LEFT_FORAMEN, "l1_l2", 1, 1, 12.0, 15.0),
        _point(1, RIGHT_FORAMEN, "l1_l2", 1, 6, 20.0, 17.0),
        _point(1, LEFT_SUB, "l1_l2", 2, 4, 12.0, 16.0),
        _point(1, RIGHT_SUB, "l1_l2", 2, 4, 20.0, 18.0),
        _point(1, RIGHT_FORAMEN, "l2_l3", 1, 5, 18.0, 22.0),
        _point(1, LEFT_SUB, "l2_l3", 2, 6, 14.0, 19.0),
    ], columns=list(POINT_COLUMNS))  # fmt: skip
    return cache, points


TWO_VIEWS = ONE_TO_ONE.model_copy(update={"second_view": True})


def test_a_two_view_item_holds_each_targets_own_crop_then_its_second_view(tmp_path):
    cache, points = _two_view_cache(tmp_path)
    labels = np.arange(len(TARGETS))[None] % 3
    one = CropDataset(cache, [1], points, ONE_TO_ONE, labels=labels)[0]
    item = CropDataset(cache, [1], points, TWO_VIEWS, labels=labels, slice_points=points)[0]
    n, crops = len(TARGETS), item["crops"].numpy()
    assert crops.shape == (2 * n, 3, 17, 17) and item["crops"].dtype == torch.float32
    assert item["labels"].shape == item["mask"].shape == item["slice_target"].shape == (n,)
    np.testing.assert_array_equal(crops[:n], one["crops"].numpy())  # the first view is the one-view item
    axial = cache.read(1, 2).volume
    midway = crop_stack(axial, 4, 16.0, 17.0, ONE_TO_ONE, bounds=(0, 8))
    np.testing.assert_array_equal(crops[n + _t(SPINAL, "l1_l2")], midway)
    for foramen, sub in ((LEFT_FORAMEN, LEFT_SUB), (RIGHT_FORAMEN, RIGHT_SUB)):  # its side's subarticular crop
        np.testing.assert_array_equal(crops[n + _t(foramen, "l1_l2")], crops[_t(sub, "l1_l2")])
    np.testing.assert_array_equal(crops[n + _t(SPINAL, "l2_l3")], crops[_t(LEFT_SUB, "l2_l3")])
    second = np.abs(crops[n:]).reshape(n, -1).max(axis=1) > 0
    with_second = {f"{c}_{level}" for c in (SPINAL, LEFT_FORAMEN, RIGHT_FORAMEN) for level in ("l1_l2", "l2_l3")}
    assert {TARGETS[t] for t in np.flatnonzero(second)} == with_second - {f"{RIGHT_FORAMEN}_l2_l3"}
    # A target is masked only without any view: the L2/L3 canal and left foramen have their axial view alone.
    mask = item["mask"].numpy()
    for alone in (_t(SPINAL, "l2_l3"), _t(LEFT_FORAMEN, "l2_l3")):
        assert mask[alone] and not one["mask"][alone]
    np.testing.assert_array_equal(mask, one["mask"].numpy() | second)
    np.testing.assert_array_equal(item["labels"].numpy(), np.where(mask, labels[0], IGNORE_INDEX))
    # The slice targets stay about each target's own crop: the canal's axial view has none.
    assert item["slice_target"][_t(SPINAL, "l1_l2")] == 1 and item["slice_target"][_t(SPINAL, "l2_l3")] == IGNORE_INDEX


def test_the_flip_keeps_each_second_view_with_its_target(tmp_path):
    cache, points = _two_view_cache(tmp_path)
    n = len(TARGETS)
    plain = CropDataset(cache, [1], points, TWO_VIEWS)[0]["crops"].numpy()
    flipped = CropDataset(cache, [1], points, TWO_VIEWS, augment=OFF.model_copy(update={"flip_p": 1.0}))[0]
    crops = flipped["crops"].numpy()
    left, right = _t(LEFT_FORAMEN, "l1_l2"), _t(RIGHT_FORAMEN, "l1_l2")
    # The left foramen's second view after the flip is the right foramen's, mirrored in-plane (axial)...
    np.testing.assert_array_equal(crops[n + left], plain[n + right][..., ::-1])
    np.testing.assert_array_equal(crops[n + right], plain[n + left][..., ::-1])
    # ... while its own (sagittal) crop is the right one's with the slices reversed.
    np.testing.assert_array_equal(crops[left], plain[right][::-1])
    spinal = _t(SPINAL, "l1_l2")
    np.testing.assert_array_equal(crops[n + spinal], plain[n + spinal][..., ::-1])
    plain_mask = CropDataset(cache, [1], points, TWO_VIEWS)[0]["mask"].numpy()
    np.testing.assert_array_equal(flipped["mask"].numpy(), plain_mask[flip_permutation()])


def test_each_crop_jitters_by_the_series_type_its_point_is_on(tmp_path):
    """Second views are cut on axial slices: an axial bound of 0 leaves them (and the subarticular crops) still
    while the sagittal crops move."""
    cache, points = _two_view_cache(tmp_path)
    n = len(TARGETS)
    plain = CropDataset(cache, [1], points, TWO_VIEWS)[0]["crops"].numpy()
    still_axial = OFF.model_copy(update={"jitter_px": 4.0, "jitter_px_by_series": {"Axial T2": 0.0}})
    crops = CropDataset(cache, [1], points, TWO_VIEWS, augment=still_axial, seed=1)[0]["crops"].numpy()
    axial = np.array([t >= n or "subarticular" in TARGETS[t] for t in range(2 * n)])
    np.testing.assert_array_equal(crops[axial], plain[axial])
    assert not np.array_equal(crops[_t(SPINAL, "l1_l2")], plain[_t(SPINAL, "l1_l2")])


def test_two_view_items_of_the_synthetic_studies(cache_env, labelled):
    study_ids, labels, frame = labelled
    one = CropDataset(cache_env.cache, study_ids[:3], frame, CROP, labels=labels[:3])
    two = CropDataset(cache_env.cache, study_ids[:3], frame, CROP.model_copy(update={"second_view": True}),
                      labels=labels[:3], augment=AugmentConfig(flip_p=0.0), seed=2)  # fmt: skip
    two.set_epoch(1)
    spinal = [_t(SPINAL, level) for level in LEVELS]
    for index in range(3):
        item = two[index]
        assert item["crops"].shape == (50, 3, 16, 16)
        present = np.abs(item["crops"].numpy()).reshape(50, -1).max(axis=1) > 0
        assert present[25:][spinal].any() and not present[25:][[_t(LEFT_SUB, lv) for lv in LEVELS]].any()
        assert (item["mask"].numpy() >= one[index]["mask"].numpy()).all()
