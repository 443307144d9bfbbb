"""Post-hoc calibration and blending of predicted probabilities, fitted on the official score, out of fold.

Three small tools and the discipline that makes their gains honest:

- :func:`apply_temperature` / :func:`fit_group_temperatures`: ``p_c ~ p_c ** (1 / T)`` with one temperature per
  condition group (``T < 1`` sharpens, ``T > 1`` flattens). A class-weighted model's spinal predictions are
  under-confident on real data (``T`` about 0.85, see ``docs/recipe-evidence.md``).
- :func:`apply_blend` / :func:`fit_blend_weights`: convex weights over K prediction arrays, per condition group.
- :func:`cross_fit`: fits on the other folds' studies and applies to each fold in turn. A temperature or a blend
  fitted on the very studies it is scored on flatters the CV; fitted out of fold it measures what a test set gets.
- :class:`Calibration` (a blend, then temperatures: what a registered model applies to its members' probabilities,
  stored in its contract) and :func:`calibrate_out_of_fold`, which fits it on every study and reports the
  cross-fitted scores beside the uncalibrated one.

Every fit minimises :func:`lumbar_ray.metrics.score_arrays` itself, not a proxy log loss: the metric weights rows
by their true class (1/2/4) and adds the any-severe-spinal term, which a plain log loss would miss.

The total score is a sum of separate functions of each group's columns: the foraminal and subarticular terms read
only their own columns, and the spinal and any-severe terms read only the spinal ones. So one 1-D fit (or one
simplex fit) per group, each minimising the TOTAL score with the other groups left as they are, gives the joint
optimum; fitting spinal by the total is what accounts for the any-severe term.

Cells without a prediction (NaN) must be unscored (:data:`IGNORE_INDEX`) in the labels given to a fit, as the
official metric drops unpredicted rows; :func:`lumbar_ray.metrics.score_arrays` refuses NaN in scored cells.
Pure numpy and scipy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from lumbar_ray.constants import GROUP_TARGET_INDICES, IGNORE_INDEX, TARGETS
from lumbar_ray.metrics import ScoreResult, score_arrays

logger = logging.getLogger(__name__)

GROUP_COLUMNS: dict[str, np.ndarray] = {group: np.array(columns) for group, columns in GROUP_TARGET_INDICES.items()}
"""The columns of the 25 targets that belong to each condition group."""

TEMPERATURE_BOUNDS: tuple[float, float] = (0.5, 2.0)
"""Search interval of a group temperature; real fitted values lie near 0.85-1.1."""

TEMPERATURE_TOLERANCE = 1e-3
"""Absolute tolerance of the fitted temperature: the score moves by about 1e-6 over such a step."""

BLEND_TOLERANCE = 1e-10
"""Stopping tolerance (on the score) of the simplex fit of blend weights."""

Params = TypeVar("Params")


# --- temperature


def apply_temperature(probs: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """Rescale probabilities by a temperature: ``p_c ** (1 / T)``, renormalised over the classes.

    Args:
        probs: ``(..., 3)`` probabilities (e.g. ``(n, 25, 3)``); NaN cells stay NaN, zeros stay zero.
        temperature: a scalar, or one value per cell broadcastable to ``probs.shape[:-1]`` (e.g. ``(25,)``, one per
            target, as :func:`target_temperatures` gives). ``T = 1`` is the identity, ``T < 1`` sharpens.

    Returns:
        The rescaled probabilities, float64, same shape; each row sums to 1.

    Raises:
        ValueError: if a temperature is not finite and positive.
    """
    probs = np.asarray(probs, dtype=np.float64)
    temperature = np.asarray(temperature, dtype=np.float64)
    if not (np.isfinite(temperature).all() and (temperature > 0).all()):
        raise ValueError(f"temperatures must be finite and positive, got {temperature}")
    with np.errstate(divide="ignore"):
        logits = np.log(probs) / temperature[..., None]
    # Shift by the row maximum so that exp cannot overflow for small temperatures.
    scaled = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return scaled / scaled.sum(axis=-1, keepdims=True)


def target_temperatures(group_temperatures: Mapping[str, float]) -> np.ndarray:
    """Per-group temperatures as one value per target, ``(25,)``; groups not given keep ``T = 1``.

    Raises:
        KeyError: on an unknown group name.
    """
    unknown = set(group_temperatures) - set(GROUP_COLUMNS)
    if unknown:
        raise KeyError(f"unknown condition group(s) {sorted(unknown)}; expected {list(GROUP_COLUMNS)}")
    per_target = np.ones(len(TARGETS))
    for group, temperature in group_temperatures.items():
        per_target[GROUP_COLUMNS[group]] = temperature
    return per_target


def apply_group_temperatures(probs: np.ndarray, group_temperatures: Mapping[str, float]) -> np.ndarray:
    """:func:`apply_temperature` with one temperature per condition group (``(n, 25, 3)`` probabilities)."""
    return apply_temperature(probs, target_temperatures(group_temperatures))


def _has_scored_cells(labels: np.ndarray, group: str) -> bool:
    return bool((labels[:, GROUP_COLUMNS[group]] != IGNORE_INDEX).any())


def _with_group_replaced(probs: np.ndarray, group: str, group_probs: np.ndarray) -> np.ndarray:
    """A copy of ``probs`` whose ``group`` columns are ``group_probs``."""
    replaced = probs.copy()
    replaced[:, GROUP_COLUMNS[group]] = group_probs
    return replaced


def _fit_one_temperature(labels: np.ndarray, probs: np.ndarray, group: str, bounds: tuple[float, float]) -> float:
    """The temperature of ``group`` that minimises the total score, the other groups left as they are."""
    group_probs = probs[:, GROUP_COLUMNS[group]]

    def total_at(temperature: float) -> float:
        rescaled = apply_temperature(group_probs, temperature)
        return score_arrays(labels, _with_group_replaced(probs, group, rescaled)).total

    result = minimize_scalar(total_at, bounds=bounds, method="bounded", options={"xatol": TEMPERATURE_TOLERANCE})
    if min(abs(result.x - bounds[0]), abs(result.x - bounds[1])) < 2 * TEMPERATURE_TOLERANCE:
        logger.warning("the %s temperature %.3f sits at the edge of its bounds %s", group, result.x, bounds)
    return float(result.x)


def fit_group_temperatures(
    labels: np.ndarray, probs: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> dict[str, float]:
    """One temperature per condition group that minimises the official score of ``probs``.

    Each group's temperature is a bounded 1-D search (tolerance :data:`TEMPERATURE_TOLERANCE`) on the TOTAL score
    with only that group's columns rescaled. The total is a sum of separate functions of the groups' columns, so
    these searches are independent and together minimise the total; the spinal one also counts the any-severe
    term, which reads the spinal P(severe).

    Args:
        labels: ``(n, 25)`` class ids, :data:`IGNORE_INDEX` for unscored cells (and for cells without a prediction).
        probs: ``(n, 25, 3)`` predictions aligned with ``labels``.
        bounds: the search interval of every temperature.

    Returns:
        ``{group: T}`` for ``spinal``, ``foraminal``, ``subarticular``; a group without scored cells gets 1.0.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    temperatures = {}
    for group in GROUP_COLUMNS:
        if not _has_scored_cells(labels, group):
            logger.warning("no scored %s cell; its temperature stays 1", group)
            temperatures[group] = 1.0
            continue
        temperatures[group] = _fit_one_temperature(labels, probs, group, bounds)
    logger.info("fitted group temperatures: %s", {group: round(t, 3) for group, t in temperatures.items()})
    return temperatures


