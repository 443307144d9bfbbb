"""The trial: one k-fold CV with the sampled settings, through the same fold trainer as ``lumbar-ray train``.

A trial is a plain function (a "driver" holding no resources of its own): for each fold it builds and fits that
fold's ``TorchTrainer`` via :func:`lumbar_ray.train.cv.train_folds`, then reports the running mean of the fold
scores and the number of folds done, so ASHA (``time_attr=folds_done``) can stop a poor trial after its first
fold(s). Each report carries a checkpoint with the finished folds' outcomes: a trial restarted after a failure or
a resumed tuning run picks them up and trains only the folds still missing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lumbar_ray.config import Config
from lumbar_ray.data.splits import save_folds
from lumbar_ray.paths import FOLDS_CSV, cv_run_id, fold_outcome_path, run_dir_for
from lumbar_ray.tracking import log_params
from lumbar_ray.train.cv import finish_cv, start_cv, train_folds
from lumbar_ray.train.inputs import CVInputs
from lumbar_ray.tune.space import apply_params

logger = logging.getLogger(__name__)

METRIC = "cv_score"
TIME_ATTR = "folds_done"
TRIAL_TAG = "lumbar_ray.trial"


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The config one trial trains: the base with the sampled params, the tuned folds, no registration."""
    cfg = apply_params(base, params)
    train = cfg.train.model_copy(update={"folds": base.tune.folds, "run_id": None})
    tracking = cfg.tracking.model_copy(update={"register_model": False})
    return cfg.model_copy(update={"train": train, "tracking": tracking})


def restore_folds(run_dir: Path) -> list[str]:
    """Copy the finished folds of this trial's latest Tune checkpoint into its run folder (on a restart)."""
    import ray.tune

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return []
    restored = []
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for path in sorted(Path(folder).glob("fold*.pt")):
            if not (run_dir / path.name).is_file():
                shutil.copy2(path, run_dir / path.name)
                restored.append(path.name)
    logger.info("trial resumed from its checkpoint: %s", restored or "nothing new")
    return restored


def cv_trial(params: dict[str, Any], base: dict[str, Any], inputs: CVInputs, tune_parent: str | None) -> None:
    """Ray Tune function trainable: train the CV's folds, reporting ``cv_score`` and ``folds_done`` after each.

    Args:
        params: the sampled settings (dotted config key -> value).
        base: the tuning run's resolved config (as a dict).
        inputs: the CV inputs prepared once by the tuning driver.
        tune_parent: the tuning run's MLflow run id; the trial's CV run is its child.
    """
    import ray.tune

    cfg = trial_config(Config.model_validate(base), params)
    restore_folds(run_dir_for(cfg, cv_run_id(cfg)))
    run = start_cv(cfg, inputs, nest_under=tune_parent)
    if not (run.run_dir / FOLDS_CSV).is_file():
        save_folds(inputs.folds, run.run_dir / FOLDS_CSV)
    run.tracker.client.set_tag(run.parent, TRIAL_TAG, ray.tune.get_context().get_trial_id())
    # The sampled values under their own keys (list settings are one JSON param in the config's flattening).
    log_params(run.tracker.client, run.parent, {key: json.dumps(value) for key, value in params.items()})
    wanted = len(cfg.train.folds) if cfg.train.folds is not None else cfg.cv.n_folds
    outcomes, trained, skipped = {}, [], []
    for fold, outcome, trained_now in train_folds(cfg, run):
        outcomes[fold] = outcome
        (trained if trained_now else skipped).append(fold)
        running = float(np.mean([o.best_score for o in outcomes.values()]))
        metrics = {METRIC: running, TIME_ATTR: len(outcomes), "fold": fold, "fold_score": outcome.best_score,
                   "run_id": run.run_id}  # fmt: skip
        run.tracker.log_values(run.parent, {"running_cv_score": running}, step=len(outcomes))
        run.tracker.log_values(run.parent, {"fold_score": outcome.best_score}, step=fold)
        if len(outcomes) == wanted:  # the last report also carries the out-of-fold score of the whole CV
            metrics["oof_score"] = finish_cv(cfg, run, outcomes, trained, skipped).score.total
        _report_with_folds(metrics, run.run_dir, sorted(outcomes))


def _report_with_folds(metrics: dict[str, Any], run_dir: Path, folds: list[int]) -> None:
    """``ray.tune.report`` with a checkpoint holding every finished fold's outcome file."""
    import ray.tune

    with tempfile.TemporaryDirectory() as folder:
        for fold in folds:
            source = fold_outcome_path(run_dir, fold)
            shutil.copy2(source, Path(folder) / source.name)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))
