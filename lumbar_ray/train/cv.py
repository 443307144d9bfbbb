"""k-fold cross-validation on Ray Train: one ``TorchTrainer`` per fold, resumable, tracked in MLflow.

The CV has a stable run id (``train.run_id``, or a hash of every setting that changes what is learnt), which
names everything it writes:

- ``<train.storage>/<run_id>-fold<k>/``: Ray Train's run folder of fold ``k`` (checkpoints). Rerunning the same
  CV makes Ray resume an unfinished fold from its latest checkpoint;
- ``<workdir>/runs/<run_id>/``: ``folds.csv`` (written once, reused on resume), ``fold<k>.pt`` (a finished
  fold's best weights, out-of-fold probabilities and history; a rerun skips those folds), ``oof.csv``;
- MLflow: one parent run tagged with the run id (found again on resume), a child run per fold.

Targets without a crop (their series or coordinate is missing) are predicted by the training folds' prior, so
every training study gets out-of-fold predictions and the CV score is comparable with the prior baseline's on
the same folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lumbar_ray.baseline import fit_prior, prior_oof_probs
from lumbar_ray.config import LOCALIZE_RESOURCE_FIELDS, Config, cache_root_for, data_root_for
from lumbar_ray.data.rsna import RsnaData, encode_labels, load_rsna
from lumbar_ray.data.splits import load_folds, make_folds, save_folds
from lumbar_ray.metrics import ScoreResult, labels_to_submission, score_arrays

logger = logging.getLogger(__name__)

# Settings that change how fast or where a CV runs, not what it learns: left out of the run id.
_RESOURCE_KEYS = {
    "workdir": None,
    "preprocess": {"cache", "workers", "num_cpus", "strict"},
    "train": {
        "run_id",
        "folds",
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "loader_workers",
        "max_failures",
        "storage",
    },
    "tracking": None,
    "tune": None,
    # The detectors ship with the registered ensemble, so their settings are part of the run; not their resources.
    "localize": set(LOCALIZE_RESOURCE_FIELDS),
    "predict": None,
}


def resolve_run_id(cfg: Config) -> str:
    """``train.run_id``, else ``cv-`` + a hash of the settings that define the model (not the resources)."""
    if cfg.train.run_id:
        return cfg.train.run_id
    tree = cfg.model_dump(mode="json")
    for section, keys in _RESOURCE_KEYS.items():
        if keys is None:
            tree.pop(section, None)
        else:
            for key in keys:
                tree[section].pop(key, None)
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]
    return f"cv-{digest}"


def storage_for(cfg: Config) -> str:
    """Ray Train's storage path: ``train.storage``, else ``$LUMBAR_RAY_STORAGE/ray_results`` (cluster.yaml sets it
    on every node), else ``<workdir>/ray_results`` (absolute, as Ray requires)."""
    if cfg.train.storage:
        return cfg.train.storage
    shared = os.environ.get("LUMBAR_RAY_STORAGE")
    return f"{shared.rstrip('/')}/ray_results" if shared else str((Path(cfg.workdir) / "ray_results").resolve())


def run_dir_for(cfg: Config, run_id: str) -> Path:
    """Where the driver keeps a CV's folds, finished fold outputs and OOF predictions."""
    return Path(cfg.workdir) / "runs" / run_id


@dataclass
class CVInputs:
    """What every fold needs, built once on the driver."""

    data: RsnaData
    study_ids: np.ndarray
    labels: np.ndarray
    folds: pd.DataFrame
    points: pd.DataFrame
    skipped_points: pd.DataFrame
    cache_root: str
    cache_settings: dict[str, Any]


@dataclass
class FoldOutcome:
    """A finished fold: its best epoch's weights and out-of-fold probabilities.

    ``starts`` lists the epoch each (re)start of the fold's workers began at (``[0]`` for an uninterrupted fold);
    ``ranks`` holds the last epoch's per-rank training samples and weight checksums.
    """

    fold: int
    best_score: float
    best_epoch: int
    study_ids: np.ndarray
    probs: np.ndarray
    history: list[dict[str, Any]]
    model_state: dict[str, torch.Tensor]
    starts: list[int] = field(default_factory=list)
    ranks: dict[str, list[float]] = field(default_factory=dict)
    checkpoint_path: str | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(self.__dict__, temporary)
        temporary.replace(path)  # a fold counts as done only once its file is whole

    @classmethod
    def load(cls, path: Path) -> FoldOutcome:
        return cls(**torch.load(path, map_location="cpu", weights_only=False))