# --- blending


def apply_blend(parts: Sequence[np.ndarray], weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Blend K prediction arrays in probability space with per-group convex weights.

    Args:
        parts: K arrays ``(n, 25, 3)``.
        weights: ``{group: (K,) weights}``; a part whose weight is 0 is not read for that group (it may be NaN
            there, e.g. a spinal-only model in the foraminal columns).

    Returns:
        ``(n, 25, 3)``: ``sum_k w_k p_k`` in each group's columns; NaN in the columns of a group absent from
        ``weights`` and in the cells where a weighted part has no prediction.

    Raises:
        ValueError: on parts of different shapes or a weight vector that does not have one weight per part.
    """
    parts = [np.asarray(part, dtype=np.float64) for part in parts]
    if len({part.shape for part in parts}) != 1:
        raise ValueError(f"parts must share one shape, got {[part.shape for part in parts]}")
    blended = np.full(parts[0].shape, np.nan)
    for group, group_weights in weights.items():
        group_weights = np.asarray(group_weights, dtype=np.float64)
        if group_weights.shape != (len(parts),):
            raise ValueError(f"{group} weights must have shape ({len(parts)},), got {group_weights.shape}")
        columns = GROUP_COLUMNS[group]
        blended[:, columns] = sum(w * part[:, columns] for w, part in zip(group_weights, parts, strict=True) if w > 0)
    return blended


def _parts_predicting(labels: np.ndarray, parts: Sequence[np.ndarray], group: str) -> list[int]:
    """Indices of the parts that predict every scored cell of ``group``; a part predicting none is left out.

    Raises:
        ValueError: if a part predicts some of the group's scored cells but not all.
    """
    columns = GROUP_COLUMNS[group]
    scored = labels[:, columns] != IGNORE_INDEX
    predicting = []
    for k, part in enumerate(parts):
        predicted = np.isfinite(part[:, columns]).all(axis=-1)[scored]
        if predicted.all():
            predicting.append(k)
        elif predicted.any():
            raise ValueError(f"part {k} predicts {predicted.sum()} of the {predicted.size} scored {group} cells; "
                             "unscore the cells some part lacks (labels = IGNORE_INDEX) before blending")  # fmt: skip
    return predicting


def _simplex_minimum(objective: Callable[[np.ndarray], float], k: int) -> np.ndarray:
    """The point of the K-simplex that minimises ``objective``, from the uniform weights (SLSQP)."""
    result = minimize(
        objective,
        x0=np.full(k, 1.0 / k),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"ftol": BLEND_TOLERANCE},
    )
    if not result.success:
        logger.warning("blend weight fit did not converge: %s", result.message)
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def _fit_group_weights(labels: np.ndarray, parts: Sequence[np.ndarray], group: str) -> np.ndarray:
    """The convex weights of ``group`` that minimise the total score, the other groups left as the equal mean."""
    weights = np.zeros(len(parts))
    predicting = _parts_predicting(labels, parts, group)
    if not predicting:
        raise ValueError(f"no part predicts the scored {group} cells")
    if len(predicting) == 1:
        weights[predicting] = 1.0
        return weights
    columns = GROUP_COLUMNS[group]
    group_parts = np.stack([parts[k][:, columns] for k in predicting])
    # The other groups' columns only add a constant to the total; any finite values will do.
    base = np.where(np.isfinite(parts[predicting[0]]), parts[predicting[0]], 1.0 / 3.0)

    def total_at(simplex_weights: np.ndarray) -> float:
        group_probs = np.tensordot(simplex_weights, group_parts, axes=1)
        return score_arrays(labels, _with_group_replaced(base, group, group_probs)).total

    weights[predicting] = _simplex_minimum(total_at, len(predicting))
    return weights


def fit_blend_weights(labels: np.ndarray, parts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Convex weights over K prediction arrays, one weight vector per condition group, minimising the score.

    The blend is a linear pool, ``sum_k w_k p_k``, in probability space rather than a log-linear pool:

    - it keeps the blend and the temperature separate knobs: a mixture of normalised rows is normalised, while a
      log-linear pool needs renormalising and its weights also set the sharpness (a temperature in disguise);
    - it is robust to one part's confident mistakes: ``-log(sum_k w_k p_k) <= -log(w_j p_j)`` for every part j,
      whereas a geometric pool inherits the worst part's near-zero probability;
    - the plain per-row mean of probabilities is what the published 4th-place blend did, so it is the baseline.

    Each group's weights minimise the TOTAL score with only that group's columns blended (independent problems,
    see the module docstring), by SLSQP on the simplex from the uniform weights.

    Args:
        labels: ``(n, 25)`` class ids, :data:`IGNORE_INDEX` for unscored cells.
        parts: K arrays ``(n, 25, 3)`` aligned with ``labels``. A part that predicts none of a group's scored
            cells (NaN there, e.g. a spinal-only model) gets weight 0 in that group.

    Returns:
        ``{group: (K,) weights}``, each non-negative and summing to 1.

    Raises:
        ValueError: if a part predicts only some of a group's scored cells, or no part predicts a group that has
            scored cells.
    """
    labels = np.asarray(labels)
    parts = [np.asarray(part, dtype=np.float64) for part in parts]
    weights = {}
    for group in GROUP_COLUMNS:
        if not _has_scored_cells(labels, group):
            logger.warning("no scored %s cell; its parts get equal weights", group)
            weights[group] = np.full(len(parts), 1.0 / len(parts))
            continue
        weights[group] = _fit_group_weights(labels, parts, group)
    logger.info("fitted blend weights: %s", {group: np.round(w, 3).tolist() for group, w in weights.items()})
    return weights


# --- out-of-fold fitting


@dataclass(frozen=True)
class CrossFit(Generic[Params]):
    """The result of :func:`cross_fit`.

    Attributes:
        probs: the out-of-fold predictions: each study's rows as given by the parameters fitted without its fold.
        params: the parameters fitted for each fold (on the other folds' studies), by fold id.
    """

    probs: np.ndarray
    params: dict[int, Params]


def cross_fit(
    labels: np.ndarray,
    fold_of: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], Params],
    apply: Callable[[Params, np.ndarray], np.ndarray],
) -> CrossFit[Params]:
    """Fit on the other folds and apply to each fold in turn, so that no study is scored by what it helped fit.

    Args:
        labels: ``(n, 25)`` class ids of all studies.
        fold_of: ``(n,)`` the fold id of each study.
        fit: ``fit(train_labels, train_rows) -> params``: the labels of the training studies only (so the
            held-out labels cannot leak in) and their row indices, to index the predictions it closes over.
        apply: ``apply(params, rows) -> predictions`` of the held-out row indices, first axis ``len(rows)``.

    Returns:
        The out-of-fold predictions (NaN-initialised, every row filled) and the parameters of each fold.

    Raises:
        ValueError: on misaligned inputs, fewer than two folds, or ``apply`` returning the wrong number of rows.

    Example:
        >>> oof = cross_fit(labels, folds, lambda y, rows: fit_group_temperatures(y, probs[rows]),
        ...                 lambda temps, rows: apply_group_temperatures(probs[rows], temps))
    """
    labels, fold_of = np.asarray(labels), np.asarray(fold_of)
    if len(fold_of) != len(labels):
        raise ValueError(f"fold_of has {len(fold_of)} entries for {len(labels)} studies")
    folds = np.unique(fold_of)
    if len(folds) < 2:
        raise ValueError("cross-fitting needs at least two folds")
    predictions, params = None, {}
    for fold in folds:
        held_out, training = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        params[int(fold)] = fit(labels[training], training)
        fold_predictions = np.asarray(apply(params[int(fold)], held_out))
        if len(fold_predictions) != len(held_out):
            raise ValueError(f"apply returned {len(fold_predictions)} rows for the {len(held_out)} of fold {fold}")
        if predictions is None:
            predictions = np.full((len(labels), *fold_predictions.shape[1:]), np.nan)
        predictions[held_out] = fold_predictions
        logger.debug("fold %s: fitted on %d studies, applied to %d", fold, len(training), len(held_out))
    return CrossFit(probs=predictions, params=params)


