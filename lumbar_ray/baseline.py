"""The prior baseline: a constant prediction per condition and level, scored out of fold.

Under the official weighted log loss the best constant prediction for a target is not its class frequency
``f_c`` but ``f_c * w_c / sum_k f_k * w_k`` with the class weights ``w = (1, 2, 4)``: minimising
``-sum_c f_c w_c log p_c`` subject to ``sum_c p_c = 1`` gives ``p_c`` proportional to ``f_c w_c``. Any model
has to beat this figure (about 0.792 out of fold on the real labels) to have learnt something from the images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lumbar_ray.constants import SEVERITIES, SEVERITY_WEIGHTS, TARGETS
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.splits import make_folds
from lumbar_ray.labels import encode_labels
from lumbar_ray.metrics import ScoreResult, labels_to_submission, score_arrays

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineResult:
    """Outcome of :func:`run_baseline`.

    Attributes:
        score: the out-of-fold official score.
        folds: ``study_id, fold`` as used.
        weighted: whether the prior was frequency x class weight (else plain frequency).
        oof_csv: where the out-of-fold submission was written, if asked.
    """

    score: ScoreResult
    folds: pd.DataFrame
    weighted: bool
    oof_csv: Path | None = None


def fit_prior(labels: np.ndarray, weighted: bool = True, pseudo_count: float = 0.5) -> np.ndarray:
    """Per-target class distribution of the labelled cells.

    Args:
        labels: ``(n, 25)`` class ids, :data:`IGNORE_INDEX` for empty cells.
        weighted: multiply the class frequencies by the metric's class weights 1/2/4 and renormalise (the
            optimal constant under the weighted log loss); else the plain frequencies.
        pseudo_count: added to every class count (Jeffreys-style smoothing). On a small training set a class
            never seen would otherwise get probability ~0 and an unbounded loss when it does occur; on the
            real ~1,600 training studies of a fold it moves the score by less than 1e-3.

    Returns:
        ``(25, 3)`` probabilities; a target without any labelled cell gets the uniform distribution.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != len(TARGETS):
        raise ValueError(f"labels must have shape (n, {len(TARGETS)}), got {labels.shape}")
    classes = np.arange(len(SEVERITIES))
    # (25, 3) counts; IGNORE_INDEX matches no class.
    counts = (labels[:, :, None] == classes[None, None, :]).sum(axis=0).astype(np.float64)
    counts[counts.sum(axis=1) > 0] += pseudo_count
    if weighted:
        counts *= np.asarray(SEVERITY_WEIGHTS)
    totals = counts.sum(axis=1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / len(SEVERITIES))
    return np.divide(counts, totals, out=uniform, where=totals > 0)


def prior_oof_probs(
    labels: np.ndarray, folds: np.ndarray, weighted: bool = True, pseudo_count: float = 0.5
) -> np.ndarray:
    """Out-of-fold prior: each study is predicted by the prior fitted on the studies of the other folds.

    Args:
        labels: ``(n, 25)`` class ids.
        folds: ``(n,)`` fold of each study (aligned with ``labels``).
        weighted: see :func:`fit_prior`.
        pseudo_count: see :func:`fit_prior`.

    Returns:
        ``(n, 25, 3)`` probabilities.
    """
    labels = np.asarray(labels)
    folds = np.asarray(folds)
    if folds.shape != (len(labels),):
        raise ValueError(f"folds must have shape ({len(labels)},), got {folds.shape}")
    probs = np.empty((len(labels), len(TARGETS), len(SEVERITIES)))
    for fold in np.unique(folds):
        held_out = folds == fold
        probs[held_out] = fit_prior(labels[~held_out], weighted=weighted, pseudo_count=pseudo_count)
    return probs


def fill_with_prior(probs: np.ndarray, has_point: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """A copy of ``probs`` where the targets without a point (no series, no coordinate, no detection) get
    ``prior``: a crop of zeros says nothing about its target, so the training prior is the honest prediction.

    Args:
        probs: ``(n, 25, 3)`` model probabilities.
        has_point: ``(n, 25)`` whether the target had a crop.
        prior: ``(25, 3)`` prior of the training labels (:func:`fit_prior`).
    """
    filled = np.array(probs, dtype=np.float64, copy=True)
    missing = ~np.asarray(has_point, dtype=bool)
    filled[missing] = np.broadcast_to(np.asarray(prior, dtype=np.float64), filled.shape)[missing]
    return filled


def run_baseline(
    data_root: Path | str,
    n_folds: int = 5,
    seed: int = 42,
    out_csv: Path | str | None = None,
    weighted: bool = True,
) -> BaselineResult:
    """Score the prior baseline out of fold on ``train.csv`` of an RSNA-format folder.

    Args:
        data_root: folder with ``train.csv``.
        n_folds: folds of :func:`~lumbar_ray.data.splits.make_folds`.
        seed: fold seed.
        out_csv: if given, write the out-of-fold predictions there in submission format.
        weighted: frequency x class weight (default) or plain class frequency.

    Returns:
        The score, the folds and the csv path.

    Raises:
        FileNotFoundError: if the folder has no ``train.csv``.
    """
    data = load_rsna(data_root)
    if data.train is None:
        raise FileNotFoundError(f"no train.csv in {data_root}")
    study_ids, labels = encode_labels(data.train)
    folds = make_folds(study_ids, labels, n_folds=n_folds, seed=seed)
    fold_of_study = folds.set_index("study_id")["fold"].reindex(study_ids).to_numpy()
    probs = prior_oof_probs(labels, fold_of_study, weighted=weighted)
    score = score_arrays(labels, probs)
    logger.info("%s prior baseline, %d folds: %s", "weighted" if weighted else "frequency", n_folds, score)
    path = None
    if out_csv is not None:
        path = Path(out_csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        labels_to_submission(study_ids, probs).to_csv(path, index=False)
        logger.info("wrote out-of-fold predictions to %s", path)
    return BaselineResult(score=score, folds=folds, weighted=weighted, oof_csv=path)
