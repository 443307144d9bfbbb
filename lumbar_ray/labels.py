"""Severity labels between ``train.csv`` frames and arrays: the one encoding the metric, the baseline, the folds
and training share (class ids 0/1/2 in :data:`SEVERITIES` order, :data:`IGNORE_INDEX` for an empty cell)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lumbar_ray.constants import IGNORE_INDEX, SEVERITIES, TARGETS


def encode_labels(train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Turn a ``train.csv`` frame into arrays.

    Args:
        train: ``study_id`` + the 25 :data:`TARGETS` columns holding severity strings (or categoricals) and
            NaN/empty for unlabelled cells, e.g. :attr:`RsnaData.train` or a raw ``pd.read_csv``.

    Returns:
        ``(study_ids, labels)``: ``(n,)`` int64 and ``(n, 25)`` int64 in :data:`TARGETS` order, class ids
        0/1/2 (index in :data:`SEVERITIES`) and :data:`IGNORE_INDEX` for empty cells.

    Raises:
        ValueError: on a missing target column or an unknown severity.
    """
    missing = [column for column in ("study_id", *TARGETS) if column not in train.columns]
    if missing:
        raise ValueError(f"train frame lacks column(s) {missing}")
    codes = {severity: index for index, severity in enumerate(SEVERITIES)}
    labels = np.full((len(train), len(TARGETS)), IGNORE_INDEX, dtype=np.int64)
    for column_index, target in enumerate(TARGETS):
        cells = train[target].astype(object)
        empty = cells.isna().to_numpy() | (cells == "").to_numpy()
        mapped = cells.map(codes)
        unknown = ~empty & mapped.isna().to_numpy()
        if unknown.any():
            raise ValueError(f"unknown severity {cells[unknown].iloc[0]!r} in column {target!r}")
        labels[~empty, column_index] = mapped[~empty].to_numpy(dtype=np.int64)
    return train["study_id"].to_numpy(dtype=np.int64), labels


def decode_labels(study_ids: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Inverse of :func:`encode_labels`: arrays back to a ``train.csv`` frame (empty cells are NaN).

    Raises:
        ValueError: on mismatched shapes or a class id outside 0/1/2/:data:`IGNORE_INDEX`.
    """
    study_ids = np.asarray(study_ids, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(study_ids), len(TARGETS)):
        raise ValueError(f"labels must have shape ({len(study_ids)}, {len(TARGETS)}), got {labels.shape}")
    valid = np.isin(labels, [*range(len(SEVERITIES)), IGNORE_INDEX])
    if not valid.all():
        raise ValueError(f"unknown class id {labels[~valid][0]} in labels")
    names = np.array([*SEVERITIES, None], dtype=object)
    # IGNORE_INDEX becomes the index of the trailing None.
    codes = np.where(labels == IGNORE_INDEX, len(SEVERITIES), labels)
    frame = pd.DataFrame(names[codes], columns=list(TARGETS))
    frame.insert(0, "study_id", study_ids)
    return frame