# --- the whole post-processing: a blend, then temperatures


@dataclass(frozen=True, eq=False)
class Calibration:
    """What turns K models' probabilities into one prediction: a blend, then a temperature per condition group.

    This is what a registered model applies to its members' fold-mean probabilities (and stores in its contract):
    ``apply_group_temperatures(apply_blend(parts, weights), temperatures)``.

    Attributes:
        weights: ``{group: (K,) convex weights}`` over the parts; one part with weight 1 is the identity.
        temperatures: ``{group: T}`` applied to the blend, or None (no temperature: T = 1).
    """

    weights: dict[str, np.ndarray]
    temperatures: dict[str, float] | None = None

    @classmethod
    def identity(cls, parts: int = 1) -> Calibration:
        """The plain mean of ``parts`` parts, no temperature (one part: the part itself)."""
        return cls({group: np.full(parts, 1.0 / parts) for group in GROUP_COLUMNS})

    @property
    def parts(self) -> int:
        """K, the number of parts the weights blend."""
        return len(next(iter(self.weights.values())))

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, 25, 3)`` float64: the blend of the K ``(n, 25, 3)`` parts, then the temperatures.

        Raises:
            ValueError: when the number of parts is not K.
        """
        if len(parts) != self.parts:
            raise ValueError(f"this calibration blends {self.parts} parts, got {len(parts)}")
        blended = apply_blend(parts, self.weights)
        return blended if self.temperatures is None else apply_group_temperatures(blended, self.temperatures)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for a model's contract); :meth:`from_json` reads it back."""
        weights = {group: [float(w) for w in weights] for group, weights in self.weights.items()}
        temperatures = None if self.temperatures is None else {g: float(t) for g, t in self.temperatures.items()}
        return {"weights": weights, "temperatures": temperatures}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """The calibration :meth:`to_json` wrote (extra keys, such as reported scores, are ignored).

        Raises:
            ValueError: when the weights do not name every condition group, or give them different part counts.
        """
        weights = {group: np.asarray(values, dtype=np.float64) for group, values in data["weights"].items()}
        if set(weights) != set(GROUP_COLUMNS) or len({len(w) for w in weights.values()}) != 1:
            raise ValueError(f"calibration weights must give every group {list(GROUP_COLUMNS)} one weight per part, "
                             f"got {data['weights']}")  # fmt: skip
        temperatures = data.get("temperatures")
        return cls(weights, None if temperatures is None else {g: float(t) for g, t in temperatures.items()})

    def __eq__(self, other: object) -> bool:  # arrays inside: compared through their JSON form
        if not isinstance(other, Calibration):
            return NotImplemented
        return self.to_json() == other.to_json()


