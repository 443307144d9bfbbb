"""MLflow, generically: find-or-create runs by tags, child runs, params, metrics, texts and figures.

Everything goes through an :class:`mlflow.MlflowClient` bound to an explicit tracking URI; this module never
sets MLflow's global tracking URI or active run, so several stores can be used in one process (tests, a driver
logging to a server while a worker logs elsewhere) without leaking into each other. It knows nothing of the
stages that use it: the CV's own tables and plots are logged by :mod:`lumbar_ray.train.report`, the detectors'
by :mod:`lumbar_ray.localize.stage`.

Runs are found again by tags, so an interrupted stage that is run again continues its runs instead of starting
new ones: a stage's parent run by ``lumbar_ray.run_id`` (its stable id) and ``lumbar_ray.kind``, a child run by
``mlflow.parentRunId`` and one tag of the caller's choosing (``lumbar_ray.fold=<k>``, ``lumbar_ray.detector``).

Dataset inputs (:func:`log_dataset_input`) are logged once per run, however often a stage continues it; system
metrics (:func:`system_metrics`: CPU, memory, disk, network and, with NVIDIA's ``pynvml``, GPU, as MLflow's
``system/*`` metrics) are sampled by MLflow's own monitor thread for as long as a block runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException

from lumbar_ray.config import Config
from lumbar_ray.paths import tracking_uri_for
from lumbar_ray.provenance import git_commit, package_version

logger = logging.getLogger(__name__)

RUN_ID_TAG = "lumbar_ray.run_id"
KIND_TAG = "lumbar_ray.kind"
VERSION_TAG = "lumbar_ray.version"
COMMIT_TAG = "lumbar_ray.git_commit"
PARENT_TAG = "mlflow.parentRunId"
DATASET_CONTEXT_TAG = "mlflow.data.context"
"""MLflow's input tag saying what a dataset was to a run (``train``, ``eval``): ``mlflow.utils.mlflow_tags``."""
# MLflow's limits (mlflow.utils.validation); constants here so that a refactor there cannot break imports.
_MAX_PARAM_LENGTH = 6000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
# Config sections keyed by dotted config paths: one JSON param each, or their keys would read as nested sections.
_WHOLE_SECTIONS = ("tune.space",)


def flatten_params(tree: dict[str, Any], whole: tuple[str, ...] = _WHOLE_SECTIONS) -> dict[str, str]:
    """A nested settings tree as MLflow params: ``section.key -> value``.

    Non-string values are JSON (``true``, ``null``, ``[1, 2]``) so that a param pasted back as an override
    (``key=value``) parses to the same value; values are cut to MLflow's length limit.

    Args:
        tree: nested dicts of plain values (e.g. ``Config.model_dump(mode="json")``).
        whole: dotted prefixes logged as one JSON param each.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and prefix not in whole:
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else key, value)
            return
        text = node if isinstance(node, str) else json.dumps(node)
        flat[prefix] = text[:_MAX_PARAM_LENGTH]

    visit("", tree)
    return flat


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def quote(value: str) -> str:
    """A value for an MLflow filter string (single-quoted; a quote inside cannot be escaped there)."""
    if "'" in value:
        raise ValueError(f"{value!r}: run ids and names may not contain a single quote")
    return f"'{value}'"


def log_values(client: MlflowClient, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log ``values`` as metrics of ``run_id`` at ``step``, in as few requests as MLflow's batch limit allows."""
    stamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()]
    for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log ``params`` in batches of MLflow's limit; keys the run already has are left as they are."""
    existing = client.get_run(run_id).data.params
    new = [Param(key, value) for key, value in params.items() if key not in existing]
    for chunk in _chunks(new, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def local_dataset(name: str, digest: str, path: str, profile: dict[str, Any] | None = None) -> Dataset:
    """An MLflow dataset of files in a local folder: ``source`` is ``{"uri": path}`` (as MLflow's own local
    sources write it), ``profile`` any JSON-able summary (it is shown beside the dataset)."""
    return Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": str(path)}),
                   profile=None if profile is None else json.dumps(profile))  # fmt: skip


