"""The official score of the RSNA 2024 lumbar spine competition, plus submission checks and conversions.

The score is the mean of four sample-weighted log losses (see ``docs/rsna.md``):

1. ``spinal``, 2. ``foraminal``, 3. ``subarticular``: 3-class log loss over the scored rows of each group,
   each row weighted by its TRUE class (1 normal/mild, 2 moderate, 4 severe);
4. ``any_severe_spinal``: one binary row per study; label 1 if any scored spinal level is severe, prediction =
   the maximum over those levels of P(severe) (not renormalised), weight = the largest weight of those levels.

Predictions are clipped to ``[eps, 1 - eps]`` with ``eps = np.finfo(np.float64).eps`` and are NOT
renormalised. This matches the installed scikit-learn (1.5+ only warns when rows do not sum to one; 1.2-1.4
renormalised the clipped rows, which the Kaggle metric inherited). On the reference file, whose rows sum to 1
to six decimals, the two variants differ by less than 1e-8 on every term, far below the published 5 decimals;
for rows that sum to 1 exactly they agree to rounding. :func:`validate_submission` is where rows that do not
sum to 1 are caught or renormalised explicitly, before scoring.

Rows whose label is empty are not scored. The any-severe term uses only the scored spinal rows of a study (a
study without any scored spinal row has no any-severe row), exactly as the Kaggle metric did: it grouped the
rows of the solution file, which holds the scored rows only, and aligned the submission to them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from lumbar_ray.constants import (
    CONDITIONS,
    GROUP_TARGET_INDICES,
    IGNORE_INDEX,
    LEVELS,
    SEVERITIES,
    SEVERITY_WEIGHTS,
    SUBMISSION_COLUMNS,
    TARGETS,
    row_id,
)
from lumbar_ray.errors import SubmissionError
from lumbar_ray.labels import encode_labels

logger = logging.getLogger(__name__)

EPS: float = float(np.finfo(np.float64).eps)
"""Clipping bound of the predictions (float64 machine epsilon, as ``sklearn.metrics.log_loss``)."""

SUBMISSION_FILE_COLUMNS: tuple[str, ...] = ("row_id", *SUBMISSION_COLUMNS)

_WEIGHTS = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
_SEVERE = SEVERITIES.index("Severe")
_GROUP_COLUMNS: dict[str, np.ndarray] = {group: np.array(columns) for group, columns in GROUP_TARGET_INDICES.items()}
_SPINAL_COLUMNS = _GROUP_COLUMNS["spinal"]
_TARGET_INDEX = pd.Index(TARGETS)
# Row ids listed in an error message; more would drown the message.
_MAX_LISTED = 5


@dataclass(frozen=True)
class ScoreResult:
    """The official score and its four terms (lower is better)."""

    total: float
    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """The five figures as ``{prefix + name: value}``, e.g. for ``mlflow.log_metrics``."""
        return {f"{prefix}{name}": float(value) for name, value in asdict(self).items()}

    def format(self) -> str:
        """A small table: the total, then each term."""
        rows = [f"  {name:<18} {value:.5f}" for name, value in asdict(self).items() if name != "total"]
        return "\n".join([f"  {'total':<18} {self.total:.5f}", *rows])

    def __str__(self) -> str:
        terms = ", ".join(f"{name} {value:.5f}" for name, value in asdict(self).items() if name != "total")
        return f"score {self.total:.5f} ({terms})"


# --- array core


def weighted_log_loss(true_probs: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean of ``-log`` of the (clipped) probability given to the true class; NaN without rows."""
    if len(true_probs) == 0:
        return float("nan")
    losses = -np.log(np.clip(true_probs, EPS, 1.0 - EPS))
    return float(np.sum(weights * losses) / np.sum(weights))


