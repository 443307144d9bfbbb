"""From a detector's raw boxes to exactly one point per spinal level, ordered head to feet.

A detector can miss a level, report one twice, or swap two. The anatomy fixes all three: the five disc levels
L1/L2 ... L5/S1 follow each other along the spine, cranial to caudal, at roughly even spacing. So instead of
dropping a study with an imperfect detection (the seed approach lost ~8 % of studies), :func:`resolve_levels`

1. keeps, per level, the most confident detection;
2. drops detections that break the cranio-caudal order (the less confident of a conflicting pair goes);
3. drops the levels beyond a gap far longer than the others (:func:`_regular_chain`): a detector that names
   the T12/L1 disc "L1/L2" (the discs above L1 look alike, and the field of view may or may not show them) leaves
   a gap of two discs to the next level, and the side of the gap with fewer levels (the cranial one on a tie:
   levels are counted from the sacrum) is the one that slipped;
4. drops an end level whose spacing to its neighbour breaks the chain's regularity by more than ``END_GAP`` when
   its detection is weaker than the chain's median (:func:`_trusted_ends`): T12/L1 or a vertebral body taken for
   the top disc has nothing above it to contradict it;
5. fills a missing level by linear interpolation between its nearest kept neighbours, or extrapolation from the
   two nearest on one side (one kept level alone: the median spacing of a lumbar spine, ``default_spacing``),
   with confidence 0 so that callers can see and count what was filled.

Pure numpy; coordinates are whatever the caller uses (cache pixels on one sagittal series: rows grow caudally).

Every sagittal localiser (the YOLO detector of :mod:`lumbar_ray.localize.detector`, the segmentation localiser of
:mod:`lumbar_ray.segment.post`) reports raw per-slice detections (:data:`DETECTION_COLUMNS`) and shares the rules
that turn them into one point per target (:func:`resolve_targets`): the targets a series type carries
(:func:`detector_targets`, split by side with :func:`side_groups`), the provisional Sagittal T1 side of a slice
(:func:`provisional_target`), one detection per target from the slab of slices it shows on (:func:`slab_centre`),
then :func:`resolve_levels` per side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lumbar_ray.constants import CONDITION_SERIES, CONDITIONS, LEVELS

DETECTION_COLUMNS = ("target", "slice", "x", "y", "confidence")
"""A localiser's raw detections: ``target`` (index into TARGETS), ``slice``, ``x``, ``y`` (cache pixels, pixel
centres), ``confidence``; any number per target and slice."""
LOCATE_COLUMNS = ("target", "slice", "x", "y", "confidence", "filled")
"""Exactly one row per target of a series type (:func:`resolve_targets`)."""


@dataclass(frozen=True)
class LevelPoints:
    """One point per level in :data:`LEVELS` order.

    Attributes:
        xy: ``(5, 2)`` (x, y) per level.
        slice: ``(5,)`` slice index per level (float: filled levels interpolate it too).
        confidence: ``(5,)`` the detection's confidence, 0 where the level was filled.
        filled: ``(5,)`` whether the level was filled from its neighbours.
        dropped: number of detections discarded (duplicates or out of order).
    """

    xy: np.ndarray
    slice: np.ndarray
    confidence: np.ndarray
    filled: np.ndarray
    dropped: int


def _ordered_subset(levels: np.ndarray, ys: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Boolean mask over kept detections (one per level, sorted by level) that leaves y increasing with level.

    The less confident member of each out-of-order pair is removed until the order holds (greedy, at most five).
    """
    keep = np.ones(len(levels), dtype=bool)
    while True:
        index = np.flatnonzero(keep)
        bad = [(index[i], index[i + 1]) for i in range(len(index) - 1) if ys[index[i + 1]] <= ys[index[i]]]
        if not bad:
            return keep
        first, second = bad[0]
        keep[first if confidence[first] < confidence[second] else second] = False


LONG_GAP = 1.6
"""A gap between consecutive kept levels longer than this many times the median gap per level is a slipped count."""