@dataclass
class CVResult:
    """The outcome of :func:`run_cv`."""

    run_id: str
    score: ScoreResult
    baseline: ScoreResult
    oof: pd.DataFrame
    folds: pd.DataFrame
    outcomes: dict[int, FoldOutcome]
    trained_folds: list[int]
    skipped_folds: list[int]
    mlflow_run_id: str | None = None
    registered: Any = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"CV {self.run_id}: {len(self.outcomes)} folds ({len(self.trained_folds)} trained now, "
                 f"{len(self.skipped_folds)} already done)"]  # fmt: skip
        lines.append(f"  {'':<18} {'model':>9} {'prior':>9}")
        for name, value in self.score.to_dict().items():
            lines.append(f"  {name:<18} {value:>9.5f} {self.baseline.to_dict()[name]:>9.5f}")
        for fold, outcome in sorted(self.outcomes.items()):
            lines.append(f"  fold {fold}: best val score {outcome.best_score:.5f} at epoch {outcome.best_epoch}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow parent run: {self.mlflow_run_id}")
        if self.registered is not None:
            lines.append(f"  registered: {self.registered}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def prepare_inputs(cfg: Config, run_dir: Path) -> CVInputs:
    """Load the labels, make sure the cache is complete, fix the folds and map the label points."""
    from lumbar_ray.data.cache import SeriesCache
    from lumbar_ray.data.crops import points_from_coordinates
    from lumbar_ray.data.preprocess import cache_settings, run_preprocess

    root = data_root_for(cfg)
    if cfg.data.root is None and not (root / "train.csv").is_file():
        from lumbar_ray.data.synthetic import write_dataset

        write_dataset(root, cfg.synth)  # the embedded default: the built-in synthetic dataset
    data = load_rsna(root)
    if data.train is None or data.coordinates is None:
        raise FileNotFoundError(f"{root} has no train.csv or train_label_coordinates.csv: nothing to train on")
    cache_root = cache_root_for(cfg)
    summary = run_preprocess(root, cache_root, cfg.preprocess)  # resumable: only what is missing is decoded
    if summary.failed:
        logger.warning("%d series failed preprocessing; their targets fall back to the prior", summary.failed)
    settings = cache_settings(cfg.preprocess)
    study_ids, labels = encode_labels(data.train)
    folds_csv = run_dir / "folds.csv"
    if folds_csv.is_file():
        folds = load_folds(folds_csv)
    else:
        folds = make_folds(study_ids, labels, cfg.cv.n_folds, cfg.cv.seed)
        save_folds(folds, folds_csv)
    folds = folds.set_index("study_id").loc[study_ids].reset_index()
    points = points_from_coordinates(data.coordinates, SeriesCache(cache_root, settings), data.train_series)
    return CVInputs(data, study_ids, labels, folds, points.points, points.skipped, cache_root, settings)


def fold_payload(inputs: CVInputs, fold: int) -> dict[str, Any]:
    """The picklable part of a fold's ``train_loop_config``: ids, labels, points and where the cache is."""
    held_out = inputs.folds["fold"].to_numpy() == fold
    return {
        "cache_root": inputs.cache_root,
        "cache_settings": inputs.cache_settings,
        "points": inputs.points,
        "train_ids": inputs.study_ids[~held_out],
        "val_ids": inputs.study_ids[held_out],
        "train_labels": inputs.labels[~held_out],
        "val_labels": inputs.labels[held_out],
    }


def build_trainer(cfg: Config, train_loop_config: dict[str, Any], name: str):
    """The one ``TorchTrainer`` builder that training and tuning share."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lumbar_ray.train.worker import train_fold_loop

    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    return TorchTrainer(
        train_fold_loop,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_for(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest; it carries the best weights
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def run_fold(cfg: Config, inputs: CVInputs, fold: int, run_id: str, mlflow: dict[str, str] | None) -> FoldOutcome:
    """Train one fold with its own ``TorchTrainer`` (resuming from its checkpoint if one exists)."""
    payload = fold_payload(inputs, fold)
    config = {
        "cfg": cfg.model_dump(mode="json"),
        "fold": fold,
        "payload": payload,
        "prior": fit_prior(payload["train_labels"]),
        "mlflow": mlflow,
    }
    result = build_trainer(cfg, config, f"{run_id}-fold{fold}").fit()
    if result.error is not None:
        raise RuntimeError(f"fold {fold} failed") from result.error
    from lumbar_ray.train.worker import _load_state

    state = _load_state(result.checkpoint)
    if state is None:
        raise RuntimeError(f"fold {fold} finished without a checkpoint")
    best = state["best"]
    return FoldOutcome(
        fold=fold,
        best_score=float(best["score"]),
        best_epoch=int(best["epoch"]),
        study_ids=np.asarray(best["study_ids"]),
        probs=np.asarray(best["probs"]),
        history=state["history"],
        model_state=best["model"],
        starts=list(state.get("starts", [])),
        ranks=dict(state.get("ranks", {})),
        checkpoint_path=result.checkpoint.path,
    )


def assemble_oof(inputs: CVInputs, outcomes: dict[int, FoldOutcome]) -> np.ndarray:
    """``(n, 25, 3)`` out-of-fold probabilities aligned with ``inputs.study_ids``."""
    position = {int(study): i for i, study in enumerate(inputs.study_ids)}
    probs = np.full((len(inputs.study_ids), *next(iter(outcomes.values())).probs.shape[1:]), np.nan)
    for outcome in outcomes.values():
        probs[[position[int(s)] for s in outcome.study_ids]] = outcome.probs
    missing = np.isnan(probs).any(axis=(1, 2))
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} studies have no out-of-fold prediction")
    return probs


def wanted_folds(cfg: Config) -> list[int]:
    """The folds a run trains: ``train.folds`` or all of ``cv.n_folds``."""
    return list(cfg.train.folds) if cfg.train.folds is not None else list(range(cfg.cv.n_folds))


def train_folds(
    cfg: Config, inputs: CVInputs, run_id: str, run_dir: Path, tracker: Any, parent: str
) -> Iterator[tuple[int, FoldOutcome, bool]]:
    """Train the wanted folds one after another, each with its own ``TorchTrainer``; skip finished ones.

    Yields after every fold, so that a caller (a Tune trial) can report the running score between folds.

    Yields:
        ``(fold, outcome, trained_now)``; ``trained_now`` is False for a fold found finished on disk.
    """
    wanted = wanted_folds(cfg)
    for index, fold in enumerate(wanted):
        path = run_dir / f"fold{fold}.pt"
        if path.is_file():
            logger.info("fold %d already finished (%s): skipped", fold, path)
            yield fold, FoldOutcome.load(path), False
            continue
        child = tracker.fold_run(parent, fold)
        logger.info("fold %d (%d of %d): training on %d workers", fold, index + 1, len(wanted), cfg.train.num_workers)
        started = time.perf_counter()
        outcome = run_fold(cfg, inputs, fold, run_id, {"tracking_uri": tracker.uri, "run_id": child})
        logger.info("fold %d done in %.0f s: best val score %.5f at epoch %d", fold, time.perf_counter() - started,
                    outcome.best_score, outcome.best_epoch)  # fmt: skip
        outcome.save(path)
        tracker.finish_fold(child, outcome)
        yield fold, outcome, True


def start_cv(cfg: Config, inputs: CVInputs | None = None, nest_under: str | None = None) -> tuple:
    """Everything a CV needs before its first fold: run id and folder, inputs, Ray, the MLflow parent run.

    Args:
        cfg: the resolved config.
        inputs: prepared inputs to reuse (Tune trials get them from the tuning driver); None = prepare here.
        nest_under: an MLflow run to hang the CV's parent run under (a tuning run); None = top level.

    Returns:
        ``(run_id, run_dir, inputs, tracker, parent)``.
    """
    from lumbar_ray.data.preprocess import ensure_ray
    from lumbar_ray.tracking import Tracker

    run_id = resolve_run_id(cfg)
    run_dir = run_dir_for(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    logger.info("CV run %s: folds under %s, checkpoints under %s", run_id, run_dir, storage_for(cfg))
    if inputs is None:
        inputs = prepare_inputs(cfg, run_dir)
    ensure_ray()
    tracker = Tracker(cfg)
    parent = tracker.parent_run(run_id, nest_under=nest_under)
    return run_id, run_dir, inputs, tracker, parent


def run_cv(cfg: Config) -> CVResult:
    """Train every fold (skipping finished ones), score out of fold against the prior, log and register.

    Args:
        cfg: the resolved config (``train``, ``model``, ``crop``, ``augment``, ``loss``, ``cv``, ``tracking``).

    Returns:
        The CV result, also written under ``<workdir>/runs/<run_id>/`` and to MLflow.
    """
    run_id, run_dir, inputs, tracker, parent = start_cv(cfg)
    outcomes, trained, skipped = {}, [], []
    for fold, outcome, trained_now in train_folds(cfg, inputs, run_id, run_dir, tracker, parent):
        outcomes[fold] = outcome
        (trained if trained_now else skipped).append(fold)
    return finish_cv(cfg, inputs, run_id, run_dir, outcomes, trained, skipped, tracker, parent)


def finish_cv(
    cfg: Config,
    inputs: CVInputs,
    run_id: str,
    run_dir: Path,
    outcomes: dict[int, FoldOutcome],
    trained: list[int],
    skipped: list[int],
    tracker: Any,
    parent: str,
) -> CVResult:
    """Score the OOF predictions of the folds run, against the prior on the same folds; log; register."""
    in_folds = inputs.folds["fold"].isin(list(outcomes)).to_numpy()
    sub_inputs = CVInputs(
        inputs.data, inputs.study_ids[in_folds], inputs.labels[in_folds], inputs.folds[in_folds],
        inputs.points, inputs.skipped_points, inputs.cache_root, inputs.cache_settings,
    )  # fmt: skip
    probs = assemble_oof(sub_inputs, outcomes)
    labels = sub_inputs.labels
    score = score_arrays(labels, probs)
    prior = prior_oof_probs(inputs.labels, inputs.folds["fold"].to_numpy())[in_folds]
    baseline = score_arrays(labels, prior)
    oof = labels_to_submission(sub_inputs.study_ids, probs)
    oof.to_csv(run_dir / "oof.csv", index=False)
    notes = []
    if len(inputs.skipped_points):
        notes.append(f"{len(inputs.skipped_points)} label points could not be mapped (prior used): see MLflow")
    if len(outcomes) < cfg.cv.n_folds:
        notes.append(f"only folds {sorted(outcomes)} of {cfg.cv.n_folds}: the score covers their studies only")
    result = CVResult(run_id, score, baseline, oof, inputs.folds, outcomes, trained, skipped, parent, None, notes)
    tracker.log_cv(parent, result, labels, probs, inputs.skipped_points)
    if cfg.tracking.register_model and len(outcomes) == cfg.cv.n_folds:
        fold_of = inputs.folds["fold"].to_numpy()
        fold_priors = {k: fit_prior(inputs.labels[fold_of != k]) for k in outcomes}
        result.registered = register_once(
            cfg, outcomes, tracker.uri, parent, score.total, fit_prior(inputs.labels), fold_priors
        )
    tracker.finish(parent)
    logger.info("CV %s: score %.5f (prior %.5f)", run_id, score.total, baseline.total)
    return result


REGISTERED_TAG = "lumbar_ray.registered_version"


def register_once(
    cfg: Config,
    outcomes: dict[int, FoldOutcome],
    uri: str,
    parent: str,
    cv_score: float,
    prior: np.ndarray | None = None,
    fold_priors: dict[int, np.ndarray] | None = None,
) -> Any:
    """Log and register the fold ensemble of a complete CV, once per CV run, with the level detectors of its
    config when they were trained (``lumbar-ray localize``) so that the model localises new studies itself.

    ``prior`` (all training labels) and ``fold_priors`` (fold -> the prior of that fold's training studies) are
    what the model predicts for a target without a crop.

    A rerun that finds every fold done (and the ensemble already registered from this parent run) must not add
    a duplicate model version; the parent run's tag records the version.
    """
    from mlflow import MlflowClient

    from lumbar_ray.registry import ensemble_contract, log_and_register

    client = MlflowClient(uri)
    done = client.get_run(parent).data.tags.get(REGISTERED_TAG)
    if done is not None:
        logger.info("the ensemble of this CV is already registered (version %s): not registering again", done)
        return f"{cfg.tracking.model_name} version {done} (registered earlier)"
    from lumbar_ray.localize.stage import trained_detectors

    states = {fold: outcome.model_state for fold, outcome in sorted(outcomes.items())}
    detectors = trained_detectors(cfg)
    if not detectors:
        logger.warning("no level detectors trained for this config: the model can only predict from given points")
    contract = ensemble_contract(cfg, sorted(outcomes), prior, sorted(detectors), fold_priors)
    registered = log_and_register(states, contract, cfg.tracking, uri, parent, cv_score, detectors)
    client.set_tag(parent, REGISTERED_TAG, str(registered.version))
    return registered
