"""MLflow records of a CV: the fold child runs (best score, training curves) and the CV's scores, tables and
plots on its parent run.

- parent (``lumbar_ray.kind=cv``): the resolved config (params ``section.key`` and ``config.yaml``), the training
  data as an MLflow dataset input (context ``train``, logged once: name = the data folder's name, digest =
  :mod:`lumbar_ray.data.lineage`'s, source = the folder's path, profile = the CSVs' hashes and the cache key; no
  patient value) and its digest as the tag ``lumbar_ray.data_digest``, ``cv_*``
  (best epoch) and ``cv_last_epoch_*`` (the honest CV) scores next to the prior's ``prior_*`` on the same folds and,
  where the data knows its latents, a perfect model's ``floor_*``; with ``calibrate.temperature``, the cross-fitted
  ``cv_calibrated_*``, the fitted ``temperature_<group>`` and the registered model's ``cv_model_total``;
  ``ece_<group>``; ``oof.csv``, ``folds.csv``,
  ``skipped_points.csv``, ``calibration.csv``, ``plots/confusion_matrices.png``, ``plots/level_scores.png`` and
  ``plots/reliability.png``;
- child per fold (``lumbar_ray.fold=<k>``, named ``fold<k>``): per-epoch metrics (logged by the rank-0 Ray worker,
  ``step`` = epoch, so a retried epoch overwrites its point), ``best_val_score``, ``best_epoch`` and
  ``plots/training_curves.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray import plots
from lumbar_ray.calibrate import Calibration
from lumbar_ray.constants import SEVERITY_WEIGHTS
from lumbar_ray.data.lineage import DataDigest
from lumbar_ray.metrics import ScoreResult, calibration_table, expected_calibration_error
from lumbar_ray.registry import DATA_DIGEST_TAG
from lumbar_ray.tracking import Tracker, local_dataset

logger = logging.getLogger(__name__)

FOLD_TAG = "lumbar_ray.fold"


DATA_CONTEXT = "train"
"""``mlflow.data.context`` of the training data's dataset input."""


def log_training_data(tracker: Tracker, run_id: str, digest: DataDigest) -> None:
    """The training data as ``run_id``'s dataset input (once, however often the run continues) and its digest as
    the tag ``lumbar_ray.data_digest`` (see the module docstring)."""
    profile = {"files_sha256": digest.files, "cache_key": digest.cache_key}
    dataset = local_dataset(Path(digest.root).name or "data", digest.digest, digest.root, profile)
    if tracker.log_dataset_input(run_id, dataset, DATA_CONTEXT):
        logger.info("MLflow: run %s trained on %s (%s)", run_id, digest.digest, digest.root)
    tracker.set_tags(run_id, {DATA_DIGEST_TAG: digest.digest})


def fold_run(tracker: Tracker, parent: str, fold: int) -> str:
    """Find or create fold ``fold``'s child run of ``parent`` (a rerun reuses it; epochs overwrite steps)."""
    return tracker.child_run(parent, FOLD_TAG, str(int(fold)), "fold", f"fold{fold}")


def finish_fold(tracker: Tracker, child: str, best_score: float, best_epoch: int,
                history: list[dict[str, Any]]) -> None:  # fmt: skip
    """Log the fold's best score and epoch and its training curves, then end the child run."""
    tracker.log_values(child, {"best_val_score": best_score, "best_epoch": best_epoch})
    tracker.log_figure(child, plots.training_curves(history), "plots/training_curves.png")
    tracker.finish(child)


SCORE_PREFIXES = {
    "best epoch": "cv_",
    "last epoch": "cv_last_epoch_",
    "calibrated": "cv_calibrated_",
    "predicted points": "cv_predicted_points_",
    "prior": "prior_",
    "floor": "floor_",
}
"""MLflow metric prefix of each CV score column (:meth:`lumbar_ray.train.cv.CVResult.columns`)."""


def log_cv(
    tracker: Tracker,
    parent: str,
    scores: dict[str, ScoreResult],
    tables: dict[str, pd.DataFrame],
    labels: np.ndarray,
    probs: np.ndarray,
    class_weights: tuple[float, ...] = SEVERITY_WEIGHTS,
) -> dict[str, float]:
    """Log the CV's out-of-fold scores side by side, calibration, tables and plots; return the ECE per group.

    Args:
        tracker: the store.
        parent: the CV's parent run.
        scores: column name -> score on the same studies: ``best epoch`` (``cv_*``), ``last epoch``
            (``cv_last_epoch_*``: the honest CV), ``prior`` (``prior_*``), ``floor`` (``floor_*``, where known).
        tables: artifact name -> frame (``oof.csv``, ``folds.csv``; an empty frame is not logged).
        labels: ``(n, 25)`` labels of the scored studies (IGNORE_INDEX where empty).
        probs: ``(n, 25, 3)`` their out-of-fold probabilities (calibration: ``ece_<group>``, ``calibration.csv``,
            ``plots/reliability.png``, of the class-weight-free probabilities).
        class_weights: the class weights the model trained with (``loss.class_weights``), undone for calibration.
    """
    values = {"cv_studies": float(len(labels))}
    for name, score in scores.items():
        values |= score.to_dict(prefix=SCORE_PREFIXES[name])
    calibration = calibration_table(labels, probs, class_weights=class_weights)
    ece = expected_calibration_error(calibration)
    values |= {f"ece_{group}": value for group, value in ece.items()}
    tracker.log_values(parent, values)
    for name, table in tables.items():
        if table is not None and len(table):
            tracker.log_text(parent, table.to_csv(index=False), name)
    tracker.log_figure(parent, plots.confusion_matrices(labels, probs), "plots/confusion_matrices.png")
    tracker.log_figure(parent, plots.level_score_heatmap(labels, probs), "plots/level_scores.png")
    tracker.log_figure(parent, plots.reliability_diagram(calibration), "plots/reliability.png")
    tracker.log_text(parent, calibration.to_csv(index=False), "calibration.csv")
    logger.info("MLflow: CV metrics and artifacts logged to %s", parent)
    return ece


def calibration_values(calibration: Calibration, model_score: ScoreResult) -> dict[str, float]:
    """MLflow metrics of a fitted calibration: ``temperature_<group>``, ``weight_<group>_<member>`` (several
    members only) and ``cv_model_total`` (the registered model's own out-of-fold score)."""
    values = {f"temperature_{group}": t for group, t in (calibration.temperatures or {}).items()}
    if calibration.parts > 1:
        values |= {f"weight_{group}_{k}": float(w) for group, weights in calibration.weights.items()
                   for k, w in enumerate(weights)}  # fmt: skip
    return values | {"cv_model_total": model_score.total}