def _regular_chain(levels: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Boolean mask over ordered kept levels that drops the shorter side of each overly long gap (see the module
    docstring), keeping at least two levels."""
    keep = np.ones(len(levels), dtype=bool)
    while keep.sum() >= 3:
        index = np.flatnonzero(keep)
        per_level = np.linalg.norm(np.diff(xy[index], axis=0), axis=1) / np.diff(levels[index])
        long = np.flatnonzero(per_level > LONG_GAP * np.median(per_level))
        if not len(long):
            break
        gap = int(long[0]) if len(long) == 1 else int(long[np.argmax(per_level[long])])
        above, below = index[: gap + 1], index[gap + 1 :]
        drop = above if len(above) <= len(below) else below
        if keep.sum() - len(drop) < 2:
            break
        keep[drop] = False
    return keep


END_GAP = 1.3
"""An end level whose gap to its neighbour differs from the chain's median gap per level by more than this factor
(either way), on a detection less confident than the chain's median, is refilled by extrapolation instead."""


def _trusted_ends(levels: np.ndarray, xy: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Boolean mask over ordered kept levels that drops an end level whose spacing breaks the chain's regularity
    on a weak detection (from four levels on: the other gaps' median needs two or more to be worth trusting).

    An end level has one neighbour only, so an end detection on the wrong structure (T12/L1 taken for L1/L2, the
    vertebral body next to a disc) is caught neither by the order nor by the long-gap rule; the chain's own
    spacing, extrapolated, places it better. At least three levels stay.
    """
    keep = np.ones(len(levels), dtype=bool)
    if len(levels) < 4:
        return keep
    per_level = np.linalg.norm(np.diff(xy, axis=0), axis=1) / np.diff(levels)
    weak = confidence < np.median(confidence)
    for end, gap, others in ((0, per_level[0], per_level[1:]), (len(levels) - 1, per_level[-1], per_level[:-1])):
        ratio = gap / np.median(others)
        if weak[end] and not 1 / END_GAP <= ratio <= END_GAP and keep.sum() > 3:
            keep[end] = False
    return keep


def resolve_levels(
    level: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    slice_index: np.ndarray,
    confidence: np.ndarray,
    default_spacing: float = 30.0,
) -> LevelPoints:
    """Exactly one point per level from raw detections (see the module docstring).

    Args:
        level: ``(n,)`` level index 0..4 of each detection.
        x: ``(n,)`` column of each detection.
        y: ``(n,)`` row (grows towards the feet).
        slice_index: ``(n,)`` slice each detection lies on.
        confidence: ``(n,)`` detector confidence.
        default_spacing: row distance between adjacent levels when only one level is detected.

    Raises:
        ValueError: if there is no detection at all (nothing to anchor the spine), or a level is out of range.
    """
    level = np.asarray(level, dtype=np.int64)
    if level.size == 0:
        raise ValueError("no level detected: the spine cannot be placed")
    if level.min() < 0 or level.max() >= len(LEVELS):
        raise ValueError(f"level indices must be in 0..{len(LEVELS) - 1}, got {sorted(set(level.tolist()))}")
    values = np.stack([np.asarray(a, dtype=np.float64) for a in (x, y, slice_index, confidence)], axis=1)
    best = {}
    for i, lvl in enumerate(level):
        if lvl not in best or values[i, 3] > values[best[lvl], 3]:
            best[lvl] = i
    chosen_levels = np.array(sorted(best))
    rows = values[[best[lvl] for lvl in chosen_levels]]
    keep = _ordered_subset(chosen_levels, rows[:, 1], rows[:, 3])
    chosen_levels, rows = chosen_levels[keep], rows[keep]
    regular = _regular_chain(chosen_levels, rows[:, :2])
    known_levels, known = chosen_levels[regular], rows[regular]
    trusted = _trusted_ends(known_levels, known[:, :2], known[:, 3])
    known_levels, known = known_levels[trusted], known[trusted]
    dropped = len(level) - len(known_levels)

    n = len(LEVELS)
    out = np.full((n, 4), np.nan)
    out[known_levels] = known
    filled = np.isnan(out[:, 0])
    if len(known_levels) == 1:
        step = np.array([0.0, default_spacing, 0.0])
        for lvl in np.flatnonzero(filled):
            out[lvl, :3] = known[0, :3] + (lvl - known_levels[0]) * step
    else:
        for column in range(3):  # np.interp holds the ends flat: extrapolate them linearly instead
            out[filled, column] = _interp_extrap(np.flatnonzero(filled), known_levels, known[:, column])
    out[filled, 3] = 0.0
    return LevelPoints(out[:, :2], out[:, 2], out[:, 3], filled, dropped)


def _interp_extrap(at: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear through ``(xs, ys)``, extended linearly beyond both ends (``xs`` sorted, >= 2 points)."""
    result = np.interp(at, xs, ys)
    low, high = at < xs[0], at > xs[-1]
    result[low] = ys[0] + (at[low] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    result[high] = ys[-1] + (at[high] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return result


# ------------------------------------------------------------------------------ the targets of a sagittal series


def detector_targets(description: str) -> list[int]:
    """Target indices (into :data:`TARGETS`) whose points a localiser on ``description`` series finds.

    Raises:
        ValueError: for a series type no condition is read on.
    """
    targets = [ci * len(LEVELS) + li for ci, condition in enumerate(CONDITIONS)
               if CONDITION_SERIES[condition] == description for li in range(len(LEVELS))]  # fmt: skip
    if not targets:
        raise ValueError(f"no condition is read on {description!r} series")
    return targets


def side_groups(description: str) -> list[list[int]]:
    """A series type's targets split into runs of five levels (one per side on T1, one on T2)."""
    targets = detector_targets(description)
    return [targets[start : start + len(LEVELS)] for start in range(0, len(targets), len(LEVELS))]


def provisional_target(description: str, level: int, slice_index: int, n_slices: int, left_first: bool) -> int:
    """The target of a detection of level ``level`` (0..4; a larger class index is taken modulo five) on slice
    ``slice_index`` of a ``description`` volume.

    On Sagittal T1 a left and a right foramen look alike on their own slices, so the side here is provisional: the
    half of the slab (the centre slice going with the first half, slice 0 on the patient's left when
    ``left_first``); :func:`lumbar_ray.localize.study.localise_study` sides every T1 detection again from its
    patient-space x against the canal, which an off-centre field of view or a scoliosis does not fool.
    """
    groups = side_groups(description)
    level = level % len(LEVELS)
    if len(groups) == 1:
        return groups[0][level]
    first, second = groups if left_first else groups[::-1]
    return (first if slice_index <= (n_slices - 1) / 2 else second)[level]


# --------------------------------------------------------------------------- from detections to one point per target


def slab_centre(detections: pd.DataFrame, keep: float = 0.5) -> dict[str, float]:
    """One detection of one target from its detections on all slices: the centre of the slab it shows on.

    A structure is usually seen on several neighbouring slices with about the same confidence (the canal on
    the five mid-line slices of a Sagittal T2), so the single most confident slice is a coin toss among them,
    while the labelled slice is the middle one. So: take each slice's best detection, grow a run of adjacent
    slices from the most confident one while the confidence stays at least ``keep`` of that peak, and return
    the confidence-weighted mean slice and position of the run, with the peak confidence.

    Args:
        detections: rows of one target (``slice``, ``x``, ``y``, ``confidence``).
        keep: fraction of the peak confidence a slice needs to belong to the slab.
    """
    best = detections.sort_values("confidence").groupby("slice").tail(1).set_index("slice").sort_index()
    peak = best["confidence"].idxmax()
    threshold = keep * best.at[peak, "confidence"]
    run = [peak]
    for step in (-1, 1):
        index = peak + step
        while index in best.index and best.at[index, "confidence"] >= threshold:
            run.append(index)
            index += step
    slab = best.loc[sorted(run)]
    weights = slab["confidence"].to_numpy()
    return {
        "target": int(detections["target"].iloc[0]),
        "slice": float(np.average(slab.index.to_numpy(), weights=weights)),
        "x": float(np.average(slab["x"], weights=weights)),
        "y": float(np.average(slab["y"], weights=weights)),
        "confidence": float(best.at[peak, "confidence"]),
    }


def resolve_side(detections: pd.DataFrame, group: list[int], n_slices: int) -> list[tuple]:
    """One :data:`LOCATE_COLUMNS` row per target of ``group`` (five levels of one side) from that side's
    detections: per target the centre of its slab (:func:`slab_centre`), then :func:`resolve_levels`. A side
    without any detection gets NaN points, confidence 0 and ``filled`` True."""
    here = detections[detections["target"].isin(group)]
    if here.empty:
        return [(target, np.nan, np.nan, np.nan, 0.0, True) for target in group]
    slabs = pd.DataFrame([slab_centre(frame) for _, frame in here.groupby("target")])
    level = slabs["target"].map({target: index for index, target in enumerate(group)}).to_numpy()
    points = resolve_levels(level, slabs["x"].to_numpy(), slabs["y"].to_numpy(), slabs["slice"].to_numpy(),
                            slabs["confidence"].to_numpy())  # fmt: skip
    slices = np.clip(np.rint(points.slice), 0, n_slices - 1).astype(int)  # filled levels interpolate slices
    return [
        (target, int(slices[i]), float(points.xy[i, 0]), float(points.xy[i, 1]), float(points.confidence[i]),
         bool(points.filled[i]))
        for i, target in enumerate(group)
    ]  # fmt: skip


def resolve_targets(detections: pd.DataFrame, description: str, n_slices: int) -> pd.DataFrame:
    """Exactly one point per target of ``description`` (TARGETS order) from a localiser's raw detections.

    Each side's detections are resolved on their own (:func:`resolve_side`).

    Args:
        detections: :data:`DETECTION_COLUMNS` rows (targets of other series types are ignored).
        description: the series type.
        n_slices: slices of the volume they come from.

    Returns:
        :data:`LOCATE_COLUMNS`: ``slice`` int (float NaN only for a side without detections), ``filled`` bool.
    """
    rows = []
    for group in side_groups(description):
        rows.extend(resolve_side(detections, group, n_slices))
    frame = pd.DataFrame(rows, columns=list(LOCATE_COLUMNS))
    if frame["slice"].notna().all():
        frame["slice"] = frame["slice"].astype("int64")
    return frame.astype({"target": "int64", "filled": "bool"})
