"""MLflow for a tuning run: the parent run (search space, budget, best config and score, plots).

Each trial's CV run is a child of it (``start_cv(..., nest_under=parent)``), with the trial's full config as
params and its per-fold and running scores; its fold runs hang below it as in ``lumbar-ray train``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Param

from lumbar_ray.config import Config
from lumbar_ray.tracking import KIND_TAG, PARENT_TAG, Tracker, log_params, quote
from lumbar_ray.tune.trainable import METRIC

logger = logging.getLogger(__name__)

TUNE_TAG = "lumbar_ray.tune"


def tune_parent_run(tracker: Tracker, cfg: Config) -> str:
    """Find (on resume) or create the tuning run named ``tune.name``; a new one logs the space and the budget."""
    tags = {TUNE_TAG: cfg.tune.name, KIND_TAG: "tune"}
    if tracker.find_run(tags) is not None:
        return tracker.run_for(tags, f"tune-{cfg.tune.name}")
    parent = tracker.run_for(tags, f"tune-{cfg.tune.name}")
    settings = cfg.tune.model_dump(mode="json")
    space = settings.pop("space")
    params = {f"tune.{key}": json.dumps(value) for key, value in settings.items()}
    log_params(tracker.client, parent, params | {f"space.{key}": json.dumps(dim) for key, dim in space.items()})
    tracker.client.log_dict(parent, space, "search_space.json")
    tracker.log_text(parent, cfg.to_yaml(), "base_config.yaml")
    return parent


def score_by_trial(trials: pd.DataFrame) -> Figure:
    """Each trial's (running) CV score in trial order: complete trials filled, early-stopped ones hollow."""
    figure = Figure(figsize=(7, 3.5))
    axes = figure.subplots()
    order = np.arange(len(trials))
    complete = (trials["status"] == "complete").to_numpy()
    scores = trials[METRIC].astype(float).to_numpy()
    axes.scatter(order[complete], scores[complete], label="complete", color="tab:blue")
    axes.scatter(order[~complete], scores[~complete], label="stopped early (running mean)", facecolors="none",
                 edgecolors="tab:red")  # fmt: skip
    axes.set_xticks(order, [str(t)[-5:] for t in trials["trial_id"]], rotation=45, fontsize=7)
    axes.set_xlabel("trial")
    axes.set_ylabel("CV score (lower is better)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def param_importances(trials: pd.DataFrame, cfg: Config, domains: dict[str, Any]) -> dict[str, float]:
    """Optuna's fANOVA importances of the searched settings over the complete trials (needs >= 2 of them).

    Args:
        trials: the trial table.
        cfg: the tuning config (``tune.space`` names the settings).
        domains: the Ray Tune domains of the space (``lumbar_ray.tune.run.search_space``).
    """
    import optuna
    from ray.tune.search.optuna.optuna_search import OptunaSearch

    complete = trials[trials["status"] == "complete"]
    if len(complete) < 2:
        return {}
    distributions = OptunaSearch.convert_search_space(domains)
    study = optuna.create_study(direction="minimize")
    for _, row in complete.iterrows():
        params = {key: row[key] for key in cfg.tune.space}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row[METRIC]))
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same
        logger.warning("parameter importances not computed: %s", exc)
        return {}


def importance_figure(importances: dict[str, float]) -> Figure:
    figure = Figure(figsize=(6, 0.4 * max(3, len(importances)) + 1))
    axes = figure.subplots()
    keys = list(importances)[::-1]
    axes.barh(keys, [importances[k] for k in keys], color="tab:green")
    axes.set_xlabel("importance (fANOVA, complete trials)")
    figure.tight_layout()
    return figure


def finish_tuning(
    tracker: Tracker,
    parent: str,
    cfg: Config,
    trials: pd.DataFrame,
    best_params: dict[str, Any],
    best_score: float,
    best_path: Path,
    domains: dict[str, Any],
) -> None:
    """Log the outcome to the tuning run, close the CV runs of early-stopped trials, end the tuning run."""
    client = tracker.client
    stopped = int((trials["status"] == "stopped early").sum())
    client.log_metric(parent, "best_cv_score", best_score)
    client.log_metric(parent, "trials", float(len(trials)))
    client.log_metric(parent, "trials_stopped_early", float(stopped))
    client.log_batch(parent, params=[Param(f"best.{key}", str(value)) for key, value in best_params.items()])
    client.log_text(parent, trials.to_csv(index=False), "trials.csv")
    client.log_artifact(parent, str(best_path))
    client.log_figure(parent, score_by_trial(trials), "plots/score_by_trial.png")
    importances = param_importances(trials, cfg, domains)
    if importances:
        client.log_dict(parent, importances, "param_importances.json")
        client.log_figure(parent, importance_figure(importances), "plots/param_importances.png")
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = {quote(parent)}")
    for child in children:
        if child.info.status == "RUNNING":  # ASHA ended the trial between folds: its CV never finished
            client.set_tag(child.info.run_id, "lumbar_ray.stopped_early", "true")
            client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent, status="FINISHED")
    logger.info("MLflow: tuning results logged to %s", parent)
