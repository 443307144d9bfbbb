"""Figures logged with every CV run: confusion matrices, a condition x level score map and training curves.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no global figure
registry, no backend switch at import time, nothing to close, and safe in Ray workers without a display
(``Figure.savefig`` renders with Agg by itself). The numbers behind each figure come from small pure functions
(:func:`confusion_counts`, :func:`level_scores`) that are tested on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lumbar_ray.constants import CONDITIONS, IGNORE_INDEX, LEVELS, SEVERITIES, SEVERITY_WEIGHTS
from lumbar_ray.metrics import weighted_log_loss

logger = logging.getLogger(__name__)

_N_CLASSES = len(SEVERITIES)
_SHORT_CLASSES = ("normal/mild", "moderate", "severe")
_WEIGHTS = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_targets = len(CONDITIONS) * len(LEVELS)
    if labels.ndim != 2 or labels.shape[1] != n_targets or probs.shape != (*labels.shape, _N_CLASSES):
        raise ValueError(f"expected labels (n, {n_targets}) and probs (n, {n_targets}, 3), got {labels.shape} "
                         f"and {probs.shape}")  # fmt: skip
    return labels, probs


def confusion_counts(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per condition, counts of (true class, argmax predicted class) over the scored cells.

    Args:
        labels: ``(n, 25)`` class ids in TARGETS order, :data:`IGNORE_INDEX` where unscored.
        probs: ``(n, 25, 3)`` probabilities.

    Returns:
        ``(5, 3, 3)`` int64 counts, indexed ``[condition, true, predicted]``.
    """
    labels, probs = _check(labels, probs)
    predicted = probs.argmax(axis=-1)
    counts = np.zeros((len(CONDITIONS), _N_CLASSES, _N_CLASSES), dtype=np.int64)
    for c in range(len(CONDITIONS)):
        columns = slice(c * len(LEVELS), (c + 1) * len(LEVELS))
        true, pred = labels[:, columns].ravel(), predicted[:, columns].ravel()
        scored = true != IGNORE_INDEX
        flat = np.bincount(true[scored] * _N_CLASSES + pred[scored], minlength=_N_CLASSES * _N_CLASSES)
        counts[c] = flat.reshape(_N_CLASSES, _N_CLASSES)
    return counts


