"""Localisation quality: predicted points against the labelled ones, per series type and level.

For every ``(study, target)`` with both a labelled and a predicted point: whether the prediction lies on the
labelled series and slice, and its in-plane distance in cache pixels and in millimetres (through each slice's own
PixelSpacing and the cache's resize factor). For axial targets a slice on another series or stack that holds the
labelled point as closely as the labelled slice does (a coincident plane) also counts as right; the error of a
prediction on another series is the patient-space distance; ``plane_error_mm`` is the labelled point's distance
from the predicted slice's plane (an axial slice of the right level is close). Pure pandas/numpy.

The same errors, measured on held-out studies, size the classifier's training jitter per series type
(:func:`jitter_from_errors`, :func:`jitter_values`): training points then stray from the labels as far as the
points inference will see do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.constants import CONDITION_SERIES, LEVELS, TARGETS, series_slug
from lumbar_ray.data.cache import CachedSeries
from lumbar_ray.localize.geometry import cache_point_to_patient, plane_distance

logger = logging.getLogger(__name__)

THRESHOLDS = (5.0, 10.0)
JITTER_QUANTILE = 0.9  # the share of held-out localisation errors the training jitter reaches
COINCIDENT_MM = 0.5
# An axial slice shows the labelled level when the labelled point lies this close to its plane: well inside half
# the distance between two discs (27-40 mm), and beyond the 2-3 slices an axial block holds either side.
LEVEL_REACH_MM = 12.0
ERROR_COLUMNS = ("study_id", "target", "series_type", "level", "slice_correct", "slice_error", "error_px", "error_mm",
                 "plane_error_mm")  # fmt: skip


def _target_parts(target: int) -> tuple[str, str]:
    name = TARGETS[int(target)]
    condition, level = name[: -len("_l1_l2")], name[-len("l1_l2") :]
    return CONDITION_SERIES[condition], level


def point_errors(
    predicted: pd.DataFrame, truth: pd.DataFrame, series_of: Callable[[int, int], CachedSeries]
) -> pd.DataFrame:
    """One row per target placed in both frames: slice correctness and in-plane error.

    Args:
        predicted: POINTS frame of the predictions.
        truth: POINTS frame of the labels.
        series_of: ``(study_id, series_id) -> CachedSeries`` (metadata suffices), e.g. a cached reader.

    Returns:
        Columns ``study_id, target, series_type, level, slice_correct, slice_error`` (slices apart; NaN across
        series), ``error_px, error_mm`` (in-plane; for a prediction on another series, such as a second axial
        stack, the patient-space distance, in the labelled slice's pixels for ``error_px``).
    """
    merged = truth.merge(predicted, on=["study_id", "target"], suffixes=("_true", "_pred"))
    rows = []
    for row in merged.itertuples(index=False):
        series_type, level = _target_parts(row.target)
        study_id, true_slice, pred_slice = int(row.study_id), int(row.slice_true), int(row.slice_pred)
        true_entry = series_of(study_id, int(row.series_id_true))
        pred_entry = series_of(study_id, int(row.series_id_pred))
        point = cache_point_to_patient(true_entry, true_slice, float(row.x_true), float(row.y_true))
        plane_error = plane_distance(pred_entry, pred_slice, point)  # how far the labelled point is from the slice
        same_series = int(row.series_id_true) == int(row.series_id_pred)
        correct = same_series and true_slice == pred_slice
        if same_series:
            slice_error = float(abs(pred_slice - true_slice))
            delta = np.array([row.x_pred - row.x_true, row.y_pred - row.y_true])
            error_px = float(np.hypot(*delta))
            error_mm = float(np.hypot(*(delta * true_entry.mm_per_pixel(true_slice))))
        else:  # another series (a second axial stack): compare in patient space
            guess = cache_point_to_patient(pred_entry, pred_slice, float(row.x_pred), float(row.y_pred))
            slice_error = np.nan
            error_mm = float(np.linalg.norm(guess - point))
            error_px = error_mm / float(np.mean(true_entry.mm_per_pixel(true_slice)))
            if series_type == "Axial T2":  # a coincident plane of the other stack is as right as the labelled one
                labelled = plane_distance(true_entry, true_slice, point)
                correct = plane_error <= labelled + COINCIDENT_MM
        rows.append((study_id, int(row.target), series_type, level, bool(correct), slice_error, error_px, error_mm,
                     plane_error))  # fmt: skip
    return pd.DataFrame(rows, columns=list(ERROR_COLUMNS))


def summarise_errors(errors: pd.DataFrame) -> pd.DataFrame:
    """Per series type and level (and ``all`` levels): points, slice accuracy (exact, and within one slice: the
    2.5D crops span several), ``level_right`` (the labelled point within :data:`LEVEL_REACH_MM` of the predicted
    slice's plane: on Axial T2, the right level), shares within 5/10 px and mm.

    A point on the wrong series counts as outside every threshold.
    """
    errors = errors.assign(slice_within_1=errors["slice_correct"] | (errors["slice_error"].fillna(np.inf) <= 1),
                           level_right=errors["plane_error_mm"] <= LEVEL_REACH_MM)  # fmt: skip
    frames = [errors, errors.assign(level="all")]
    groups = pd.concat(frames).groupby(["series_type", "level"], sort=False)
    out = groups.agg(
        points=("target", "size"),
        slice_accuracy=("slice_correct", "mean"),
        slice_within_1=("slice_within_1", "mean"),
        level_right=("level_right", "mean"),
    )
    for threshold in THRESHOLDS:
        tag = f"{threshold:g}"
        out[f"within_{tag}px"] = groups["error_px"].apply(lambda e, t=threshold: float((e.fillna(np.inf) <= t).mean()))
        out[f"within_{tag}mm"] = groups["error_mm"].apply(lambda e, t=threshold: float((e.fillna(np.inf) <= t).mean()))
    order = {level: i for i, level in enumerate((*LEVELS, "all"))}
    out = out.reset_index()
    return out.sort_values(["series_type", "level"], key=lambda c: c.map(order) if c.name == "level" else c)


def summary_metrics(summary: pd.DataFrame, prefix: str = "loc") -> dict[str, float]:
    """Flat MLflow metric names, e.g. ``loc.sagittal_t2_stir.l1_l2.within_10px``."""
    metrics = {}
    for row in summary.to_dict("records"):
        slug = series_slug(row["series_type"])
        for key, value in row.items():
            if key not in ("series_type", "level"):
                metrics[f"{prefix}.{slug}.{row['level']}.{key}"] = float(value)
    return metrics


def jitter_from_errors(
    errors: pd.DataFrame, quantile: float = JITTER_QUANTILE
) -> tuple[dict[str, float], dict[str, int]]:
    """Training-jitter bounds per series type from a localiser's errors on held-out studies.

    Args:
        errors: :func:`point_errors` of predictions on studies the detectors never saw (``series_type``,
            ``error_px``, ``slice_error``; other columns are ignored).
        quantile: the share of the measured errors the bounds reach.

    Returns:
        ``(px_by_series, slices_by_series)``, the values of ``augment.jitter_px_by_series`` and
        ``augment.jitter_slices_by_series``: per series type, the ``quantile`` of the in-plane error (cache
        pixels, rounded to 0.001), and the fewest slices that reach at least that share of the slice errors.
        Slice errors across series (NaN: a prediction on another stack) are left out; a series type without any
        measured error is left out (it keeps ``jitter_px`` and ``jitter_slices``). The in-plane bound is the
        quantile of the distance, and the jitter draws each axis within it: a jittered point strays up to the
        measured distance along either axis.

    Raises:
        ValueError: ``quantile`` outside (0, 1].
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    px_by_series: dict[str, float] = {}
    slices_by_series: dict[str, int] = {}
    for series_type, group in errors.groupby("series_type", sort=True):
        in_plane = group["error_px"].dropna().to_numpy(dtype=np.float64)
        if len(in_plane):
            px_by_series[str(series_type)] = round(float(np.quantile(in_plane, quantile)), 3)
        slices = group["slice_error"].dropna().abs().to_numpy(dtype=np.float64)
        if len(slices):
            slices_by_series[str(series_type)] = int(np.quantile(slices, quantile, method="inverted_cdf"))
    return px_by_series, slices_by_series


def jitter_values(errors: pd.DataFrame, quantile: float = JITTER_QUANTILE) -> dict[str, Any]:
    """:func:`jitter_from_errors` as config values: ``load_config(values=jitter_values(errors))`` trains with the
    measured jitter (dotted key -> value; an empty mapping sets nothing)."""
    px_by_series, slices_by_series = jitter_from_errors(errors, quantile)
    values: dict[str, Any] = {}
    if px_by_series:
        values["augment.jitter_px_by_series"] = px_by_series
    if slices_by_series:
        values["augment.jitter_slices_by_series"] = slices_by_series
    return values
