"""MLflow tracking of a k-fold CV: one parent run per CV, one child run per fold, epoch metrics from Ray workers.

Everything goes through an :class:`mlflow.MlflowClient` bound to an explicit tracking URI; this module never
sets MLflow's global tracking URI or active run, so several stores can be used in one process (tests, a driver
logging to a server while a worker logs elsewhere) without leaking into each other.

Runs are found again by tags, so an interrupted CV that is run again continues its runs instead of starting new
ones:

- parent: ``lumbar_ray.run_id=<CV run id>``, ``lumbar_ray.kind=cv``; it holds the resolved config (params
  ``section.key`` and ``config.yaml``), the CV and prior scores, ``oof.csv``, ``folds.csv``,
  ``skipped_points.csv`` and ``plots/*.png``;
- child: ``mlflow.parentRunId=<parent>``, ``lumbar_ray.fold=<k>``, named ``fold<k>``; per-epoch metrics (logged
  by :class:`RunLogger` on the rank-0 Ray worker, ``step`` = epoch, so a retried epoch overwrites its point) and
  the fold's training curves.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, ViewType
from mlflow.exceptions import MlflowException

from lumbar_ray import plots
from lumbar_ray.config import Config

if TYPE_CHECKING:
    from lumbar_ray.train.cv import CVResult, FoldOutcome

logger = logging.getLogger(__name__)

RUN_ID_TAG = "lumbar_ray.run_id"
KIND_TAG = "lumbar_ray.kind"
FOLD_TAG = "lumbar_ray.fold"
VERSION_TAG = "lumbar_ray.version"
COMMIT_TAG = "lumbar_ray.git_commit"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's limits (mlflow.utils.validation); constants here so that a refactor there cannot break imports.
_MAX_PARAM_LENGTH = 6000
_MAX_PER_BATCH = 100


def package_version() -> str:
    """The installed lumbar_ray version, or ``unknown`` when run from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lumbar_ray")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the checkout lumbar_ray runs from, or None (not a checkout, no git, a slow filesystem)."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else None


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<workdir>/mlflow.db``.

    The default is absolute, so Ray workers started in other directories log to the same store.
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database, not into ``./mlartifacts`` of the cwd."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or a remote database chooses its own artifact root
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlartifacts").as_uri()


def flatten_config(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.key -> value``.

    Non-string values are JSON (``true``, ``null``, ``[1, 2]``) so that a param pasted back as an override
    (``key=value``) parses to the same value; values are cut to MLflow's length limit.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        # tune.space is keyed by dotted config paths: one JSON param, or its keys would read as nested sections.
        if isinstance(node, dict) and prefix != "tune.space":
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else key, value)
            return
        text = node if isinstance(node, str) else json.dumps(node)
        flat[prefix] = text[:_MAX_PARAM_LENGTH]

    visit("", cfg.model_dump(mode="json"))
    return flat


def _chunks(items: list[Any], size: int = _MAX_PER_BATCH) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def quote(value: str) -> str:
    """A value for an MLflow filter string (single-quoted; a quote inside cannot be escaped there)."""
    if "'" in value:
        raise ValueError(f"{value!r}: run ids and names may not contain a single quote")
    return f"'{value}'"


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_values(client: MlflowClient, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log ``values`` as metrics of ``run_id`` at ``step``, in as few requests as MLflow's batch limit allows."""
    stamp = _now_ms()
    metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()]
    for chunk in _chunks(metrics, 1000):  # MLflow's metrics-per-batch limit
        client.log_batch(run_id, metrics=chunk)


def _reuse_run(client: MlflowClient, run: Any, what: str) -> str:
    run_id = run.info.run_id
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run_id, status="RUNNING")
    logger.info("MLflow: reusing %s run %s (was %s)", what, run_id, run.info.status)
    return run_id


