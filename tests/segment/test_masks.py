"""Label volumes and point maps on the cache grid: matched by instance number, pixel-centre aligned like the
cache's own mapping, and in agreement with the label coordinates of the synthetic data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import PreprocessConfig
from lumbar_ray.constants import LEVELS
from lumbar_ray.data.cache import CachedSeries, SeriesMeta, SliceTable, StackMeta
from lumbar_ray.data.dicom import read_series
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.volume import preprocess_series
from lumbar_ray.segment import labels as lab
from lumbar_ray.segment import masks


def _entry(numbers: list[int], shape: tuple[int, int], size: int) -> CachedSeries:
    """A cached sagittal series built by hand: one stack, slices with these instance numbers and DICOM shape."""
    n = len(numbers)
    orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    scale = (size / shape[0], size / shape[1])
    slices = SliceTable(tuple(numbers), (0,) * n, tuple((float(i), 0.0, 0.0) for i in range(n)), (orientation,) * n,
                        ((1.0, 1.0),) * n, (shape,) * n, (scale,) * n, (False,) * n, tuple(map(float, range(n))),
                        tuple(f"{k}.dcm" for k in numbers))  # fmt: skip
    meta = SeriesMeta(size, (0.0, 1.0), (StackMeta(0, n, orientation, (1.0, 0.0, 0.0)),), slices, {}, (),
                      study_id=5, series_id=6, split="train", series_description="Sagittal T1")  # fmt: skip
    return CachedSeries(np.zeros((n, size, size), np.uint8), meta)


@pytest.mark.parametrize("size", [64, 13])  # growing and shrinking
def test_masks_follow_instance_numbers_and_the_caches_pixel_centres(size):
    rows, cols = 20, 24
    labels = np.arange(3 * rows * cols, dtype=np.int16).reshape(3, rows, cols)  # every pixel its own value
    entry = _entry([3, 1, 2], (rows, cols), size)  # the cache's order is not the file's
    got = masks.cache_masks(labels, np.array([1, 2, 3]), entry)
    assert got.shape == (3, size, size) and got.dtype == np.int16
    for index, number in enumerate([3, 1, 2]):
        source = labels[number - 1]
        for yc in range(size):
            for xc in range(size):  # the original pixel whose area holds this cache pixel's centre
                _, x, y = entry.cache_to_original(index, xc, yc)
                assert got[index, yc, xc] == source[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))]
        if size > cols:  # growing: each original pixel centre lands on a cache pixel showing that pixel
            for y in range(rows):
                for x in range(cols):
                    xc, yc = entry.original_to_cache_at(index, x, y)
                    assert got[index, round(yc), round(xc)] == source[y, x]


def test_a_slice_without_a_mask_or_of_another_shape_is_an_error():
    entry = _entry([1, 2, 3], (8, 8), 16)
    with pytest.raises(ValueError, match="study 5 series 6: instance 3"):
        masks.cache_masks(np.zeros((2, 8, 8), np.int16), np.array([1, 2]), entry)
    with pytest.raises(ValueError, match="is \\(8, 9\\)"):
        masks.cache_masks(np.zeros((3, 8, 9), np.int16), np.array([1, 2, 3]), entry)
    with pytest.raises(ValueError, match="repeat"):
        masks.cache_masks(np.zeros((3, 8, 8), np.int16), np.array([1, 1, 3]), entry)


def test_reading_a_missing_or_broken_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="study 1 series 2.*2.npz"):
        masks.read_series_labels(tmp_path, "train", 1, 2)
    path = lab.mask_file(tmp_path, "train", 1, 2)
    path.parent.mkdir(parents=True)
    np.savez(path, labels=np.zeros((2, 4, 4), np.int16))
    with pytest.raises(ValueError, match=r"2\.npz: lacks \['instance_number'\]"):
        masks.read_series_labels(tmp_path, "train", 1, 2)


def test_point_maps_draw_a_disc_of_the_levels_class():
    points = np.array([[1, 5.0, 6.0, 2], [0, 0.0, 0.0, 4]])
    got = masks.point_maps(points, n_slices=3, size=12, radius_px=2.0)
    assert got.dtype == np.uint8 and got.shape == (3, 12, 12)
    assert (got[1] == 3).sum() == 13 and got[1, 6, 5] == 3 and got[1, 6, 8] == 0  # 13 pixel centres within 2 px
    assert (got[0] == 5).sum() == 6 and not got[2].any()  # a quarter disc in the corner
    assert masks.POINT_MAP_CLASSES[3] == LEVELS[2]
    with pytest.raises(ValueError, match="slice 3"):
        masks.point_maps(np.array([[3, 1.0, 1.0, 0]]), 3, 12, 2.0)
    with pytest.raises(ValueError, match="level 5"):
        masks.point_maps(np.array([[0, 1.0, 1.0, 5]]), 3, 12, 2.0)


def test_every_labelled_point_lies_in_its_structure_on_the_cache_grid(masked_dir):
    """The synthetic coordinates, mapped to the cache like training maps them, fall in their structure's mask."""
    data = load_rsna(masked_dir)
    checked = 0
    for (study, series), rows in data.coordinates.groupby(["study_id", "series_id"]):
        dicom = read_series(masked_dir / "train_images" / str(study) / str(series))
        volume, meta = preprocess_series(dicom, PreprocessConfig(image_size=80))
        entry = CachedSeries(volume, dataclasses.replace(meta, study_id=study, series_id=series, split="train"))
        if not rows["condition"].str.contains("Spinal|Foraminal").any():
            continue
        on_grid = masks.dataset_masks(masked_dir, entry)
        points = masks.series_points(rows, entry)
        maps = masks.point_maps(points, len(volume), 80, 3.0)
        for (index, x, y, level), condition in zip(points, rows["condition"], strict=True):
            k = lab.bottom_index(LEVELS[int(level)])
            structure = (
                lab.CANAL if condition.startswith("Spinal") else lab.foramen_value(k, condition.split()[0].lower())
            )
            assert lab.footprint(on_grid[int(index), round(y), round(x)], structure), (study, series, condition)
            assert maps[int(index), round(y), round(x)] == level + 1
            checked += 1
    assert checked >= 2 * 15  # canal and both foramina at five levels, two studies


def test_series_points_read_the_files_level_titles():
    entry = _entry([1, 2], (10, 10), 20)
    rows = pd.DataFrame({"instance_number": [2, 1], "x": [4.5, 0.0], "y": [2.0, 9.0], "level": ["L5/S1", "l1_l2"]})
    np.testing.assert_allclose(masks.series_points(rows, entry), [[1, 9.5, 4.5, 4], [0, 0.5, 18.5, 0]])
    with pytest.raises(KeyError, match="L6/S1"):
        masks.series_points(rows.assign(level="L6/S1"), entry)