def fit_calibration(labels: np.ndarray, parts: Sequence[np.ndarray], temperature: bool) -> Calibration:
    """Blend weights (:func:`fit_blend_weights`, when there are several parts) and, if ``temperature``, the
    temperatures of that blend (:func:`fit_group_temperatures`), all on the official score of ``labels``."""
    parts = [np.asarray(part, dtype=np.float64) for part in parts]
    weights = fit_blend_weights(labels, parts) if len(parts) > 1 else Calibration.identity().weights
    temperatures = fit_group_temperatures(labels, apply_blend(parts, weights)) if temperature else None
    return Calibration(weights, temperatures)


def cross_fit_calibration(
    labels: np.ndarray,
    fold_of: np.ndarray,
    parts: Sequence[np.ndarray],
    temperature: bool,
    applied_to: Sequence[np.ndarray] | None = None,
) -> CrossFit[Calibration]:
    """:func:`fit_calibration` on the other folds, applied to each fold in turn (see :func:`cross_fit`).

    Args:
        labels: ``(n, 25)`` class ids.
        fold_of: ``(n,)`` the fold of each study.
        parts: K ``(n, 25, 3)`` out-of-fold predictions the calibration is fitted on.
        temperature: also fit temperatures.
        applied_to: K ``(n, 25, 3)`` predictions each fold's calibration is applied to instead of ``parts``: e.g.
            the best-epoch predictions of the registered weights, when the calibration is fitted on the last
            epoch's (None: ``parts``).
    """
    parts = [np.asarray(part, dtype=np.float64) for part in parts]
    targets = parts if applied_to is None else [np.asarray(part, dtype=np.float64) for part in applied_to]
    if len(targets) != len(parts):
        raise ValueError(f"{len(targets)} parts to apply the calibration to, for {len(parts)} fitted")
    return cross_fit(
        labels,
        fold_of,
        fit=lambda train_labels, rows: fit_calibration(train_labels, [part[rows] for part in parts], temperature),
        apply=lambda calibration, rows: calibration.apply([part[rows] for part in targets]),
    )