def child_run(client: MlflowClient, parent: str, tag: str, value: str, kind: str, run_name: str) -> str:
    """Find the child run of ``parent`` tagged ``tag=value`` (a rerun reuses it), or create it; returned RUNNING.

    The child lives in its parent's experiment and inherits its stable run id tag.
    """
    parent_run = client.get_run(parent)
    found = client.search_runs(
        [parent_run.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = {quote(parent)} and tags.`{tag}` = {quote(value)}",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        return _reuse_run(client, found[0], run_name)
    tags = {PARENT_TAG: parent, tag: value, KIND_TAG: kind}
    if RUN_ID_TAG in parent_run.data.tags:
        tags[RUN_ID_TAG] = parent_run.data.tags[RUN_ID_TAG]
    run = client.create_run(parent_run.info.experiment_id, tags=tags, run_name=run_name)
    logger.info("MLflow: created child run %s (%s) of %s", run.info.run_id, run_name, parent)
    return run.info.run_id


class Tracker:
    """The driver side of a CV's tracking: parent and child runs, CV metrics, artifacts and plots.

    Args:
        cfg: the resolved config; ``cfg.tracking`` names the store and the experiment.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = self._experiment(cfg.tracking.experiment)
        logger.info("MLflow: experiment %r (%s) in %s", cfg.tracking.experiment, self.experiment_id, self.uri)

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri))
            except MlflowException:  # another process created it between the lookup and here
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            logger.warning("experiment %r was deleted; restoring it", name)
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def find_run(self, filter_string: str) -> Any:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def reuse_run(self, run: Any, what: str) -> str:
        return _reuse_run(self.client, run, what)

    def parent_run(self, run_id: str, nest_under: str | None = None, kind: str = "cv") -> str:
        """Find or create a stage's parent run; a new one gets the resolved config as params and ``config.yaml``.

        Args:
            run_id: the stage's stable run id (e.g. :func:`lumbar_ray.train.cv.resolve_run_id`).
            nest_under: an MLflow run (a tuning run) to hang this CV under as a child; None = top level.
            kind: the stage (``cv``, ``localize``): runs are found again by run id and kind.

        Returns:
            The MLflow run id, with the run RUNNING.
        """
        found = self.find_run(f"tags.`{RUN_ID_TAG}` = {quote(run_id)} and tags.`{KIND_TAG}` = {quote(kind)}")
        if found is not None:
            return self.reuse_run(found, f"{kind} {run_id!r}")
        tags = {RUN_ID_TAG: run_id, KIND_TAG: kind, VERSION_TAG: package_version()}
        if nest_under:
            tags[PARENT_TAG] = nest_under
        commit = git_commit()
        if commit:
            tags |= {COMMIT_TAG: commit, "mlflow.source.git.commit": commit}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_id)
        parent = run.info.run_id
        params = [Param(key, value) for key, value in flatten_config(self.cfg).items()]
        for chunk in _chunks(params):
            self.client.log_batch(parent, params=chunk)
        self.client.log_text(parent, self.cfg.to_yaml(), "config.yaml")
        logger.info("MLflow: created parent run %s for %s %r", parent, kind, run_id)
        return parent

    def fold_run(self, parent: str, fold: int) -> str:
        """Find or create fold ``fold``'s child run of ``parent`` (a rerun reuses it; epochs overwrite steps)."""
        return child_run(self.client, parent, FOLD_TAG, str(int(fold)), "fold", f"fold{fold}")

    def finish_fold(self, child: str, outcome: FoldOutcome) -> None:
        """Log the fold's best score and epoch and its training curves, then end the child run."""
        log_values(self.client, child, {"best_val_score": outcome.best_score, "best_epoch": outcome.best_epoch})
        self.client.log_figure(child, plots.training_curves(outcome.history), "plots/training_curves.png")
        self.client.set_terminated(child, "FINISHED")

    def log_cv(
        self,
        parent: str,
        result: CVResult,
        labels: np.ndarray,
        probs: np.ndarray,
        skipped_points: pd.DataFrame,
    ) -> None:
        """Log the CV's out-of-fold scores (``cv_*``) against the prior's (``prior_*``), tables and plots.

        Args:
            parent: the parent run.
            result: the CV result (scores, OOF submission frame, folds).
            labels: ``(n, 25)`` labels of the scored studies (IGNORE_INDEX where empty).
            probs: ``(n, 25, 3)`` their out-of-fold probabilities.
            skipped_points: label points that could not be mapped to the cache (logged when any).
        """
        values = result.score.to_dict(prefix="cv_") | result.baseline.to_dict(prefix="prior_")
        values |= {"cv_studies": float(len(labels)), "cv_folds": float(len(result.outcomes))}
        log_values(self.client, parent, values)
        self.client.log_text(parent, result.oof.to_csv(index=False), "oof.csv")
        self.client.log_text(parent, result.folds.to_csv(index=False), "folds.csv")
        if skipped_points is not None and len(skipped_points):
            self.client.log_text(parent, skipped_points.to_csv(index=False), "skipped_points.csv")
        self.client.log_figure(parent, plots.confusion_matrices(labels, probs), "plots/confusion_matrices.png")
        self.client.log_figure(parent, plots.level_score_heatmap(labels, probs), "plots/level_scores.png")
        logger.info("MLflow: CV metrics and artifacts logged to %s", parent)

    def finish(self, parent: str) -> None:
        """End the parent run (FINISHED)."""
        self.client.set_terminated(parent, "FINISHED")


class RunLogger:
    """Logs per-epoch metrics to one run from a Ray worker: cheap to build and to pickle.

    The client is created on first use, so the object travels to workers as two strings.

    Args:
        tracking_uri: the store (as :attr:`Tracker.uri`).
        run_id: the run to log to (a fold's child run).
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at ``step=epoch`` in one request (non-numeric values are left out)."""
        numeric = {key: value for key, value in metrics.items() if isinstance(value, (int, float, np.number))}
        log_values(self.client, self.run_id, numeric, step=int(epoch))
