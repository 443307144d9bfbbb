"""The U-Net's samples from the cache: which slices a training set keeps, the 2.5D slabs and class maps at the
input size, and the targets of each source (anatomy masks, label-point maps) read from a real cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import SegmentConfig
from lumbar_ray.segment.data import (
    POINT_CLASSES,
    SeriesTarget,
    build_samples,
    level_classes,
    offset_point_classes,
    point_target,
    sagittal_series,
    select_slices,
    series_rng,
    series_targets,
)


def _target(study: int, series: int, n: int = 10, size: int = 32, foreground: tuple[int, ...] = (2, 3, 4)):
    volume = np.arange(n, dtype=np.uint8)[:, None, None].repeat(size, 1).repeat(size, 2) * 20
    target = np.zeros((n, size, size), np.uint8)
    for index in foreground:
        target[index, 8:16, 8:24] = 1 + index % 3
    return SeriesTarget(study, series, "Sagittal T1", volume, target)


def test_training_keeps_every_slice_with_foreground_and_a_seeded_share_of_the_others():
    item = _target(1, 2, n=23, foreground=(0, 5, 6))  # 20 empty slices
    kept = select_slices(item.target, 0.25, series_rng(0, 1, 2))
    assert {0, 5, 6} <= set(kept) and len(kept) == 3 + 5 and list(kept) == sorted(kept)
    np.testing.assert_array_equal(kept, select_slices(item.target, 0.25, series_rng(0, 1, 2)))
    others = [tuple(select_slices(item.target, 0.25, series_rng(seed, 1, 2))) for seed in range(1, 6)]
    assert any(other != tuple(kept) for other in others)  # the seed draws which empty slices
    assert list(select_slices(item.target, 0.0, series_rng(0, 1, 2))) == [0, 5, 6]
    assert len(select_slices(item.target, 1.0, series_rng(0, 1, 2))) == 23


def test_samples_are_uint8_slabs_and_nearest_class_maps_at_the_input_size():
    cfg = SegmentConfig(image_size=16, in_slices=3, empty_fraction=0.0, channels=(4, 8), strides=(2,))
    targets = [_target(1, 10), _target(2, 20, foreground=(9,))]
    samples = build_samples(targets, cfg)
    assert len(samples) == 4 and samples.keys == [(1, 10), (2, 20)]
    assert samples.inputs.shape == (4, 3, 16, 16) and samples.inputs.dtype == np.uint8
    assert samples.targets.shape == (4, 16, 16) and samples.targets.dtype == np.uint8
    assert samples.series.tolist() == [0, 0, 0, 1] and samples.slices.tolist() == [2, 3, 4, 9]
    assert samples.inputs[3, :, 0, 0].tolist() == [160, 180, 180]  # slice 9 is the last: clamped
    assert set(np.unique(samples.targets)) == {0, 1, 2, 3}  # nearest: no class made up between two others
    assert (samples.targets[0] == 3).sum() == 4 * 8  # the 8 x 16 box at half the size
    counts = samples.class_counts(4)
    assert counts.sum() == samples.targets.size and counts[1] == (samples.targets == 1).sum()
    every = build_samples(targets, cfg, every_slice=True)
    assert len(every) == 20 and every.slices.tolist() == list(range(10)) * 2


def test_point_maps_draw_the_canal_on_t2_and_both_foramina_on_t1_by_level():
    # targets: 0..4 the canal at l1_l2..l5_s1, 5..9 left foramina, 10..14 right, 15.. subarticular
    points = pd.DataFrame({"study_id": 1, "series_id": 2, "target": [0, 4, 5, 14, 16],
                           "slice": [1, 1, 0, 2, 1], "x": [5.0, 20.0, 5.0, 20.0, 12.0],
                           "y": [5.0, 20.0, 5.0, 20.0, 12.0]})  # fmt: skip
    t2 = point_target(points, "Sagittal T2/STIR", 3, 32, 2.0)
    assert t2[1, 5, 5] == 1 and t2[1, 20, 20] == 5 and not t2[0].any() and not t2[2].any()
    assert t2[1, 12, 12] == 0  # the subarticular point is an axial target: not drawn
    t1 = point_target(points, "Sagittal T1", 3, 32, 2.0)
    assert t1[0, 5, 5] == 6 and t1[2, 20, 20] == 10 and not t1[1].any()  # l1_l2 left -> 6, l5_s1 right -> 10
    assert (t1[0] == 6).sum() == 13  # a disc of radius 2 pixels
    assert POINT_CLASSES[6] == "foramen_l1_l2" and POINT_CLASSES[5] == "canal_l5_s1"
    np.testing.assert_array_equal(offset_point_classes(np.array([0, 1, 5]), "Sagittal T1"), [0, 6, 10])
    np.testing.assert_array_equal(level_classes(t1, "Sagittal T1")[0, 5, 5], 1)  # back to the level map
    np.testing.assert_array_equal(level_classes(np.array([0, 1, 5, 6, 10]), "Sagittal T1"), [0, 0, 0, 1, 5])
    np.testing.assert_array_equal(level_classes(np.array([0, 1, 5, 6, 10]), "Sagittal T2/STIR"), [0, 1, 5, 0, 0])
    with pytest.raises(KeyError):
        offset_point_classes(np.array([1]), "Axial T2")


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    """Three synthetic studies with masks, their sagittal series cached at 64 px without Ray."""
    from lumbar_ray.config import PreprocessConfig, SynthConfig, cache_settings
    from lumbar_ray.data.cache import SeriesCache, manifest_row
    from lumbar_ray.data.crops import points_from_coordinates
    from lumbar_ray.data.preprocess import process_row, series_items
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.data.synthetic import write_dataset

    synth = SynthConfig(train_studies=3, test_studies=0, seed=5, image_sizes=[96], missing_series_rate=0, masks=True)
    root = write_dataset(tmp_path_factory.mktemp("masked") / "rsna", synth).root
    preprocess = PreprocessConfig(image_size=64)
    cache = SeriesCache(tmp_path_factory.mktemp("cache"), cache_settings(preprocess))
    cache.prepare()
    rows = []
    for item in series_items(root, splits=["train"]):
        if item["series_description"].startswith("Sagittal"):
            assert process_row(item, cache, preprocess)["status"] == "done"
            rows.append(manifest_row(cache.read_meta(item["study_id"], item["series_id"])))
    cache.write_manifest(pd.DataFrame(rows))
    data = load_rsna(root)
    return root, cache, data, points_from_coordinates(data.coordinates, cache, data.train_series).points


def test_targets_of_a_real_cache_from_masks_and_from_label_points(masked_cache):
    root, cache, data, points = masked_cache
    series = sagittal_series(data.train_series, data.train["study_id"], cache.cached_keys())
    assert len(series) == 6 and set(series["series_description"]) == {"Sagittal T1", "Sagittal T2/STIR"}
    one_study = sagittal_series(data.train_series, [int(series["study_id"][0])], cache.cached_keys())
    assert one_study["study_id"].nunique() == 1 and len(one_study) == 2
    from_masks = series_targets(cache, series, SegmentConfig(), root)
    for item in from_masks:
        assert item.target.shape == item.volume.shape == cache.read(item.study_id, item.series_id).volume.shape
    present = set(np.unique(np.concatenate([item.target.ravel() for item in from_masks])))
    assert {0, 1, 2, 3, 4} <= present <= set(range(6))  # vertebra, disc, canal, foramen (+ lesions)
    t2 = next(item for item in from_masks if item.description == "Sagittal T2/STIR")
    assert (t2.target == 3).any() and (t2.target == 2).any()  # the canal and the discs on the mid-line series
    from_points = series_targets(cache, series, SegmentConfig(source="points", radius_px=3.0), points=points)
    assert [(t.study_id, t.series_id) for t in from_points] == [(t.study_id, t.series_id) for t in from_masks]
    for item in from_points:
        own = points[(points["series_id"] == item.series_id)]
        offset = 0 if item.description == "Sagittal T2/STIR" else 5
        wanted = {1 + offset + int(t) % 5 for t in own["target"] if (t < 5) == (offset == 0) and t < 15}
        assert set(np.unique(item.target)) - {0} == wanted
    with pytest.raises(ValueError, match="spider"):
        series_targets(cache, series, SegmentConfig(source="spider"))
    without_points = series_targets(cache, series, SegmentConfig(source="points"), points=points.iloc[:0])
    assert without_points == []  # an empty map would teach that the structures are background
