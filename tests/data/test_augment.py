"""Augmentations of the 25 target crops: the left/right flip, the photometric part, the identity at zero strength,
the point jitter per series type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumbar_ray.config import AugmentConfig, ConfigError, load_config
from lumbar_ray.constants import CONDITION_SERIES, CONDITIONS, IGNORE_INDEX, LEVELS, TARGETS
from lumbar_ray.data.augment import (
    Augmenter,
    AugmentParams,
    axial_targets,
    flip_permutation,
    flip_slice_targets,
    flip_targets,
    jitter_bounds,
    mirror_crops,
)

N_LEVELS = len(LEVELS)
OFF = AugmentConfig(jitter_px=0, jitter_slices=0, rotate_deg=0, scale=0, brightness=0, contrast=0, gamma=0, flip_p=0)


def _index(condition: str, level: int) -> int:
    return CONDITIONS.index(condition) * N_LEVELS + level


def _item(seed: int = 0, missing: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crops (25, 5, 8, 8) in [0, 1] with distinct labels and a few missing targets (zero crops)."""
    rng = np.random.default_rng(seed)
    crops = rng.random((len(TARGETS), 5, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 3, len(TARGETS)).astype(np.int64)
    mask = np.ones(len(TARGETS), dtype=bool)
    mask[rng.choice(len(TARGETS), missing, replace=False)] = False
    crops[~mask] = 0.0
    labels[~mask] = IGNORE_INDEX
    return crops, labels, mask


def test_flip_permutation_swaps_sides_and_keeps_spinal():
    order = flip_permutation()
    np.testing.assert_array_equal(order[order], np.arange(len(TARGETS)))  # an involution
    for level in range(N_LEVELS):
        spinal = _index("spinal_canal_stenosis", level)
        assert order[spinal] == spinal
        for kind in ("neural_foraminal_narrowing", "subarticular_stenosis"):
            left, right = _index(f"left_{kind}", level), _index(f"right_{kind}", level)
            assert order[left] == right and order[right] == left
    axial = axial_targets()
    assert [TARGETS[i] for i in np.flatnonzero(axial)] == [t for t in TARGETS if "subarticular" in t]


def test_flip_twice_is_the_identity_bit_for_bit():
    crops, labels, mask = _item()
    once = flip_targets(crops, labels, mask)
    twice = flip_targets(*once)
    assert not np.array_equal(once[0], crops)
    for before, after in zip((crops, labels, mask), twice, strict=True):
        assert after.dtype == before.dtype
        np.testing.assert_array_equal(after, before)


def test_flip_moves_sided_crops_labels_and_masks_with_their_pixels():
    crops, labels, mask = _item(seed=1)
    mask[_index("left_neural_foraminal_narrowing", 3)] = False  # one sided target missing: its mask must move
    crops_f, labels_f, mask_f = flip_targets(crops, labels, mask)
    for level in range(N_LEVELS):
        spinal = _index("spinal_canal_stenosis", level)
        np.testing.assert_array_equal(crops_f[spinal], crops[spinal][::-1])  # slice axis reversed only
        assert labels_f[spinal] == labels[spinal] and mask_f[spinal] == mask[spinal]
        for kind, axial in (("neural_foraminal_narrowing", False), ("subarticular_stenosis", True)):
            for here, there in ((f"left_{kind}", f"right_{kind}"), (f"right_{kind}", f"left_{kind}")):
                a, b = _index(here, level), _index(there, level)
                # sagittal: the slice axis runs left-right; axial: the columns do
                expected = crops[b][..., ::-1] if axial else crops[b][::-1]
                np.testing.assert_array_equal(crops_f[a], expected)
                assert labels_f[a] == labels[b] and mask_f[a] == mask[b]
    assert not mask_f[_index("right_neural_foraminal_narrowing", 3)]
    assert np.shares_memory(crops_f, crops) is False  # inputs untouched


def test_mirror_crops_flips_each_study_of_a_batch_as_flip_targets_flips_one():
    """The model's test-time flip mirrors a batch with the same rule the data pipeline applies to one study."""
    batch = np.stack([_item(seed=seed)[0] for seed in (3, 4, 5)])
    mirrored = mirror_crops(torch.from_numpy(batch))
    assert mirrored.shape == batch.shape and mirrored.dtype == torch.float32
    for study, mirrored_study in zip(batch, mirrored.numpy(), strict=True):
        labels, mask = np.zeros(len(TARGETS), dtype=np.int64), np.ones(len(TARGETS), dtype=bool)
        np.testing.assert_array_equal(mirrored_study, flip_targets(study, labels, mask)[0])
    left = _index("left_subarticular_stenosis", 2)
    np.testing.assert_array_equal(mirrored[1, left].numpy(), batch[1, left + N_LEVELS][..., ::-1])
    torch.testing.assert_close(mirror_crops(mirrored), torch.from_numpy(batch), rtol=0, atol=0)


def test_flipped_slice_targets_still_point_at_the_labelled_slice():
    crops, labels, mask = _item(seed=3)
    rng = np.random.default_rng(3)
    slice_targets = rng.integers(0, crops.shape[1], len(TARGETS))
    slice_targets[~mask] = IGNORE_INDEX
    slice_targets[_index("left_subarticular_stenosis", 2)] = IGNORE_INDEX
    crops_f, _, _ = flip_targets(crops, labels, mask)
    flipped = flip_slice_targets(slice_targets, crops.shape[1])
    order = flip_permutation()
    for target in range(len(TARGETS)):
        source = order[target]
        if slice_targets[source] == IGNORE_INDEX:
            assert flipped[target] == IGNORE_INDEX
            continue
        # the slice the target now points at is the labelled slice's image (mirrored in-plane on axial crops)
        image = crops_f[target, flipped[target]]
        expected = crops[source, slice_targets[source]]
        np.testing.assert_array_equal(image, expected[..., ::-1] if axial_targets()[target] else expected)
    np.testing.assert_array_equal(flip_slice_targets(flipped, crops.shape[1]), slice_targets)  # an involution


def test_zero_strengths_are_the_identity():
    crops, labels, mask = _item(seed=2)
    augmenter = Augmenter(OFF)
    params = augmenter.sample(np.random.default_rng(5))
    assert not params.flip
    slices, xs, ys = np.arange(25), np.linspace(1, 50, 25), np.linspace(3, 40, 25)
    for before, after in zip((slices, xs, ys), Augmenter.jitter_points(slices, xs, ys, params), strict=True):
        np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(params.angle_deg, 0.0)
    np.testing.assert_array_equal(params.zoom, 1.0)
    out = augmenter.apply(crops, labels, mask, params)
    for before, after in zip((crops, labels, mask), out, strict=True):
        np.testing.assert_array_equal(after, before)


def test_sample_is_reproducible_and_respects_the_strengths():
    cfg = AugmentConfig(jitter_px=4.0, jitter_slices=2, rotate_deg=15.0, scale=0.2, flip_p=1.0)
    augmenter = Augmenter(cfg)
    a, b = augmenter.sample(np.random.default_rng(9)), augmenter.sample(np.random.default_rng(9))
    for field in ("shift_xy", "shift_slice", "angle_deg", "zoom", "brightness", "contrast", "gamma"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.flip is True
    assert np.abs(a.shift_xy).max() <= 4.0 and np.abs(a.shift_slice).max() <= 2
    assert np.abs(a.angle_deg).max() <= 15.0 and np.all((a.zoom >= 0.8) & (a.zoom <= 1.2))
    assert len(np.unique(a.angle_deg)) == len(TARGETS)  # drawn per target, not once per study


def test_brightness_shifts_each_target_by_its_own_amount():
    crops = np.full((len(TARGETS), 3, 4, 4), 0.5, dtype=np.float32)
    identity = AugmentParams.identity()
    brightness = np.linspace(-0.2, 0.2, len(TARGETS))
    params = AugmentParams(**{**identity.__dict__, "brightness": brightness})
    out = Augmenter.photometric(crops, params)
    np.testing.assert_allclose(out[:, 0, 0, 0], 0.5 + brightness, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_photometric_stays_in_unit_range_and_missing_targets_stay_zero(seed):
    crops, labels, mask = _item(seed=seed, missing=6)
    strong = AugmentConfig(brightness=0.6, contrast=0.9, gamma=0.9, flip_p=0.5)
    augmenter = Augmenter(strong)
    params = augmenter.sample(np.random.default_rng(seed))
    out, labels_out, mask_out = augmenter.apply(crops, labels, mask, params)
    assert out.dtype == np.float32 and out.shape == crops.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out[mask_out], (flip_targets(crops, labels, mask)[0] if params.flip else crops)[mask_out])
    assert np.all(out[~mask_out] == 0.0)
    assert np.all(labels_out[~mask_out] == IGNORE_INDEX)
    assert mask_out.sum() == mask.sum()


# --- the point jitter per series type


def _series_type(target: int) -> str:
    return CONDITION_SERIES[CONDITIONS[target // N_LEVELS]]


def test_default_jitter_draws_are_the_scalar_draws_of_before_bit_for_bit():
    """Per-target bounds (a numpy array) draw exactly what the one global bound drew: augmented items, and so every
    CV trained before the per-series bounds existed, are unchanged."""
    cfg = AugmentConfig()
    for seed in range(20):
        params = Augmenter(cfg).sample(np.random.default_rng([seed, 1, 3]))
        rng = np.random.default_rng([seed, 1, 3])
        shift_xy = rng.uniform(-cfg.jitter_px, cfg.jitter_px, size=(len(TARGETS), 2))
        shift_slice = rng.integers(-cfg.jitter_slices, cfg.jitter_slices + 1, size=len(TARGETS))
        angle_deg = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, size=len(TARGETS))
        np.testing.assert_array_equal(params.shift_xy, shift_xy)
        np.testing.assert_array_equal(params.shift_slice, shift_slice)
        np.testing.assert_array_equal(params.angle_deg, angle_deg)  # the stream after the jitter is the same too


def test_jitter_bounds_follow_the_series_type_each_target_is_read_on():
    cfg = AugmentConfig(jitter_px=3.0, jitter_slices=1, jitter_px_by_series={"Axial T2": 7.5},
                        jitter_slices_by_series={"Sagittal T1": 2, "Sagittal T2/STIR": 0})  # fmt: skip
    px, slices = jitter_bounds(cfg)
    for target in range(len(TARGETS)):
        series_type = _series_type(target)
        assert px[target] == (7.5 if series_type == "Axial T2" else 3.0), TARGETS[target]
        assert slices[target] == {"Sagittal T1": 2, "Sagittal T2/STIR": 0, "Axial T2": 1}[series_type]
    assert px.dtype == np.float64 and slices.dtype == np.int64
    global_px, global_slices = jitter_bounds(AugmentConfig(jitter_px=3.0, jitter_slices=1))
    np.testing.assert_array_equal(global_px, 3.0)
    np.testing.assert_array_equal(global_slices, 1)
    with pytest.raises(ValueError, match="25 targets"):
        jitter_bounds(cfg, n=5)


def test_per_series_jitter_moves_only_the_targets_of_that_series_type_within_its_bound():
    cfg = OFF.model_copy(
        update={"jitter_px_by_series": {"Axial T2": 5.0}, "jitter_slices_by_series": {"Sagittal T1": 2}}
    )
    augmenter = Augmenter(cfg)
    draws = [augmenter.sample(np.random.default_rng(seed)) for seed in range(200)]
    shift_xy = np.stack([d.shift_xy for d in draws])  # (draws, 25, 2)
    shift_slice = np.stack([d.shift_slice for d in draws])  # (draws, 25)
    types = np.array([_series_type(t) for t in range(len(TARGETS))])
    axial, foraminal = types == "Axial T2", types == "Sagittal T1"
    assert np.all(shift_xy[:, ~axial] == 0) and np.all(shift_slice[:, ~foraminal] == 0)  # the others: jitter 0
    assert np.abs(shift_xy[:, axial]).max() <= 5.0 and np.abs(shift_xy[:, axial]).max() > 4.5
    assert set(np.unique(shift_slice[:, foraminal])) == {-2, -1, 0, 1, 2}


def test_per_series_jitter_keys_are_checked():
    good = load_config(None, ["augment.jitter_px_by_series={Sagittal T2/STIR: 2.5, Axial T2: 4}"])
    assert good.augment.jitter_px_by_series == {"Sagittal T2/STIR": 2.5, "Axial T2": 4.0}
    with pytest.raises(ConfigError, match="jitter_px_by_series.*Axial T1"):
        load_config(None, ["augment.jitter_px_by_series={Axial T1: 2}"])
    with pytest.raises(ConfigError, match="jitter_slices_by_series.*non-negative"):
        load_config(None, ["augment.jitter_slices_by_series={Sagittal T1: -1}"])


# --- two views per target (crop.second_view): 50 crops, one rule per crop


def test_with_two_views_the_flip_swaps_sides_within_each_block_and_mirrors_every_second_view_in_plane():
    order, n = flip_permutation(2 * len(TARGETS)), len(TARGETS)
    np.testing.assert_array_equal(order[:n], flip_permutation())
    np.testing.assert_array_equal(order[n:], flip_permutation() + n)  # a second view stays a second view
    axial = axial_targets(2 * n)
    np.testing.assert_array_equal(axial[:n], axial_targets())
    assert axial[n:].all()  # every second view is cut on the level's axial slices
    with pytest.raises(ValueError, match="blocks of the 25 targets"):
        flip_permutation(30)
    with pytest.raises(ValueError, match="blocks of the 25 targets"):
        axial_targets(3 * n)


def test_with_two_views_a_flipped_item_pairs_each_second_view_with_its_mirror_targets():
    first, labels, mask = _item(seed=3)
    second, _, second_mask = _item(seed=4, missing=10)
    crops, crop_mask = np.concatenate([first, second]), np.concatenate([mask, second_mask])
    flipped, flipped_labels, flipped_mask = flip_targets(crops, labels, crop_mask)
    n = len(TARGETS)
    for level in range(N_LEVELS):
        left, right = (_index(f"{side}_neural_foraminal_narrowing", level) for side in ("left", "right"))
        np.testing.assert_array_equal(flipped[left], crops[right][::-1])  # sagittal: the slice axis reverses
        np.testing.assert_array_equal(flipped[n + left], crops[n + right][..., ::-1])  # axial: the columns
        assert flipped_mask[n + left] == crop_mask[n + right] and flipped_labels[left] == labels[right]
    np.testing.assert_array_equal(flipped_labels, flip_targets(first, labels, mask)[1])  # labels stay 25 wide
    np.testing.assert_array_equal(flipped_mask[:n], mask[flip_permutation()])
    twice = flip_targets(flipped, flipped_labels, flipped_mask)
    for before, after in zip((crops, labels, crop_mask), twice, strict=True):
        np.testing.assert_array_equal(after, before)  # still an involution, bit for bit
    batch = torch.from_numpy(np.stack([crops, crops[::-1].copy()]))
    np.testing.assert_array_equal(mirror_crops(batch)[0].numpy(), flipped)  # the network's rule is the same one


def test_with_two_views_each_crop_jitters_by_the_series_type_it_is_cut_on():
    cfg = AugmentConfig(jitter_px=3.0, jitter_slices=1, jitter_px_by_series={"Axial T2": 7.5},
                        jitter_slices_by_series={"Sagittal T1": 2, "Sagittal T2/STIR": 0})  # fmt: skip
    px, slices = jitter_bounds(cfg, 2 * len(TARGETS))
    one_px, one_slices = jitter_bounds(cfg)
    np.testing.assert_array_equal(px[: len(TARGETS)], one_px)
    np.testing.assert_array_equal(slices[: len(TARGETS)], one_slices)
    np.testing.assert_array_equal(px[len(TARGETS) :], 7.5)  # second views: the axial bounds, whatever the target
    np.testing.assert_array_equal(slices[len(TARGETS) :], 1)
    params = Augmenter(cfg).sample(np.random.default_rng(0), 2 * len(TARGETS))
    assert params.shift_xy.shape == (50, 2) and params.zoom.shape == (50,)
    assert np.abs(params.shift_slice[len(TARGETS) :]).max() <= 1
    assert (np.abs(params.shift_xy) <= px[:, None]).all() and np.abs(params.shift_xy[len(TARGETS) :]).max() > 3.0
