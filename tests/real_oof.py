"""Loader of the 4th-place team's real out-of-fold predictions in ``shared/reference/real-oof/`` (see its README).

Each file holds one model part's submission-style rows (``row_id, normal_mild, moderate, severe``) for one condition
group; they become ``(n, 25, 3)`` arrays aligned with :func:`lumbar_ray.labels.encode_labels` of the real
``train.csv``, NaN where a part has no prediction. The team's folds come from ``folds_train_with_split.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.labels import encode_labels
from lumbar_ray.metrics import submission_to_probs

REAL_OOF_FOLDER = Path("reference") / "real-oof"
FOLDS_FILE = "folds_train_with_split.csv"
# One file per (backbone, condition group); together the three files of a backbone cover the 25 targets.
CNN_FILES = ("yu4u_sagittal2_baseline", "yu4u_sagittal1_baseline", "yu4u_axial_baseline")
SWINT_FILES = ("yu4u_sagittal2_swint", "yu4u_sagittal1_s1_swint", "yu4u_axial_swint")
AXIAL_SPINAL_FILE = "yu4u_sagittal2_axial"


@dataclass(frozen=True)
class RealOof:
    """Real labels, the team's folds and its out-of-fold predictions, all in ``study_ids`` order.

    Attributes:
        study_ids: ``(n,)`` the studies of ``train.csv``, in its order.
        labels: ``(n, 25)`` class ids, IGNORE_INDEX for empty cells (every labelled cell, predicted or not).
        fold_of: ``(n,)`` the team's fold id (0-4) of each study.
        cnn: ``(n, 25, 3)`` the EfficientNetV2-S parts, NaN where they have no row.
        swint: ``(n, 25, 3)`` the Swin-T parts.
        axial_spinal: ``(n, 25, 3)`` the spinal model that adds the axial view; NaN outside spinal.
    """

    study_ids: np.ndarray
    labels: np.ndarray
    fold_of: np.ndarray
    cnn: np.ndarray
    swint: np.ndarray
    axial_spinal: np.ndarray


def scored_where_predicted(labels: np.ndarray, *parts: np.ndarray) -> np.ndarray:
    """``labels`` with the cells that some part does not predict unscored (the READMEs' "drop unpredicted rows")."""
    predicted = np.logical_and.reduce([np.isfinite(part).all(axis=-1) for part in parts])
    return np.where(predicted, labels, IGNORE_INDEX)


def _read_part(folder: Path, name: str, study_ids: np.ndarray) -> np.ndarray:
    return submission_to_probs(pd.read_csv(folder / f"{name}_submission.csv"), study_ids, missing="nan")


def _union(parts: list[np.ndarray]) -> np.ndarray:
    """One array from parts that predict disjoint targets; NaN where none does."""
    combined = np.full(parts[0].shape, np.nan)
    for part in parts:
        predicted = np.isfinite(part).all(axis=-1)
        if (predicted & np.isfinite(combined).all(axis=-1)).any():
            raise ValueError("two parts predict the same cell")
        combined[predicted] = part[predicted]
    return combined


def _folds(folder: Path, study_ids: np.ndarray) -> np.ndarray:
    folds = pd.read_csv(folder / FOLDS_FILE, usecols=["study_id", "fold_id"]).set_index("study_id")["fold_id"]
    missing = pd.Index(study_ids).difference(folds.index)
    if len(missing):
        raise ValueError(f"{len(missing)} studies of train.csv have no fold, e.g. {list(missing[:3])}")
    return folds.loc[study_ids].to_numpy(dtype=np.int64)


def load_real_oof(shared_dir: Path) -> RealOof:
    """Read ``shared/rsna/train.csv`` and the real-oof folder into aligned arrays."""
    folder = shared_dir / REAL_OOF_FOLDER
    study_ids, labels = encode_labels(pd.read_csv(shared_dir / "rsna" / "train.csv"))
    return RealOof(
        study_ids=study_ids,
        labels=labels,
        fold_of=_folds(folder, study_ids),
        cnn=_union([_read_part(folder, name, study_ids) for name in CNN_FILES]),
        swint=_union([_read_part(folder, name, study_ids) for name in SWINT_FILES]),
        axial_spinal=_read_part(folder, AXIAL_SPINAL_FILE, study_ids),
    )
