"""What every fold of a CV needs, built once on the driver: labels, the fixed folds, the label points and the digest
of the training data (:mod:`lumbar_ray.data.lineage`).

The cache must be complete (``lumbar-ray preprocess``, or the ``train``/``tune`` commands and the pipeline, which
complete it first): this stage reads it and never runs another stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.baseline import fit_prior
from lumbar_ray.config import Config, cache_settings
from lumbar_ray.constants import POINT_COLUMNS
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.data.crops import points_from_coordinates
from lumbar_ray.data.lineage import DataDigest, data_digest
from lumbar_ray.data.rsna import RsnaData, load_rsna
from lumbar_ray.data.splits import load_folds, make_folds, save_folds
from lumbar_ray.labels import encode_labels
from lumbar_ray.paths import FOLDS_CSV, ShippedFile, cache_root_for, data_root_for, ship_if_local
from lumbar_ray.train.steps import FoldPayload

logger = logging.getLogger(__name__)


@dataclass
class CVInputs:
    """What every fold needs, built once on the driver (a Tune trial gets it from the tuning driver)."""

    data: RsnaData
    study_ids: np.ndarray
    labels: np.ndarray
    folds: pd.DataFrame
    points: pd.DataFrame
    skipped_points: pd.DataFrame
    cache_root: str
    cache_settings: dict[str, Any]
    predicted_points: pd.DataFrame | None = None
    data_digest: DataDigest | None = None
    pretrained_file: ShippedFile | None = None
    """``model.pretrained_file`` read on the driver (its path would mean nothing on a worker's node)."""

    def fold_of(self) -> np.ndarray:
        """``(n,)`` fold of each study, aligned with :attr:`study_ids`."""
        return self.folds["fold"].to_numpy()

    def subset(self, keep: np.ndarray) -> CVInputs:
        """The same inputs restricted to the studies where ``keep`` is True (points and cache unchanged)."""
        return CVInputs(self.data, self.study_ids[keep], self.labels[keep], self.folds[keep], self.points,
                        self.skipped_points, self.cache_root, self.cache_settings,
                        self.predicted_points, self.data_digest, self.pretrained_file)  # fmt: skip


def prepare_inputs(cfg: Config, run_dir: Path) -> CVInputs:
    """Load the labels, fix the folds (``run_dir/folds.csv``, reused on resume) and map the label points.

    Raises:
        FileNotFoundError: no labels or coordinates, or an empty cache (preprocess first).
    """
    root = data_root_for(cfg)
    data = load_rsna(root)
    if data.train is None or data.coordinates is None:
        raise FileNotFoundError(f"{root} has no train.csv or train_label_coordinates.csv: nothing to train on")
    cache = SeriesCache(cache_root_for(cfg), cache_settings(cfg.preprocess))
    if cache.read_manifest().empty:
        raise FileNotFoundError(f"cache {cache.path} is empty: run `lumbar-ray preprocess` first")
    study_ids, labels = encode_labels(data.train)
    folds_csv = run_dir / FOLDS_CSV
    if folds_csv.is_file():
        folds = load_folds(folds_csv)
    else:
        folds = make_folds(study_ids, labels, cfg.cv.n_folds, cfg.cv.seed)
        save_folds(folds, folds_csv)
    folds = folds.set_index("study_id").loc[study_ids].reset_index()
    points = points_from_coordinates(data.coordinates, cache, data.train_series)
    predicted = None if cfg.cv.predicted_points is None else read_predicted_points(cfg.cv.predicted_points, study_ids)
    settings = cache_settings(cfg.preprocess)
    shipped = ship_if_local(cfg.model.pretrained_file) if cfg.model.pretrained else None
    return CVInputs(data, study_ids, labels, folds, points.points, points.skipped, cache_root_for(cfg), settings,
                    predicted, data_digest(root, settings), shipped)  # fmt: skip


def read_predicted_points(path: str, study_ids: np.ndarray) -> pd.DataFrame:
    """``cv.predicted_points``: the POINTS frame of predicted points, checked against the training studies.

    A study without any predicted point (no series the detectors could read) is scored by the prior, as it would
    be at inference: it is counted and named in the log. A file that covers fewer than half the studies belongs
    to other data: that is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: columns missing, or fewer than half the training studies with a predicted point.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"cv.predicted_points: {path} does not exist")
    frame = pd.read_parquet(path)
    missing_columns = set(POINT_COLUMNS) - set(frame.columns)
    if missing_columns:
        raise ValueError(f"cv.predicted_points: {path} lacks the columns {sorted(missing_columns)}")
    absent = np.setdiff1d(study_ids, frame["study_id"].unique())
    if len(absent) > len(study_ids) / 2:
        raise ValueError(f"cv.predicted_points: {len(absent)} of {len(study_ids)} training studies have no "
                         f"predicted point in {path} (first: {absent[:5].tolist()}): other data?")  # fmt: skip
    if len(absent):
        logger.warning("cv.predicted_points: %d studies without a predicted point are scored by the prior there: %s",
                       len(absent), absent[:20].tolist())  # fmt: skip
    logger.info("predicted points of %d studies from %s", frame["study_id"].nunique(), path)
    return frame[list(POINT_COLUMNS)]


def fold_payload(inputs: CVInputs, fold: int) -> FoldPayload:
    """Fold ``fold``'s data: ids, labels, points, where the cache is, and the prior of its training studies."""
    held_out = inputs.fold_of() == fold
    return FoldPayload(
        cache_root=inputs.cache_root,
        cache_settings=inputs.cache_settings,
        points=inputs.points,
        train_ids=inputs.study_ids[~held_out],
        val_ids=inputs.study_ids[held_out],
        train_labels=inputs.labels[~held_out],
        val_labels=inputs.labels[held_out],
        prior=fit_prior(inputs.labels[~held_out]),
        val_points=None if inputs.predicted_points is None else inputs.predicted_points,
        pretrained_file=inputs.pretrained_file,
    )
