"""Raw level detections to one ordered point per level: duplicates, order breaks and gaps resolved, none dropped;
the rules every sagittal localiser shares (targets per series type, provisional T1 side, slab centre)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.localize.levels import (
    LOCATE_COLUMNS,
    detector_targets,
    provisional_target,
    resolve_levels,
    resolve_targets,
    side_groups,
    slab_centre,
)

T2, T1 = "Sagittal T2/STIR", "Sagittal T1"

TRUE_Y = np.array([100.0, 130.0, 160.0, 190.0, 220.0])
TRUE_X = np.array([50.0, 52.0, 54.0, 56.0, 58.0])


def test_perfect_detections_pass_through():
    out = resolve_levels(np.arange(5), TRUE_X, TRUE_Y, np.full(5, 7), np.full(5, 0.9))
    np.testing.assert_allclose(out.xy, np.stack([TRUE_X, TRUE_Y], 1))
    assert not out.filled.any() and out.dropped == 0 and np.all(out.slice == 7)


def test_duplicate_keeps_the_confident_one_and_gaps_are_interpolated_and_extrapolated():
    levels = np.array([0, 1, 1, 3])  # L1/L2, L2/L3 twice, L4/L5; L3/L4 and L5/S1 missing
    xs = np.array([50.0, 52.0, 90.0, 56.0])
    ys = np.array([100.0, 130.0, 300.0, 190.0])
    conf = np.array([0.9, 0.8, 0.3, 0.7])
    out = resolve_levels(levels, xs, ys, np.array([7, 7, 9, 8]), conf)
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)  # 160 between, 220 beyond the last at the same spacing
    np.testing.assert_allclose(out.xy[:, 0], TRUE_X)
    np.testing.assert_array_equal(out.filled, [False, False, True, False, True])
    np.testing.assert_allclose(out.confidence, [0.9, 0.8, 0.0, 0.7, 0.0])
    np.testing.assert_allclose(out.slice, [7, 7, 7.5, 8, 8.5])
    assert out.dropped == 1


def test_out_of_order_detection_is_replaced_by_the_anatomy():
    ys = TRUE_Y.copy()
    ys[2] = 95.0  # L3/L4 detected above L1/L2: impossible
    conf = np.array([0.9, 0.9, 0.4, 0.9, 0.9])
    out = resolve_levels(np.arange(5), TRUE_X, ys, np.zeros(5), conf)
    assert out.filled[2] and out.dropped == 1
    assert out.xy[2, 1] == pytest.approx(160.0)
    assert np.all(np.diff(out.xy[:, 1]) > 0)


def test_single_level_uses_the_default_spacing_and_nothing_is_an_error():
    out = resolve_levels(np.array([4]), np.array([58.0]), np.array([220.0]), np.array([3]), np.array([0.5]),
                         default_spacing=30.0)  # fmt: skip
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)
    assert out.filled.sum() == 4
    with pytest.raises(ValueError, match="no level detected"):
        resolve_levels(np.array([], int), [], [], [], [])
    with pytest.raises(ValueError, match="level indices"):
        resolve_levels(np.array([5]), [1.0], [1.0], [0], [1.0])


def test_random_damage_always_gives_five_ordered_levels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        keep = rng.random(5) < 0.6
        if not keep.any():
            keep[rng.integers(5)] = True
        levels = np.flatnonzero(keep)
        ys = TRUE_Y[levels] + rng.normal(0, 3, len(levels))
        out = resolve_levels(levels, TRUE_X[levels], ys, np.zeros(len(levels)), rng.random(len(levels)))
        assert out.xy.shape == (5, 2) and np.all(np.isfinite(out.xy))
        assert np.all(np.diff(out.xy[:, 1]) > 0)


def test_a_count_that_slipped_to_the_disc_above_l1_is_refilled_from_the_levels_below():
    """The detector called the T12/L1 disc (one spacing above L1/L2) "L1/L2": a gap of two discs to L2/L3."""
    ys = TRUE_Y.copy()
    ys[0] = TRUE_Y[0] - 30.0
    out = resolve_levels(np.arange(5), TRUE_X, ys, np.full(5, 7), np.full(5, 0.9))
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)  # extrapolated back to where L1/L2 is
    np.testing.assert_array_equal(out.filled, [True, False, False, False, False])
    assert out.dropped == 1


def test_two_slipped_levels_go_and_a_regular_lordotic_chain_stays():
    ys = TRUE_Y.copy()
    ys[:2] = TRUE_Y[:2] - 30.0  # L1/L2 and L2/L3 each one disc up
    out = resolve_levels(np.arange(5), TRUE_X, ys, np.full(5, 7), np.full(5, 0.9))
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)
    np.testing.assert_array_equal(out.filled, [True, True, False, False, False])
    curved = np.array([100.0, 128.0, 160.0, 186.0, 210.0])  # spacing varying by 20 %: anatomy, not a slip
    kept = resolve_levels(np.arange(5), TRUE_X, curved, np.full(5, 7), np.full(5, 0.9))
    assert not kept.filled.any()


def test_a_weak_end_detection_off_the_chains_spacing_is_refilled_and_a_confident_one_stays():
    """L1/L2 detected half a level too high (on the vertebral body above), less confident than the rest."""
    ys = TRUE_Y.copy()
    ys[0] = TRUE_Y[0] - 15.0  # gap 45 against 30: too short for the long-gap rule, too long for a regular chain
    conf = np.array([0.2, 0.8, 0.9, 0.8, 0.7])
    out = resolve_levels(np.arange(5), TRUE_X, ys, np.full(5, 7), conf)
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)
    np.testing.assert_array_equal(out.filled, [True, False, False, False, False])
    confident = resolve_levels(np.arange(5), TRUE_X, ys, np.full(5, 7), np.full(5, 0.9))
    assert not confident.filled.any() and confident.xy[0, 1] == pytest.approx(ys[0])
    short_end = TRUE_Y.copy()
    short_end[4] = TRUE_Y[4] - 10.0  # L5/S1 squeezed towards L4/L5 on a weak detection
    out = resolve_levels(np.arange(5), TRUE_X, short_end, np.full(5, 7), conf[::-1])
    np.testing.assert_allclose(out.xy[:, 1], TRUE_Y)
    three = resolve_levels(np.arange(3), TRUE_X[:3], ys[:3], np.full(3, 7), conf[:3])  # too few to judge
    assert not three.filled[:3].any()


def test_slab_centre_is_the_middle_of_the_run_around_the_peak():
    # The canal seen on slices 5..9 at about the same confidence, a weak stray on 12 (not adjacent to the run).
    detections = pd.DataFrame(
        {
            "target": 0,
            "slice": [5, 6, 7, 7, 8, 9, 12],
            "x": [50.0, 50.0, 50.0, 10.0, 50.0, 50.0, 80.0],
            "y": [40.0] * 7,
            "confidence": [0.8, 0.82, 0.8, 0.2, 0.81, 0.8, 0.3],
        }
    )
    centre = slab_centre(detections)
    assert centre["slice"] == pytest.approx(7.0, abs=0.02)
    assert centre["x"] == pytest.approx(50.0) and centre["confidence"] == pytest.approx(0.82)
    assert slab_centre(detections.assign(confidence=[0.1, 0.1, 0.9, 0.2, 0.2, 0.1, 0.3]))["slice"] == 7.0


def test_provisional_t1_side_is_the_volume_half_and_t2_has_one_side():
    left, right = side_groups(T1)
    assert left + right == detector_targets(T1) and side_groups(T2) == [detector_targets(T2)]
    assert provisional_target(T1, 2, 1, 11, left_first=True) == left[2]
    assert provisional_target(T1, 7, 1, 11, left_first=True) == left[2]  # a 10-class index taken per level
    assert provisional_target(T1, 2, 9, 11, left_first=True) == right[2]
    assert provisional_target(T1, 2, 9, 11, left_first=False) == left[2]
    assert provisional_target(T1, 2, 5, 11, left_first=True) == left[2]  # the centre slice goes with the first half
    assert provisional_target(T2, 3, 10, 11, left_first=False) == detector_targets(T2)[3]


def test_resolve_targets_gives_one_row_per_target_from_each_targets_slab():
    canal = detector_targets(T2)
    # Levels 0, 1, 3, 4 seen on slices 6-8 (confidence peaking on 7), level 2 not at all; a stray T1 target ignored.
    rows = [(canal[level], s, 40.0 + s, 20.0 + 15.0 * level, 1.0 - 0.2 * abs(s - 7))
            for level in (0, 1, 3, 4) for s in (6, 7, 8)]  # fmt: skip
    rows.append((detector_targets(T1)[0], 7, 5.0, 5.0, 0.99))
    located = resolve_targets(pd.DataFrame(rows, columns=["target", "slice", "x", "y", "confidence"]), T2, 15)
    assert list(located.columns) == list(LOCATE_COLUMNS) and located["target"].tolist() == canal
    assert located["slice"].dtype == np.int64 and (located["slice"] == 7).all()
    np.testing.assert_allclose(located["y"], 20.0 + 15.0 * np.arange(5))
    np.testing.assert_allclose(located["x"], 47.0)
    assert located["filled"].tolist() == [False, False, True, False, False]
    assert located.loc[2, "confidence"] == 0.0 and located.loc[0, "confidence"] == pytest.approx(1.0)