def log_dataset_input(client: MlflowClient, run_id: str, dataset: Dataset, context: str) -> bool:
    """Log ``dataset`` as an input of ``run_id`` (tagged ``mlflow.data.context=<context>``), unless the run already
    has an input of the same name and digest: a continued run gains no duplicate.

    Returns:
        Whether it was logged now.
    """
    for existing in client.get_run(run_id).inputs.dataset_inputs:
        if (existing.dataset.name, existing.dataset.digest) == (dataset.name, dataset.digest):
            return False
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])])
    return True


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval: float) -> Iterator[None]:
    """Sample the machine's system metrics into ``run_id`` every ``interval`` seconds while the block runs.

    MLflow's :class:`~mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` (a thread; its
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides ``interval``) logs ``system/*`` metrics, continuing the
    steps a restarted block logged before; it stops by itself when the run is no longer RUNNING. Monitoring that
    cannot start is a warning, never an error of the block.
    """
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                       tracking_uri=tracking_uri)  # fmt: skip
        monitor.start()
    except Exception as exc:  # e.g. psutil missing: the run goes on without system metrics
        logger.warning("MLflow: no system metrics for run %s (%s)", run_id, exc)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database, not into ``./mlartifacts`` of the cwd."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or a remote database chooses its own artifact root
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlartifacts").as_uri()


def _reuse_run(client: MlflowClient, run: Run, what: str) -> str:
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
    """One experiment of one MLflow store: find-or-create runs, log to them, end them.

    Args:
        uri: the tracking (and registry) URI.
        experiment: the experiment's name; created (or restored, if deleted) when needed.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = self._experiment(experiment)
        logger.info("MLflow: experiment %r (%s) in %s", experiment, self.experiment_id, uri)

    @classmethod
    def from_config(cls, cfg: Config) -> Tracker:
        """The store and experiment a config names (``tracking.*``, see :func:`lumbar_ray.paths.tracking_uri_for`)."""
        return cls(tracking_uri_for(cfg), cfg.tracking.experiment)

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

    def find_run(self, tags: dict[str, str]) -> Run | None:
        """The newest active run of the experiment carrying every one of ``tags``, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=" and ".join(f"tags.`{key}` = {quote(value)}" for key, value in tags.items()),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def run_for(
        self,
        tags: dict[str, str],
        run_name: str,
        nest_under: str | None = None,
        config: Config | None = None,
        params: dict[str, str] | None = None,
    ) -> str:
        """Find the run carrying ``tags`` (a rerun continues it) or create it, with provenance tags.

        Args:
            tags: the tags that identify the run (and are set on a new one).
            run_name: the name of a new run.
            nest_under: a run to hang a new run under as a child; None = top level.
            config: a resolved config to log on a new run (params ``section.key`` and ``config.yaml``).
            params: further params of a new run.

        Returns:
            The MLflow run id, with the run RUNNING.
        """
        found = self.find_run(tags)
        if found is not None:
            return _reuse_run(self.client, found, run_name)
        new_tags = dict(tags) | {VERSION_TAG: package_version()}
        if nest_under:
            new_tags[PARENT_TAG] = nest_under
        commit = git_commit()
        if commit:
            new_tags |= {COMMIT_TAG: commit, "mlflow.source.git.commit": commit}
        run_id = self.client.create_run(self.experiment_id, tags=new_tags, run_name=run_name).info.run_id
        if config is not None:
            log_params(self.client, run_id, flatten_params(config.model_dump(mode="json")))
            self.client.log_text(run_id, config.to_yaml(), "config.yaml")
        if params:
            log_params(self.client, run_id, params)
        logger.info("MLflow: created run %s (%s)", run_id, run_name)
        return run_id

    def parent_run(self, run_id: str, kind: str, nest_under: str | None = None, config: Config | None = None) -> str:
        """Find or create a stage's run by its stable id and kind (``cv``, ``localize``), see :meth:`run_for`."""
        return self.run_for({RUN_ID_TAG: run_id, KIND_TAG: kind}, run_id, nest_under=nest_under, config=config)

    def child_run(self, parent: str, tag: str, value: str, kind: str, run_name: str) -> str:
        """See :func:`child_run`."""
        return child_run(self.client, parent, tag, value, kind, run_name)

    def log_values(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        """See :func:`log_values`."""
        log_values(self.client, run_id, values, step)

    def log_dataset_input(self, run_id: str, dataset: Dataset, context: str) -> bool:
        """See :func:`log_dataset_input`."""
        return log_dataset_input(self.client, run_id, dataset, context)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set ``tags`` on ``run_id`` (a tag it has already is overwritten)."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """A text artifact (CSV, JSON, YAML) of ``run_id``."""
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure: Figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact of ``run_id``."""
        self.client.log_figure(run_id, figure, artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End ``run_id`` with ``status`` (``FINISHED`` or ``FAILED``)."""
        self.client.set_terminated(run_id, status)


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

    def system_metrics(self, interval: float) -> contextlib.AbstractContextManager[None]:
        """See :func:`system_metrics` (the block's machine sampled into this run)."""
        return system_metrics(self.tracking_uri, self.run_id, interval)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at ``step=epoch`` in one request (non-numeric values are left out)."""
        numeric = {key: value for key, value in metrics.items() if isinstance(value, (int, float, np.number))}
        log_values(self.client, self.run_id, numeric, step=int(epoch))