@dataclass(frozen=True)
class OutOfFoldCalibration:
    """What :func:`calibrate_out_of_fold` found.

    Attributes:
        calibration: fitted on every study: what a registered model applies.
        scores: official scores on the same studies, each fold's predictions post-processed by parameters fitted
            without it: ``uncalibrated`` (the equal mean of the parts, as they are), ``blended`` (the fitted blend;
            several parts only) and ``calibrated`` (the fitted blend and temperatures; with temperatures only).
        probs: the cross-fitted predictions of the whole recipe (the last of ``scores``).
    """

    calibration: Calibration
    scores: dict[str, ScoreResult]
    probs: np.ndarray

    @property
    def gain(self) -> float:
        """The last cross-fitted total minus the uncalibrated one (negative: the post-processing helps)."""
        return list(self.scores.values())[-1].total - self.scores["uncalibrated"].total


def calibrate_out_of_fold(
    labels: np.ndarray, fold_of: np.ndarray, parts: Sequence[np.ndarray], temperature: bool
) -> OutOfFoldCalibration:
    """Fit a blend of ``parts`` (and temperatures) on every study, and measure it honestly by cross-fitting.

    Args:
        labels: ``(n, 25)`` class ids, :data:`IGNORE_INDEX` for unscored cells.
        fold_of: ``(n,)`` the CV fold of each study (the same folds the parts were predicted out of).
        parts: K ``(n, 25, 3)`` out-of-fold predictions of the same studies.
        temperature: fit a temperature per condition group on the blend.

    Raises:
        ValueError: with no part, or fewer than two folds.
    """
    if not parts:
        raise ValueError("nothing to calibrate: no part given")
    parts = [np.asarray(part, dtype=np.float64) for part in parts]
    uncalibrated = Calibration.identity(len(parts)).apply(parts)
    scores = {"uncalibrated": score_arrays(labels, uncalibrated)}
    probs = uncalibrated
    if len(parts) > 1 or temperature:
        crossed = cross_fit_calibration(labels, fold_of, parts, temperature)
        if len(parts) > 1:  # each fold's blend alone: the weights its calibration was fitted with
            blended = np.empty_like(crossed.probs)
            for fold, fitted in crossed.params.items():
                rows = np.asarray(fold_of) == fold
                blended[rows] = Calibration(fitted.weights).apply([part[rows] for part in parts])
            scores["blended"] = score_arrays(labels, blended)
        probs = crossed.probs
        if temperature:
            scores["calibrated"] = score_arrays(labels, probs)
    calibration = fit_calibration(labels, parts, temperature)
    logger.info("out of fold: %s", ", ".join(f"{name} {score.total:.5f}" for name, score in scores.items()))
    return OutOfFoldCalibration(calibration, scores, probs)
