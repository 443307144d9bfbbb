"""The tuning driver: OptunaSearch (TPE, seeded) + ASHA over CV trials, resumable, tracked in MLflow.

``<tune storage>/<tune.name>/`` is Ray Tune's experiment folder (``Tuner.restore`` resumes it: finished trials are
kept, unfinished ones continue from their fold checkpoints, the searcher's state comes back, so the run ends with
exactly ``tune.num_samples`` trials). ``<workdir>/tune/<tune.name>/`` gets ``trials.csv`` and ``best.yaml``, a
complete config that ``lumbar-ray train --config`` takes as is.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from lumbar_ray.config import Config, ConfigError, SearchDim
from lumbar_ray.paths import cv_run_id, run_dir_for, tune_dir_for, tune_storage_for, with_resolved_storage
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.registry import RegisteredEnsemble
from lumbar_ray.tracking import Tracker
from lumbar_ray.train.cv import run_cv
from lumbar_ray.train.inputs import prepare_inputs
from lumbar_ray.train.register import register_cv
from lumbar_ray.tune.report import finish_tuning, tune_parent_run
from lumbar_ray.tune.space import apply_params, check_space, warn_if_class_weights_searched
from lumbar_ray.tune.trainable import METRIC, TIME_ATTR, cv_trial

if TYPE_CHECKING:  # Ray Tune's types, for annotations only: importing ray.tune costs seconds
    from ray.tune import ResultGrid, Tuner

logger = logging.getLogger(__name__)

TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


@dataclass
class TuneResult:
    """What a tuning run found."""

    name: str
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_score: float
    best_config_path: Path
    stopped_early: int
    mlflow_run_id: str
    registered: RegisteredEnsemble | str | None = None

    def format(self) -> str:
        done = int((self.trials["status"] == "complete").sum())
        lines = [f"tuning {self.name!r}: {len(self.trials)} trials ({done} complete, {self.stopped_early} stopped "
                 f"early by ASHA)", f"  best CV score {self.best_score:.5f} with:"]  # fmt: skip
        lines += [f"    {key} = {value:.6g}" if isinstance(value, float) else f"    {key} = {value}"
                  for key, value in self.best_params.items()]  # fmt: skip
        lines.append(f"  best config: {self.best_config_path}  (lumbar-ray train --config {self.best_config_path})")
        lines.append(f"  MLflow tuning run: {self.mlflow_run_id}")
        if self.registered is not None:
            lines.append(f"  registered: {self.registered}")
        return "\n".join(lines)


def tune_domain(dim: SearchDim) -> Any:
    """The Ray Tune domain of one searched setting (OptunaSearch converts it to an Optuna distribution)."""
    from ray import tune

    if dim.dist == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.dist == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.dist == "int":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # randint's upper bound is exclusive
    return tune.choice(list(dim.values))


def search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """``tune.space`` as a flat Ray Tune ``param_space`` (dotted key -> domain)."""
    return {key: tune_domain(dim) for key, dim in space.items()}


def folds_per_trial(cfg: Config) -> int:
    return len(cfg.tune.folds) if cfg.tune.folds is not None else cfg.cv.n_folds


def max_concurrency(cfg: Config, resources: dict[str, float]) -> int:
    """Trials that fit at once: the cluster's CPUs (and GPUs) over one trial's ``TorchTrainer`` workers."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = cfg.train.num_workers
    fits = [resources.get("CPU", 1.0) // (workers * cfg.train.cpus_per_worker)]
    if cfg.train.use_gpu:
        fits.append(resources.get("GPU", 0.0) // workers)
    return max(1, int(min(fits)))


def _experiment_path(cfg: Config) -> str:
    return f"{tune_storage_for(cfg).rstrip('/')}/{cfg.tune.name}"


def experiment_exists(cfg: Config) -> bool:
    """Whether the tuning experiment ``tune.name`` exists in its storage (so it can be resumed)."""
    from ray import tune

    return tune.Tuner.can_restore(_experiment_path(cfg))


def build_tuner(cfg: Config, trainable: Callable[..., None], concurrency: int) -> Tuner:
    """A fresh ``Tuner``: seeded OptunaSearch (TPE), ASHA over folds done, trial retries."""
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    storage = None
    if cfg.tune.optuna_storage:
        import optuna

        storage = optuna.storages.RDBStorage(cfg.tune.optuna_storage)
    searcher = OptunaSearch(
        metric=METRIC, mode="min", sampler=TPESampler(seed=cfg.tune.seed), study_name=cfg.tune.name, storage=storage
    )
    scheduler = ASHAScheduler(
        time_attr=TIME_ATTR, max_t=folds_per_trial(cfg), grace_period=min(cfg.tune.grace_period, folds_per_trial(cfg)),
        reduction_factor=cfg.tune.reduction_factor,
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=cfg.tune.name,
            storage_path=tune_storage_for(cfg),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.trial_max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # each checkpoint holds every finished fold
        ),
    )


def trials_frame(results: ResultGrid, n_folds: int, keys: list[str]) -> pd.DataFrame:
    """One row per trial: id, status (complete / stopped early / error), folds done, score, params."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        folds_done = int(metrics.get(TIME_ATTR, 0))
        if result.error is not None:
            status = "error"
        elif folds_done >= n_folds:
            status = "complete"
        else:
            status = "stopped early"
        row = {
            "trial_id": metrics.get("trial_id"),
            "status": status,
            TIME_ATTR: folds_done,
            METRIC: metrics.get(METRIC),
            "oof_score": metrics.get("oof_score"),
            "cv_run_id": metrics.get("run_id"),
        }
        row |= {key: result.config.get(key) for key in keys}
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def best_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The base config with the best params: what ``lumbar-ray train --config best.yaml`` retrains."""
    return apply_params(cfg, params)


def run_tune(cfg: Config, resume: bool = False, register_best: bool = False) -> TuneResult:
    """Search ``tune.space`` with OptunaSearch + ASHA over CV trials; write and log the best config.

    Args:
        cfg: the resolved config; ``tune.*`` sets the search, the rest is the base every trial starts from.
        resume: continue the interrupted experiment ``tune.name`` (``Tuner.restore``).
        register_best: retrain the best config through ``run_cv`` (reusing the trial's fold checkpoints) and
            register the ensemble as ``lumbar-ray train`` does.

    Raises:
        ConfigError: resuming an experiment that does not exist, or starting one that does without ``resume``.
    """
    import ray
    from ray import tune

    warn_if_class_weights_searched(cfg.tune.space)
    check_space(cfg)
    out_dir = tune_dir_for(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _experiment_path(cfg)
    ensure_ray()
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"nothing to resume: no tuning experiment at {path}")
    if exists and not resume:
        raise ConfigError(f"a tuning experiment already exists at {path}: pass --resume, or change tune.name")
    inputs = prepare_inputs(cfg, out_dir)  # once for every trial: labels, cache, folds, label points
    tracker = Tracker.from_config(cfg)
    parent = tune_parent_run(tracker, cfg)
    base = with_resolved_storage(cfg).model_dump(mode="json")  # a trial runs on any node
    trainable = tune.with_parameters(cv_trial, base=base, inputs=inputs, tune_parent=parent)
    # The trial only waits on its TorchTrainers, which hold the CPUs. Tune refuses an empty request, and any CPU
    # fraction would leave a trial's workers one CPU short on a full machine: so one byte of memory, and no CPU.
    trainable = tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)
    if resume:
        logger.info("resuming tuning experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        concurrency = max_concurrency(cfg, ray.cluster_resources())
        logger.info(
            "tuning %s: %d trials, up to %d at once, %s", cfg.tune.name, cfg.tune.num_samples, concurrency, path
        )
        tuner = build_tuner(cfg, trainable, concurrency)
    results = tuner.fit()
    keys = list(cfg.tune.space)
    trials = trials_frame(results, folds_per_trial(cfg), keys)
    trials.to_csv(out_dir / "trials.csv", index=False)
    complete = trials[trials["status"] == "complete"]
    if complete.empty:
        raise RuntimeError(f"no trial of {cfg.tune.name} completed every fold: see {out_dir / 'trials.csv'}")
    best_row = complete.sort_values(METRIC).iloc[0]
    best_params = {key: _plain(best_row[key]) for key in keys}
    best = best_config(cfg, best_params)
    best_path = out_dir / "best.yaml"
    best_path.write_text(best.to_yaml())
    stopped = int((trials["status"] == "stopped early").sum())
    result = TuneResult(cfg.tune.name, trials, best_params, float(best_row[METRIC]), best_path, stopped, parent)
    finish_tuning(tracker, parent, cfg, trials, best_params, result.best_score, best_path, search_space(cfg.tune.space))
    if register_best:
        result.registered = register_best_config(best, results, best_row["trial_id"])
    return result


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones (YAML and pydantic want plain values)."""
    return value.item() if hasattr(value, "item") else value


def register_best_config(best: Config, results: ResultGrid, trial_id: str) -> RegisteredEnsemble | str | None:
    """Retrain the best config with ``run_cv`` and register it; the best trial's finished folds are reused."""
    run_dir = run_dir_for(best, cv_run_id(best))
    run_dir.mkdir(parents=True, exist_ok=True)
    for result in results:
        if (result.metrics or {}).get("trial_id") == trial_id and result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                for path in Path(folder).glob("fold*.pt"):
                    if not (run_dir / path.name).is_file():
                        shutil.copy2(path, run_dir / path.name)
    cv = run_cv(best)  # folds found on disk are skipped; the rest (if tune.folds was a subset) are trained
    registered = register_cv(best, cv)
    logger.info("best config retrained: CV %.5f; registered %s", cv.score.total, registered)
    return registered