def _check_arrays(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n_targets, n_classes = len(TARGETS), len(SEVERITIES)
    if labels.ndim != 2 or labels.shape[1] != n_targets:
        raise ValueError(f"labels must have shape (n, {n_targets}), got {labels.shape}")
    if probs.shape != (*labels.shape, n_classes):
        raise ValueError(f"probs must have shape {(*labels.shape, n_classes)}, got {probs.shape}")
    valid = np.isin(labels, [*range(n_classes), IGNORE_INDEX])
    if not valid.all():
        raise ValueError(f"labels hold class id {labels[~valid][0]}; expected 0..{n_classes - 1} or {IGNORE_INDEX}")
    scored = labels != IGNORE_INDEX
    if not scored.any():
        raise ValueError("no scored label (every cell is IGNORE_INDEX)")
    scored_probs = probs[scored]
    if not np.isfinite(scored_probs).all():
        raise ValueError("probs of scored cells hold NaN or inf")
    if (scored_probs < 0).any():
        raise ValueError("probs of scored cells hold negative values")
    return labels.astype(np.int64), probs


def score_arrays(labels: np.ndarray, probs: np.ndarray) -> ScoreResult:
    """The official score of predicted probabilities against class ids.

    Args:
        labels: ``(n, 25)`` class ids 0/1/2 in :data:`TARGETS` order, :data:`IGNORE_INDEX` for unscored cells.
        probs: ``(n, 25, 3)`` probabilities; those of unscored cells are not read (they may be NaN). Clipped,
            not renormalised.

    Returns:
        The four terms and their mean. A group without any scored cell gets NaN and the total is the mean of
        the remaining terms (logged as a warning).

    Raises:
        ValueError: on bad shapes, unknown class ids, no scored cell at all, or NaN/inf/negative probabilities
            in scored cells.
    """
    labels, probs = _check_arrays(labels, probs)
    terms = {}
    for group, columns in _GROUP_COLUMNS.items():
        group_labels = labels[:, columns]
        scored = group_labels != IGNORE_INDEX
        true_class = group_labels[scored]
        true_probs = np.take_along_axis(probs[:, columns][scored], true_class[:, None], axis=1)[:, 0]
        terms[group] = weighted_log_loss(true_probs, _WEIGHTS[true_class])
    terms["any_severe_spinal"] = _any_severe_loss(labels[:, _SPINAL_COLUMNS], probs[:, _SPINAL_COLUMNS, _SEVERE])
    values = np.array(list(terms.values()))
    if np.isnan(values).any():
        logger.warning(
            "no scored rows for %s; total averages the other terms",
            [k for k, v in terms.items() if math.isnan(v)],
        )
    return ScoreResult(total=float(np.nanmean(values)), **terms)


def _any_severe_loss(spinal_labels: np.ndarray, spinal_severe: np.ndarray) -> float:
    """Binary weighted log loss of "any spinal level severe" over studies with a scored spinal row."""
    scored = spinal_labels != IGNORE_INDEX
    studies = scored.any(axis=1)
    scored, spinal_labels, spinal_severe = scored[studies], spinal_labels[studies], spinal_severe[studies]
    target = ((spinal_labels == _SEVERE) & scored).any(axis=1)
    prediction = np.where(scored, spinal_severe, -np.inf).max(axis=1)
    weight = np.where(scored, _WEIGHTS[np.where(scored, spinal_labels, 0)], 0.0).max(axis=1)
    # Clip both columns of the binary prediction, as log_loss does with [1 - p, p].
    true_probs = np.where(target, np.clip(prediction, EPS, 1 - EPS), np.clip(1.0 - prediction, EPS, 1 - EPS))
    return weighted_log_loss(true_probs, weight)


# --- calibration


CALIBRATION_BINS = 10


def metric_optimal(probabilities: np.ndarray) -> np.ndarray:
    """The prediction the official score rewards for class probabilities ``P(c)``: ``p_c ~ w_c * P(c)`` (rows are
    weighted 1/2/4 by their true class); :func:`unweighted` is its inverse."""
    weighted = np.asarray(probabilities, dtype=np.float64) * _WEIGHTS
    return weighted / weighted.sum(axis=-1, keepdims=True)


def unweighted(probs: np.ndarray, class_weights: Sequence[float] = SEVERITY_WEIGHTS) -> np.ndarray:
    """Undo a model's class weights: ``q_c ~ p_c / w_c``.

    A model trained with class weights ``w`` (the metric's 1/2/4 by default) predicts ``p_c ~ w_c * P(c)``, which
    is what the score rewards for the metric's weights, so its raw probabilities over-state the rarer classes by
    design; ``P(c)`` itself is what calibration is about. (The any-severe loss term also pushes spinal P(severe)
    up a little; that part is left in.)
    """
    plain = np.asarray(probs, dtype=np.float64) / np.asarray(class_weights, dtype=np.float64)
    return plain / plain.sum(axis=-1, keepdims=True)


def calibration_table(
    labels: np.ndarray,
    probs: np.ndarray,
    n_bins: int = CALIBRATION_BINS,
    class_weights: Sequence[float] = SEVERITY_WEIGHTS,
) -> pd.DataFrame:
    """Reliability of each class's probability per condition group, over the scored cells.

    Args:
        labels: ``(n, 25)`` class ids (IGNORE_INDEX for unscored cells).
        probs: ``(n, 25, 3)`` predictions as scored; they are :func:`unweighted` by ``class_weights`` first.
        n_bins: equal-width bins of the predicted probability.
        class_weights: the class weights the model was trained with (``loss.class_weights``).

    Returns:
        One row per group, class and non-empty bin: ``group, severity, bin, count, predicted`` (mean probability),
        ``observed`` (share of cells of that class).
    """
    labels, probs = _check_arrays(labels, probs)
    plain = unweighted(probs, class_weights)
    rows = []
    for group, columns in _GROUP_COLUMNS.items():
        scored = labels[:, columns] != IGNORE_INDEX
        truth = labels[:, columns][scored]
        predicted = plain[:, columns][scored]
        for c, severity in enumerate(SEVERITIES):
            bins = np.minimum((predicted[:, c] * n_bins).astype(int), n_bins - 1)
            for b in np.unique(bins):
                chosen = bins == b
                rows.append((group, severity, int(b), int(chosen.sum()), float(predicted[chosen, c].mean()),
                             float((truth[chosen] == c).mean())))  # fmt: skip
    return pd.DataFrame(rows, columns=["group", "severity", "bin", "count", "predicted", "observed"])


def expected_calibration_error(table: pd.DataFrame) -> dict[str, float]:
    """Class-wise ECE per group from :func:`calibration_table`: the count-weighted mean gap between predicted and
    observed frequency over bins, averaged over the three classes (0 = perfectly calibrated)."""
    gaps = table.assign(gap=(table["predicted"] - table["observed"]).abs() * table["count"])
    per_class = gaps.groupby(["group", "severity"]).apply(lambda g: g["gap"].sum() / g["count"].sum())
    return {group: float(values.mean()) for group, values in per_class.groupby(level="group")}


# --- submission checks


def _listed(values: Sequence[object]) -> str:
    shown = ", ".join(repr(value) for value in list(values)[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def _parse_row_ids(row_ids: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`lumbar_ray.constants.parse_row_id`.

    Returns:
        ``(study_ids, target columns, malformed mask)``; malformed rows get study -1.
    """
    parts = row_ids.astype(str).str.partition("_")
    study, target = parts[0], parts[2]
    target_index = _TARGET_INDEX.get_indexer(target)
    malformed = ~study.str.fullmatch(r"\d{1,18}").to_numpy(dtype=bool) | (target_index < 0)
    studies = np.where(malformed, -1, pd.to_numeric(study.where(~malformed, "-1"))).astype(np.int64)
    return studies, target_index, malformed


def _check_row_set(ids: pd.Series, study_ids: Sequence[int] | np.ndarray | None) -> None:
    """No duplicate row id; with ``study_ids``, exactly the 25 rows of each of those studies."""
    duplicated = ids.duplicated()
    if duplicated.any():
        raise SubmissionError(f"duplicate row_id: {_listed(ids[duplicated].unique())}")
    if study_ids is not None:
        expected = pd.Index(_row_ids(np.asarray(study_ids, dtype=np.int64)))
        missing = expected.difference(ids, sort=False)
        if len(missing):
            raise SubmissionError(f"{len(missing)} row(s) missing from the submission: {_listed(missing)}")
        unexpected = ~ids.isin(expected)
        if unexpected.any():
            raise SubmissionError(f"row(s) of studies that were not asked for: {_listed(ids[unexpected])}")


def validate_submission(
    submission: pd.DataFrame,
    study_ids: Sequence[int] | np.ndarray | None = None,
    on_bad_sum: Literal["error", "renormalize", "ignore"] = "error",
    tol: float = 1e-6,
) -> pd.DataFrame:
    """Check a competition-format submission and return a clean copy.

    Args:
        submission: columns ``row_id, normal_mild, moderate, severe``.
        study_ids: when given, exactly the 25 rows of each of these studies must be present.
        on_bad_sum: rows whose probabilities do not sum to 1 within ``tol``: ``error`` raises,
            ``renormalize`` divides them by their sum with a warning, ``ignore`` keeps them (the official
            metric scores rows as given, clipped).
        tol: absolute tolerance on the row sums.

    Returns:
        ``row_id`` (str) and the three probability columns (float64), index reset, in the input order.

    Raises:
        ValueError: on wrong columns, malformed or duplicate row ids, missing or unexpected rows, non-numeric,
            NaN, inf or negative probabilities, or (``on_bad_sum='error'``) rows that do not sum to 1; the
            message names the offending row ids.
    """
    if on_bad_sum not in ("error", "renormalize", "ignore"):
        raise SubmissionError(f"on_bad_sum must be 'error', 'renormalize' or 'ignore', got {on_bad_sum!r}")
    columns = list(submission.columns)
    if sorted(columns) != sorted(SUBMISSION_FILE_COLUMNS):
        raise SubmissionError(f"submission columns must be {list(SUBMISSION_FILE_COLUMNS)}, got {columns}")
    result = submission.loc[:, list(SUBMISSION_FILE_COLUMNS)].reset_index(drop=True)
    result["row_id"] = result["row_id"].astype(str)
    ids = result["row_id"]
    _, _, malformed = _parse_row_ids(ids)
    if malformed.any():
        raise SubmissionError(f"malformed row_id (expected <study_id>_<condition>_<level>): {_listed(ids[malformed])}")
    _check_row_set(ids, study_ids)
    for column in SUBMISSION_COLUMNS:
        values = pd.to_numeric(result[column], errors="coerce")
        non_numeric = values.isna() & result[column].notna()
        if non_numeric.any():
            raise SubmissionError(f"non-numeric {column} in row(s) {_listed(ids[non_numeric])}")
        result[column] = values.astype(np.float64)
    probs = result[list(SUBMISSION_COLUMNS)].to_numpy()
    for problem, bad in (
        ("NaN or inf", ~np.isfinite(probs).all(axis=1)),
        ("negative", (probs < 0).any(axis=1)),
    ):
        if bad.any():
            raise SubmissionError(f"{problem} probabilities in row(s) {_listed(ids[bad])}")
    if on_bad_sum != "ignore":
        _fix_row_sums(result, probs, ids, on_bad_sum == "renormalize", tol)
    return result


def _fix_row_sums(result: pd.DataFrame, probs: np.ndarray, ids: pd.Series, renormalize: bool, tol: float) -> None:
    """Rows not summing to 1 within ``tol``: an error, or (``renormalize``) divided by their sum in ``result``."""
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > tol
    if not off.any():
        return
    message = f"{off.sum()} row(s) do not sum to 1 (tol {tol}): {_listed(ids[off])}"
    if not renormalize:
        raise SubmissionError(message)
    if (sums[off] <= 0).any():
        raise SubmissionError(f"cannot renormalise rows summing to 0: {_listed(ids[off & (sums <= 0)])}")
    warnings.warn(f"{message}; renormalised", UserWarning, stacklevel=3)
    logger.warning("%s; renormalised", message)
    result.loc[off, list(SUBMISSION_COLUMNS)] = probs[off] / sums[off, None]


# --- conversions


def _row_ids(study_ids: np.ndarray) -> list[str]:
    """Row ids of the given studies, study-major then :data:`TARGETS` order."""
    return [row_id(study, condition, level) for study in study_ids for condition in CONDITIONS for level in LEVELS]


def labels_to_submission(study_ids: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Probabilities ``(n, 25, 3)`` to competition rows (study-major, then :data:`TARGETS` order).

    Raises:
        ValueError: if ``probs`` does not have shape ``(len(study_ids), 25, 3)``.
    """
    study_ids = np.asarray(study_ids, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(study_ids), len(TARGETS), len(SEVERITIES)):
        raise SubmissionError(f"probs must have shape ({len(study_ids)}, {len(TARGETS)}, {len(SEVERITIES)})")
    frame = pd.DataFrame(probs.reshape(-1, len(SEVERITIES)), columns=list(SUBMISSION_COLUMNS))
    frame.insert(0, "row_id", _row_ids(study_ids))
    return frame


def _align(submission: pd.DataFrame, study_ids: np.ndarray) -> np.ndarray:
    """Submission rows into an ``(n, 25, 3)`` array (NaN where a row is absent); other studies are ignored."""
    studies, targets, malformed = _parse_row_ids(submission["row_id"])
    if malformed.any():
        raise SubmissionError(f"malformed row_id: {_listed(submission['row_id'][malformed])}")
    positions = pd.Index(study_ids).get_indexer(studies)
    keep = positions >= 0
    probs = np.full((len(study_ids), len(TARGETS), len(SEVERITIES)), np.nan)
    probs[positions[keep], targets[keep]] = submission[list(SUBMISSION_COLUMNS)].to_numpy(np.float64)[keep]
    return probs


def submission_to_probs(
    submission: pd.DataFrame, study_ids: np.ndarray, missing: Literal["error", "nan"] = "error"
) -> np.ndarray:
    """Inverse of :func:`labels_to_submission`: competition rows to ``(n, 25, 3)`` in ``study_ids`` order.

    Args:
        submission: ``row_id`` + the three probability columns; rows of other studies are ignored.
        study_ids: the studies, in the order of the result.
        missing: a target without a row: ``error`` raises (naming a few), ``nan`` leaves NaN.

    Raises:
        ValueError: on a malformed row id or (``missing='error'``) a missing row.
    """
    study_ids = np.asarray(study_ids, dtype=np.int64)
    probs = _align(submission, study_ids)
    absent = np.isnan(probs).all(axis=2)
    if missing == "error" and absent.any():
        rows, columns = np.nonzero(absent)
        names = [f"{study_ids[r]}_{TARGETS[c]}" for r, c in zip(rows, columns, strict=True)]
        raise SubmissionError(f"{len(names)} row(s) missing from the submission: {_listed(names)}")
    return probs


def score_submission(
    solution: pd.DataFrame, submission: pd.DataFrame, missing: Literal["error", "drop"] = "error"
) -> ScoreResult:
    """Score a competition-format submission against ``train.csv``-format labels.

    Args:
        solution: ``study_id`` + the 25 label columns (empty/NaN cells are not scored).
        submission: ``row_id, normal_mild, moderate, severe``; rows of unscored cells or of other studies are
            allowed and ignored. Rows are scored as given (clipped, not renormalised), like the official
            metric.
        missing: a scored cell without a submission row: ``error`` raises, listing a few; ``drop`` removes the
            cell from the solution (logged).

    Returns:
        The official score.

    Raises:
        ValueError: on a malformed submission or (``missing='error'``) scored rows without a prediction.
    """
    if missing not in ("error", "drop"):
        raise SubmissionError(f"missing must be 'error' or 'drop', got {missing!r}")
    submission = validate_submission(submission, on_bad_sum="ignore")
    study_ids, labels = encode_labels(solution)
    probs = _align(submission, study_ids)
    unpredicted = (labels != IGNORE_INDEX) & np.isnan(probs).any(axis=2)
    if unpredicted.any():
        rows, columns = np.nonzero(unpredicted)
        names = [f"{study_ids[r]}_{TARGETS[c]}" for r, c in zip(rows, columns, strict=True)]
        if missing == "error":
            raise SubmissionError(f"{len(names)} scored row(s) have no prediction: {_listed(names)}")
        logger.warning("dropping %d scored row(s) without a prediction: %s", len(names), _listed(names))
        labels = np.where(unpredicted, IGNORE_INDEX, labels)
    return score_arrays(labels, probs)
