"""Cross-validation folds grouped by study and stratified on the severity labels.

One row per study, so every series and every level of a study lands in the same fold (grouping by study
is what keeps the out-of-fold score honest). The stratum of a study combines the any-severe-spinal flag (the
fourth term of the score) with bucketed counts of its severe and moderate labels; strata too small to be
spread over the folds are merged into coarser ones, so :class:`~sklearn.model_selection.StratifiedKFold`
never sees a class with fewer members than folds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from lumbar_ray.constants import CONDITIONS, LEVELS, SEVERITIES, TARGETS

logger = logging.getLogger(__name__)

FOLD_COLUMNS: tuple[str, ...] = ("study_id", "fold")

_SEVERE = SEVERITIES.index("Severe")
_MODERATE = SEVERITIES.index("Moderate")
_SPINAL_COLUMNS = [TARGETS.index(f"{CONDITIONS[0]}_{level}") for level in LEVELS]


def _strata_levels(labels: np.ndarray) -> list[np.ndarray]:
    """Stratum keys of each study, finest first; each level is a coarsening of the previous one."""
    any_severe_spinal = (labels[:, _SPINAL_COLUMNS] == _SEVERE).any(axis=1).astype(int)
    n_severe = np.minimum((labels == _SEVERE).sum(axis=1), 3)
    # Moderate labels are common (a few per study), so they are bucketed in steps of three.
    n_moderate = np.minimum((labels == _MODERATE).sum(axis=1) // 3, 3)
    fine = [f"{a}|{s}|{m}" for a, s, m in zip(any_severe_spinal, n_severe, n_moderate, strict=True)]
    middle = [f"{a}|{s}" for a, s in zip(any_severe_spinal, n_severe, strict=True)]
    coarse = [f"{a}" for a in any_severe_spinal]
    return [np.asarray(level, dtype=object) for level in (fine, middle, coarse)]


def _merge_rare(levels: list[np.ndarray], min_count: int) -> np.ndarray:
    """Assign each study the finest stratum that has at least ``min_count`` members.

    Studies whose coarsest stratum is still rare share one ``rest`` stratum; if even that one is rare it joins
    the largest stratum.
    """
    strata = np.full(len(levels[0]), "rest", dtype=object)
    unresolved = np.ones(len(strata), dtype=bool)
    for depth, keys in enumerate(levels):
        candidates = pd.Series(keys[unresolved])
        sizes = candidates.map(candidates.value_counts()).to_numpy()
        accepted = np.flatnonzero(unresolved)[sizes >= min_count]
        strata[accepted] = [f"{depth}:{key}" for key in keys[accepted]]
        unresolved[accepted] = False
    rest = strata == "rest"
    if 0 < rest.sum() < min_count:
        largest = pd.Series(strata[~rest]).value_counts().index[0] if (~rest).any() else "rest"
        strata[rest] = largest
    return strata


def make_folds(study_ids: np.ndarray, labels: np.ndarray, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each study to one of ``n_folds`` folds, stratified on its labels.

    The result depends only on the set of (study, labels) pairs and the seed, not on the input order.

    Args:
        study_ids: ``(n,)`` unique study ids.
        labels: ``(n, 25)`` class ids in :data:`TARGETS` order, :data:`IGNORE_INDEX` for empty cells.
        n_folds: number of folds, at least 2 and at most ``n``.
        seed: shuffling seed.

    Returns:
        Columns ``study_id`` (int64) and ``fold`` (int64, 0..n_folds-1), one row per study, sorted by
        study id.

    Raises:
        ValueError: on duplicate study ids, mismatched shapes or an impossible number of folds.
    """
    study_ids = np.asarray(study_ids, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(study_ids), len(TARGETS)):
        raise ValueError(f"labels must have shape ({len(study_ids)}, {len(TARGETS)}), got {labels.shape}")
    if len(np.unique(study_ids)) != len(study_ids):
        raise ValueError("study_ids must be unique (folds are grouped by study: one row per study)")
    if not 2 <= n_folds <= len(study_ids):
        raise ValueError(f"n_folds must be between 2 and the number of studies ({len(study_ids)}), got {n_folds}")
    order = np.argsort(study_ids, kind="stable")
    study_ids, labels = study_ids[order], labels[order]
    strata = _merge_rare(_strata_levels(labels), n_folds)
    folds = np.empty(len(study_ids), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), strata)):
        folds[held_out] = fold
    logger.info("made %d folds over %d studies from %d strata", n_folds, len(study_ids), len(set(strata)))
    return pd.DataFrame({"study_id": study_ids, "fold": folds})


def save_folds(folds: pd.DataFrame, path: Path | str) -> Path:
    """Write a fold table as CSV (``study_id,fold``) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folds.loc[:, list(FOLD_COLUMNS)].to_csv(path, index=False)
    return path


def load_folds(path: Path | str) -> pd.DataFrame:
    """Read a fold table written by :func:`save_folds`.

    Raises:
        ValueError: if a column is missing or a study appears twice.
    """
    path = Path(path)
    folds = pd.read_csv(path)
    missing = [column for column in FOLD_COLUMNS if column not in folds.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    folds = folds.astype({"study_id": "int64", "fold": "int64"})
    if folds["study_id"].duplicated().any():
        raise ValueError(f"{path}: study {folds.loc[folds['study_id'].duplicated(), 'study_id'].iloc[0]} twice")
    return folds.loc[:, list(FOLD_COLUMNS)]