def level_scores(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per target, the metric's weighted log loss (weights by true class, clipped, not renormalised).

    Returns:
        ``(5, 5)`` float64 indexed ``[condition, level]``; NaN where a target has no scored cell.
    """
    labels, probs = _check(labels, probs)
    scores = np.full(labels.shape[1], np.nan)
    for t in range(labels.shape[1]):
        scored = labels[:, t] != IGNORE_INDEX
        if not scored.any():
            continue
        true = labels[scored, t]
        scores[t] = weighted_log_loss(probs[scored, t, true], _WEIGHTS[true])
    return scores.reshape(len(CONDITIONS), len(LEVELS))


def _short(condition: str) -> str:
    """``left_neural_foraminal_narrowing`` -> ``left foraminal``: titles that fit a small panel."""
    words = condition.split("_")
    side = [w for w in words if w in ("left", "right")]
    kind = {"spinal": "spinal canal", "neural": "foraminal", "subarticular": "subarticular"}
    name = next(kind[w] for w in words if w in kind)
    return " ".join([*side, name])


def confusion_matrices(labels: np.ndarray, probs: np.ndarray) -> Figure:
    """One panel per condition: argmax prediction against the label over the scored cells.

    Cells show counts; colours are row-normalised (recall per true class) so rare severe rows stay visible.
    """
    counts = confusion_counts(labels, probs)
    figure = Figure(figsize=(3.2 * len(CONDITIONS), 3.6), layout="constrained")
    axes = figure.subplots(1, len(CONDITIONS))
    for ax, condition, matrix in zip(axes, CONDITIONS, counts, strict=True):
        totals = matrix.sum(axis=1, keepdims=True)
        rates = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
        ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(col, row, str(value), ha="center", va="center", color="white" if rates[row, col] > 0.5 else "k")
        ax.set_title(_short(condition), fontsize=10)
        ax.set_xticks(range(_N_CLASSES), _SHORT_CLASSES, fontsize=8, rotation=30)
        ax.set_yticks(range(_N_CLASSES), _SHORT_CLASSES, fontsize=8)
        ax.set_xlabel("predicted")
    axes[0].set_ylabel("true")
    return figure


def level_score_heatmap(labels: np.ndarray, probs: np.ndarray) -> Figure:
    """Condition x level map of the weighted log loss (see :func:`level_scores`); lower is better."""
    scores = level_scores(labels, probs)
    figure = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(scores, cmap="viridis")
    for (row, col), value in np.ndenumerate(scores):
        ax.text(col, row, "n/a" if np.isnan(value) else f"{value:.3f}", ha="center", va="center", color="w")
    ax.set_xticks(range(len(LEVELS)), [level.upper().replace("_", "/") for level in LEVELS])
    ax.set_yticks(range(len(CONDITIONS)), [_short(condition) for condition in CONDITIONS])
    ax.set_title("weighted log loss per target")
    figure.colorbar(image, ax=ax)
    return figure


def _series(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(entry.get(key, np.nan)) for entry in history])


def training_curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Training and validation loss (left) and the validation score (right) per epoch.

    Args:
        history: one metrics dict per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_score``; absent
            keys are drawn as gaps).
    """
    figure = Figure(figsize=(9.0, 3.6), layout="constrained")
    loss_ax, score_ax = figure.subplots(1, 2)
    epochs = np.array([entry.get("epoch", i) for i, entry in enumerate(history)], dtype=float)
    for key in ("train_loss", "val_loss"):
        loss_ax.plot(epochs, _series(history, key), marker="o", label=key)
    scores = _series(history, "val_score")
    score_ax.plot(epochs, scores, marker="o", color="C2", label="val_score")
    if np.isfinite(scores).any():
        best = int(np.nanargmin(scores))
        score_ax.axvline(epochs[best], color="0.6", linestyle="--", label=f"best (epoch {epochs[best]:g})")
    for ax, title in ((loss_ax, "loss"), (score_ax, "validation score (lower is better)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return figure


def overlay_panels(predicted: Any, truth: Any) -> list[tuple[int, int, list, list]]:
    """What :func:`localisation_overlay` draws: per series shown, the slice and the points on it.

    One panel per series that holds a labelled point, on the slice holding most labelled points of that series;
    predicted points of that series are drawn when they lie within one slice of it.

    Returns:
        ``(series_id, slice, predicted [(x, y, target)], labelled [(x, y, target)])`` per panel.
    """
    panels = []
    for series_id, group in truth.groupby("series_id", sort=True):
        slice_index = int(group["slice"].value_counts().idxmax())
        labelled = [(float(r.x), float(r.y), int(r.target)) for r in group.itertuples() if r.slice == slice_index]
        near = predicted[(predicted["series_id"] == series_id) & ((predicted["slice"] - slice_index).abs() <= 1)]
        panels.append((int(series_id), slice_index, [(float(r.x), float(r.y), int(r.target)) for r in
                                                     near.itertuples()], labelled))  # fmt: skip
    return panels


def localisation_overlay(study_id: int, predicted: Any, truth: Any, cache: Any) -> Figure:
    """Predicted (red crosses) vs labelled (green circles) points on a study's series, one panel per series.

    Args:
        study_id: the study.
        predicted: its POINTS rows predicted.
        truth: its POINTS rows labelled.
        cache: the :class:`~lumbar_ray.data.cache.SeriesCache` holding the series.
    """
    panels = overlay_panels(predicted, truth)
    figure = Figure(figsize=(3.6 * max(1, len(panels)), 3.9), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, max(1, len(panels))))
    for ax, (series_id, slice_index, predicted_points, labelled_points) in zip(axes, panels, strict=False):
        entry = cache.read(study_id, series_id, mmap=True)
        ax.imshow(np.asarray(entry.volume[slice_index]), cmap="gray")
        if labelled_points:
            xs, ys, _ = zip(*labelled_points, strict=True)
            ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="lime", label="labelled")
        if predicted_points:
            xs, ys, _ = zip(*predicted_points, strict=True)
            ax.scatter(xs, ys, s=40, marker="x", color="red", label="predicted")
        description = entry.meta.series_description
        ax.set_title(f"{series_id if description is None else description} slice {slice_index}", fontsize=9)
        ax.set_axis_off()
        ax.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"study {study_id}: predicted vs labelled points")
    return figure


def reliability_diagram(table: Any) -> Figure:
    """Predicted against observed frequency per condition group and class, from
    :func:`lumbar_ray.metrics.calibration_table` (the diagonal is perfect calibration)."""
    groups = list(dict.fromkeys(table["group"]))
    figure = Figure(figsize=(4.2 * max(len(groups), 1), 4.0), layout="constrained")
    axes = figure.subplots(1, max(len(groups), 1), squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=1)
        for c, severity in enumerate(SEVERITIES):
            rows = table[(table["group"] == group) & (table["severity"] == severity)]
            ax.plot(rows["predicted"], rows["observed"], marker="o", markersize=3, label=_SHORT_CLASSES[c])
        ax.set(title=group, xlabel="predicted (class weights undone)", ylabel="observed", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    return figure
