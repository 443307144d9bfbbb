"""k-fold cross-validation on Ray Train: one ``TorchTrainer`` per fold, resumable, tracked in MLflow.

The CV has a stable run id (:func:`lumbar_ray.paths.cv_run_id`: ``train.run_id``, or a hash of every setting that
changes what is learnt), which names everything it writes:

- ``<train.storage>/<run_id>-fold<k>/``: Ray Train's run folder of fold ``k`` (its latest checkpoint and its best
  by the validation score). Rerunning the same CV makes Ray resume an unfinished fold from its latest checkpoint;
- ``<workdir>/runs/<run_id>/``: ``folds.csv`` (written once, reused on resume), ``fold<k>.pt`` (a finished
  fold's best weights, out-of-fold probabilities and history; a rerun skips those folds), ``oof.csv``;
- MLflow: one parent run tagged with the run id (found again on resume), a child run per fold
  (:mod:`lumbar_ray.train.report` logs them).

The digest of the training data (:mod:`lumbar_ray.data.lineage`) is recorded in the run folder
(``data_digest.json``) when the CV first starts, logged on its parent run (a dataset input and the tag
``lumbar_ray.data_digest``) and tagged on the version it registers, which the registry's alias rule compares. A
rerun whose data digests otherwise is refused (:class:`~lumbar_ray.errors.DataChangedError`): its finished folds
learnt other data. A CV folder from before digests were recorded takes the digest of its data as it is now.

Targets without a crop (their series or coordinate is missing) are predicted by the training folds' prior, so
every training study gets out-of-fold predictions and the CV score is comparable with the prior baseline's on
the same folds. The CV returns its result; registering the ensemble is a separate step
(:func:`lumbar_ray.train.register.register_cv`).

With ``calibrate.temperature`` the CV also fits a temperature per condition group on its out-of-fold predictions
(each fold's last epoch when kept: :func:`calibration_epoch`) and reports the cross-fitted score (each fold
calibrated by temperatures fitted on the other folds) beside the uncalibrated one; the temperatures fitted on every
fold go into the registered model's contract.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lumbar_ray.baseline import fit_prior, prior_oof_probs
from lumbar_ray.calibrate import OutOfFoldCalibration, calibrate_out_of_fold, cross_fit_calibration
from lumbar_ray.config import Config, ConfigError
from lumbar_ray.data.grading import known_floor
from lumbar_ray.data.lineage import DataDigest, data_digest
from lumbar_ray.errors import DataChangedError
from lumbar_ray.metrics import ScoreResult, labels_to_submission, score_arrays
from lumbar_ray.paths import (
    DATA_DIGEST_JSON,
    FOLDS_CSV,
    atomic_path,
    cv_run_id,
    data_root_for,
    fold_outcome_path,
    ray_storage_for,
    run_dir_for,
    with_resolved_storage,
)
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.tracking import RunLogger, Tracker
from lumbar_ray.train import report
from lumbar_ray.train.inputs import CVInputs, fold_payload, prepare_inputs
from lumbar_ray.train.worker import SCORE_ATTRIBUTE, FoldJob, FoldOutcome, load_checkpoint_state, train_fold_loop

if TYPE_CHECKING:  # for annotations only: importing ray.train costs seconds
    from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)


@dataclass
class CVCalibration:
    """Post-processing fitted on a CV's out-of-fold predictions (``calibrate.temperature``; an ensemble's blend).

    Attributes:
        fit: the calibration fitted on every fold, and the cross-fitted scores beside the uncalibrated one.
        epoch: ``last`` or ``best``: the epoch whose out-of-fold predictions it was fitted on and scored with.
        model_score: the registered model's own out-of-fold predictions (each fold's best-epoch weights, which
            are the ones registered), each fold post-processed by parameters fitted without it
            (:func:`cross_fitted_model_score`): the version's ``cv_score``, which moves the alias, so the
            post-processing does not flatter it with parameters fitted on the studies it scores (the best epoch,
            picked on each fold, still does a little).
    """

    fit: OutOfFoldCalibration
    epoch: str
    model_score: ScoreResult

    def info(self) -> dict[str, object]:
        """What the model's contract records beside the calibration: what it was fitted on and its scores."""
        scores = {name: score.total for name, score in self.fit.scores.items()}
        return {"fitted_on": f"{self.epoch} epoch, out of fold", "cv": scores | {"model": self.model_score.total}}

    def format(self) -> str:
        """The temperatures and the figures, as lines of the CV summary."""
        temperatures = self.fit.calibration.temperatures or {}
        fitted = ", ".join(f"{group} {value:.3f}" for group, value in temperatures.items())
        scores = ", ".join(f"{name} {score.total:.5f}" for name, score in self.fit.scores.items())
        return (f"  calibration: temperatures {fitted}, fitted on the {self.epoch} epoch's out-of-fold predictions;\n"
                f"    cross-fitted (each fold by temperatures fitted on the others): {scores}\n"
                f"    the registered model's own out-of-fold predictions (best-epoch weights, cross-fitted): "
                f"{self.model_score.total:.5f} (its cv_score)")  # fmt: skip


@dataclass
class CVResult:
    """The outcome of :func:`run_cv`: scores, OOF predictions, the folds, and the priors a registered ensemble
    falls back on (``prior`` over every training study, ``fold_priors`` over each fold's training studies)."""

    run_id: str
    score: ScoreResult
    baseline: ScoreResult
    oof: pd.DataFrame
    folds: pd.DataFrame
    outcomes: dict[int, FoldOutcome]
    trained_folds: list[int]
    skipped_folds: list[int]
    mlflow_run_id: str
    prior: np.ndarray
    fold_priors: dict[int, np.ndarray]
    complete: bool
    notes: list[str] = field(default_factory=list)
    last_epoch_score: ScoreResult | None = None
    floor: ScoreResult | None = None
    predicted_points_score: ScoreResult | None = None
    calibration: dict[str, float] = field(default_factory=dict)
    calibrated: CVCalibration | None = None
    data_digest: str | None = None

    def columns(self) -> dict[str, ScoreResult]:
        """The scores side by side: best epoch (picked on the scored fold: flattering), last epoch (honest: a fixed
        schedule), calibrated (``calibrate.temperature``: cross-fitted on the last epoch's, else the best's), the
        prior on the same folds, and where the data knows it, a perfect model on the same labels."""
        calibrated = None if self.calibrated is None else self.calibrated.fit.scores["calibrated"]
        named = {"best epoch": self.score, "last epoch": self.last_epoch_score, "calibrated": calibrated,
                 "predicted points": self.predicted_points_score, "prior": self.baseline,
                 "floor": self.floor}  # fmt: skip
        return {name: score for name, score in named.items() if score is not None}

    @property
    def model_score(self) -> ScoreResult:
        """The score of the registered model's own out-of-fold predictions (tagged ``cv_score`` on its version): the
        best epoch's, each fold calibrated by temperatures fitted without it when ``calibrate.temperature`` is on.
        The best epoch is still picked on the scored fold: the honest figures are the last epoch's columns."""
        return self.score if self.calibrated is None else self.calibrated.model_score

    def format(self, registered: object | None = None) -> str:
        """The CV as text; ``registered``: what registering it did (printed before the notes), if anything."""
        lines = [f"CV {self.run_id}: {len(self.outcomes)} folds ({len(self.trained_folds)} trained now, "
                 f"{len(self.skipped_folds)} already done)"]  # fmt: skip
        columns = self.columns()
        lines.append(f"  {'':<18}" + "".join(f" {name:>11}" for name in columns))
        for name in self.score.to_dict():
            lines.append(f"  {name:<18}" + "".join(f" {s.to_dict()[name]:>11.5f}" for s in columns.values()))
        if self.floor is not None:
            excess = self.last_epoch_score or self.score
            lines.append(f"  excess over the floor (last epoch): {excess.total - self.floor.total:.5f}")
        if self.calibration:
            ece = ", ".join(f"{group} {value:.3f}" for group, value in self.calibration.items())
            lines.append(f"  calibration (class-wise ECE, best epoch, class weights undone): {ece}")
        if self.calibrated is not None:
            lines.append(self.calibrated.format())
        for fold, outcome in sorted(self.outcomes.items()):
            lines.append(f"  fold {fold}: best val score {outcome.best_score:.5f} at epoch {outcome.best_epoch}")
        lines.append(f"  MLflow parent run: {self.mlflow_run_id}")
        if registered is not None:
            lines.append(f"  registered: {registered}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class CVRun:
    """A CV under way: its id and folder, its inputs, its MLflow parent run and the digest of its training data."""

    run_id: str
    run_dir: Path
    inputs: CVInputs
    tracker: Tracker
    parent: str
    data_digest: DataDigest | None = None


def recorded_data_digest(run_dir: Path) -> DataDigest | None:
    """The training data digest a CV recorded in its folder when it first started (None: started before digests
    were recorded, or never)."""
    path = Path(run_dir) / DATA_DIGEST_JSON
    return DataDigest.from_json(json.loads(path.read_text())) if path.is_file() else None


def record_data_digest(run_dir: Path, digest: DataDigest) -> None:
    """Record ``digest`` in a CV's folder, or check it against the one recorded when the CV first started.

    Raises:
        DataChangedError: the CV was started on other data (its finished folds learnt that).
    """
    recorded = recorded_data_digest(run_dir)
    if recorded is None:
        with atomic_path(Path(run_dir) / DATA_DIGEST_JSON) as temporary:
            temporary.write_text(json.dumps(digest.to_json(), indent=2))
    elif recorded.digest != digest.digest:
        changed = sorted(name for name, sha in digest.files.items() if recorded.files.get(name) != sha)
        what = f"changed: {changed}" if changed else f"preprocessing {recorded.cache_key} -> {digest.cache_key}"
        raise DataChangedError(f"CV {Path(run_dir).name} was started on data {recorded.digest} ({recorded.root}) "
                               f"but the data now digests to {digest.digest} ({what}): its finished folds learnt the "
                               "old data. Restore it, or train a new CV (another train.run_id)")  # fmt: skip


def build_trainer(cfg: Config, job: Any, name: str, loop: Callable[[dict[str, Any]], None] = train_fold_loop,
                  loop_config: dict[str, Any] | None = None) -> TorchTrainer:  # fmt: skip
    """The one ``TorchTrainer`` builder that training, tuning and the segmentation stage share.

    Every run gets the same workers (``train.num_workers``, ``train.use_gpu``, ``train.cpus_per_worker``,
    ``train.resources``), storage (:func:`~lumbar_ray.paths.ray_storage_for`), checkpoints (the best by
    :data:`~lumbar_ray.train.worker.SCORE_ATTRIBUTE`, lower is better, and the latest) and restarts
    (``train.max_failures``).

    Args:
        cfg: the resolved config.
        job: what the loop trains (a :class:`~lumbar_ray.train.worker.FoldJob` for the classifier's loop).
        name: the Ray Train run's name under the storage: a stable id, so that a rerun resumes it.
        loop: the ``train_loop_per_worker``; it receives ``{"cfg": cfg as a dict, "job": job} | loop_config``.
        loop_config: further entries of the loop's config.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {}) | cfg.train.resources
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job} | dict(loop_config or {}),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage_for(cfg),
            # The best checkpoint by the validation score, and the latest (Ray never deletes the latest one):
            # the registered weights come from the first, a resume starts from the second (see worker.py).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=SCORE_ATTRIBUTE, checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def run_fold(cfg: Config, job: FoldJob, run_id: str) -> FoldOutcome:
    """Train one fold with its own ``TorchTrainer`` (resuming from its checkpoint if one exists).

    The outcome takes the last epoch from ``result.checkpoint`` (the latest) and the best epoch from the checkpoint
    Ray kept as the best by the validation score (``result.best_checkpoints``, ordered worst to best).
    """
    result = build_trainer(cfg, job, f"{run_id}-fold{job.fold}").fit()
    if result.error is not None:
        raise RuntimeError(f"fold {job.fold} failed") from result.error
    state = load_checkpoint_state(result.checkpoint)
    if state is None:
        raise RuntimeError(f"fold {job.fold} finished without a checkpoint")
    best_checkpoint = result.best_checkpoints[-1][0] if result.best_checkpoints else None
    if best_checkpoint is None or best_checkpoint.path == result.checkpoint.path:
        return FoldOutcome.from_state(job.fold, state, result.checkpoint.path)
    return FoldOutcome.from_state(job.fold, state, result.checkpoint.path, load_checkpoint_state(best_checkpoint),
                                  best_checkpoint.path)  # fmt: skip


def assemble_oof(study_ids: np.ndarray, outcomes: dict[int, FoldOutcome], epoch: str = "best") -> np.ndarray:
    """``(n, 25, 3)`` out-of-fold probabilities aligned with ``study_ids``, of each fold's ``best`` or ``last``
    epoch, or its last epoch at predicted points (``last_predicted``; every study must be in one of the folds)."""
    position = {int(study): i for i, study in enumerate(study_ids)}
    probs = np.full((len(study_ids), *next(iter(outcomes.values())).probs.shape[1:]), np.nan)
    chosen_by_epoch = {"best": "probs", "last": "last_probs", "last_predicted": "last_predicted_probs"}
    for outcome in outcomes.values():
        chosen = getattr(outcome, chosen_by_epoch[epoch])
        if chosen is None:
            raise ValueError(
                f"fold {outcome.fold} kept no {epoch!r} predictions (an older version trained it, "
                "or cv.predicted_points was not set)"
            )
        probs[[position[int(s)] for s in outcome.study_ids]] = chosen
    missing = np.isnan(probs).any(axis=(1, 2))
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} studies have no out-of-fold prediction")
    return probs


def calibration_epoch(outcomes: dict[int, FoldOutcome]) -> str:
    """Whose out-of-fold predictions post-processing is fitted on: each fold's ``last`` epoch (a schedule fixed
    in advance, not an epoch picked on the scored fold) when every fold kept them, else the ``best``."""
    return "last" if all(outcome.last_probs is not None for outcome in outcomes.values()) else "best"


def calibrate_cv(labels: np.ndarray, fold_of: np.ndarray, study_ids: np.ndarray,
                 outcomes: dict[int, FoldOutcome]) -> CVCalibration:  # fmt: skip
    """Temperatures per condition group fitted on the CV's out-of-fold predictions (see :class:`CVCalibration`).

    Args:
        labels: ``(n, 25)`` labels of the scored studies.
        fold_of: ``(n,)`` their folds (at least two).
        study_ids: ``(n,)`` their ids.
        outcomes: the folds.
    """
    epoch = calibration_epoch(outcomes)
    fitted_on = [assemble_oof(study_ids, outcomes, epoch)]
    fit = calibrate_out_of_fold(labels, fold_of, fitted_on, temperature=True)
    model_score = cross_fitted_model_score(labels, fold_of, fitted_on, [assemble_oof(study_ids, outcomes)], True)
    return CVCalibration(fit, epoch, model_score)


def cross_fitted_model_score(labels: np.ndarray, fold_of: np.ndarray, fitted_on: list[np.ndarray],
                             registered: list[np.ndarray], temperature: bool) -> ScoreResult:  # fmt: skip
    """The score of the registered weights' out-of-fold predictions, each fold blended and calibrated by parameters
    fitted (on ``fitted_on``, the parts the calibration is fitted on) without that fold.

    Args:
        labels: ``(n, 25)`` labels.
        fold_of: ``(n,)`` folds.
        fitted_on: the parts' out-of-fold predictions of the epoch the calibration is fitted on.
        registered: the same parts' out-of-fold predictions of the registered (best-epoch) weights.
        temperature: the calibration has temperatures.
    """
    crossed = cross_fit_calibration(labels, fold_of, fitted_on, temperature, applied_to=registered)
    return score_arrays(labels, crossed.probs)


def wanted_folds(cfg: Config) -> list[int]:
    """The folds a run trains: ``train.folds`` or all of ``cv.n_folds``."""
    return list(cfg.train.folds) if cfg.train.folds is not None else list(range(cfg.cv.n_folds))


def _fold_job(cfg: Config, run: CVRun, fold: int) -> tuple[FoldJob, str]:
    """A fold's job (its payload and the MLflow run its workers log to) and that child run's id."""
    child = report.fold_run(run.tracker, run.parent, fold)
    return FoldJob(fold, fold_payload(run.inputs, fold), RunLogger(run.tracker.uri, child)), child


def _finish_fold(run: CVRun, fold: int, child: str, outcome: FoldOutcome, seconds: float) -> None:
    """Save a trained fold's outcome (what a rerun skips it by) and close its MLflow run."""
    logger.info("fold %d done in %.0f s: best val score %.5f at epoch %d", fold, seconds, outcome.best_score,
                outcome.best_epoch)  # fmt: skip
    outcome.save(fold_outcome_path(run.run_dir, fold))
    report.finish_fold(run.tracker, child, outcome.best_score, outcome.best_epoch, outcome.history)


def _train_in_parallel(cfg: Config, run: CVRun, folds: list[int]) -> Iterator[tuple[int, FoldOutcome, bool]]:
    """Up to ``train.parallel_folds`` folds at once, each fitted by a zero-CPU Ray task (the same driver-task
    pattern as a tuning trial): the task holds no CPU, so the folds' workers get every CPU and GPU, and Ray starts
    a fold's workers when the cluster has room. Yields the folds as they finish."""
    import ray

    fit = ray.remote(num_cpus=0, max_retries=0)(run_fold)  # a failed fold is retried by Ray Train, not re-launched
    cfg = with_resolved_storage(cfg)  # the task may run on a node whose environment and disk are not the driver's
    queue, pending = list(folds), {}
    while queue or pending:
        while queue and len(pending) < cfg.train.parallel_folds:
            fold = queue.pop(0)
            job, child = _fold_job(cfg, run, fold)
            logger.info("fold %d: launched (%d at once)", fold, cfg.train.parallel_folds)
            pending[fit.remote(cfg, job, run.run_id)] = (fold, child, time.perf_counter())
        (done,), _ = ray.wait(list(pending), num_returns=1)
        fold, child, started = pending.pop(done)
        outcome = ray.get(done)
        _finish_fold(run, fold, child, outcome, time.perf_counter() - started)
        yield fold, outcome, True


def train_folds(cfg: Config, run: CVRun) -> Iterator[tuple[int, FoldOutcome, bool]]:
    """Train the wanted folds, each with its own ``TorchTrainer``; skip finished ones.

    One after another, or ``train.parallel_folds`` at once (:func:`_train_in_parallel`); each fold's seeds are its
    own, so both give the same folds. Yields after every fold, so that a caller (a Tune trial) can report the
    running score between folds.

    Yields:
        ``(fold, outcome, trained_now)``; ``trained_now`` is False for a fold found finished on disk.
    """
    wanted, todo = wanted_folds(cfg), []
    for fold in wanted:
        path = fold_outcome_path(run.run_dir, fold)
        if path.is_file():
            logger.info("fold %d already finished (%s): skipped", fold, path)
            yield fold, FoldOutcome.load(path), False
        else:
            todo.append(fold)
    if cfg.train.parallel_folds > 1 and len(todo) > 1:
        yield from _train_in_parallel(cfg, run, todo)
        return
    for index, fold in enumerate(todo):
        job, child = _fold_job(cfg, run, fold)
        logger.info("fold %d (%d of %d): training on %d workers", fold, index + 1, len(todo), cfg.train.num_workers)
        started = time.perf_counter()
        outcome = run_fold(cfg, job, run.run_id)
        _finish_fold(run, fold, child, outcome, time.perf_counter() - started)
        yield fold, outcome, True


def start_cv(cfg: Config, inputs: CVInputs | None = None, nest_under: str | None = None) -> CVRun:
    """Everything a CV needs before its first fold: run id and folder, inputs, Ray, the MLflow parent run.

    Args:
        cfg: the resolved config.
        inputs: prepared inputs to reuse (Tune trials get them from the tuning driver); None = prepare here.
        nest_under: an MLflow run to hang the CV's parent run under (a tuning run); None = top level.
    """
    augment = cfg.augment
    if augment.jitter_measured and augment.jitter_px_by_series is None and augment.jitter_slices_by_series is None:
        raise ConfigError("augment.jitter_measured is not resolved: the pipeline sets the per-series jitter "
                          "from the localisation's held-out errors (pipeline.with_measured_jitter) first")  # fmt: skip
    run_id = cv_run_id(cfg)
    run_dir = run_dir_for(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    logger.info("CV run %s: folds under %s, checkpoints under %s", run_id, run_dir, ray_storage_for(cfg))
    inputs = inputs if inputs is not None else prepare_inputs(cfg, run_dir)
    digest = inputs.data_digest or data_digest(inputs.data.root, inputs.cache_settings)
    record_data_digest(run_dir, digest)
    ensure_ray()
    tracker = Tracker.from_config(cfg)
    parent = tracker.parent_run(run_id, kind="cv", nest_under=nest_under, config=cfg)
    report.log_training_data(tracker, parent, digest)
    return CVRun(run_id, run_dir, inputs, tracker, parent, digest)


def run_cv(cfg: Config) -> CVResult:
    """Train every wanted fold (skipping finished ones) and score them out of fold against the prior.

    Args:
        cfg: the resolved config (``train``, ``model``, ``crop``, ``augment``, ``loss``, ``cv``, ``tracking``).

    Returns:
        The CV result, also written under ``<workdir>/runs/<run_id>/`` and to MLflow.
    """
    run = start_cv(cfg)
    outcomes, trained, skipped = {}, [], []
    for fold, outcome, trained_now in train_folds(cfg, run):
        outcomes[fold] = outcome
        (trained if trained_now else skipped).append(fold)
    return finish_cv(cfg, run, outcomes, trained, skipped)


def finish_cv(cfg: Config, run: CVRun, outcomes: dict[int, FoldOutcome], trained: list[int],
              skipped: list[int]) -> CVResult:  # fmt: skip
    """Score the OOF predictions of the folds run, against the prior on the same folds; log; end the run."""
    inputs = run.inputs
    in_folds = inputs.folds["fold"].isin(list(outcomes)).to_numpy()
    scored = inputs.subset(in_folds)
    probs = assemble_oof(scored.study_ids, outcomes)
    score = score_arrays(scored.labels, probs)
    baseline = score_arrays(scored.labels, prior_oof_probs(inputs.labels, inputs.fold_of())[in_folds])
    honest = None
    if all(outcome.last_probs is not None for outcome in outcomes.values()):  # folds of older runs lack them
        honest = score_arrays(scored.labels, assemble_oof(scored.study_ids, outcomes, epoch="last"))
    at_predicted = None
    if cfg.cv.predicted_points is not None:
        at_predicted = score_arrays(scored.labels, assemble_oof(scored.study_ids, outcomes, epoch="last_predicted"))
    floor = known_floor(data_root_for(cfg), scored.study_ids, scored.labels)
    oof = labels_to_submission(scored.study_ids, probs)
    oof.to_csv(run.run_dir / "oof.csv", index=False)
    notes = []
    if len(inputs.skipped_points):
        notes.append(f"{len(inputs.skipped_points)} label points could not be mapped (prior used): see MLflow")
    if len(outcomes) < cfg.cv.n_folds:
        notes.append(f"only folds {sorted(outcomes)} of {cfg.cv.n_folds}: the score covers their studies only")
    fold_priors = {k: fit_prior(inputs.labels[inputs.fold_of() != k]) for k in outcomes}
    calibrated = None
    if cfg.calibrate.temperature and len(outcomes) >= 2:
        calibrated = calibrate_cv(scored.labels, scored.fold_of(), scored.study_ids, outcomes)
    elif cfg.calibrate.temperature:
        notes.append("calibrate.temperature: one fold only, none to fit the temperatures on without it: not fitted")
    result = CVResult(run.run_id, score, baseline, oof, inputs.folds, outcomes, trained, skipped, run.parent,
                      fit_prior(inputs.labels), fold_priors, len(outcomes) == cfg.cv.n_folds, notes,
                      honest, floor, predicted_points_score=at_predicted, calibrated=calibrated,
                      data_digest=None if run.data_digest is None else run.data_digest.digest)  # fmt: skip
    tables = {"oof.csv": oof, FOLDS_CSV: inputs.folds, "skipped_points.csv": inputs.skipped_points}
    result.calibration = report.log_cv(
        run.tracker, run.parent, result.columns(), tables, scored.labels, probs, tuple(cfg.loss.class_weights)
    )
    if calibrated is not None:
        run.tracker.log_values(run.parent, report.calibration_values(calibrated.fit.calibration,
                                                                     calibrated.model_score))  # fmt: skip
    run.tracker.log_values(run.parent, {"cv_folds": float(len(outcomes))})
    run.tracker.finish(run.parent)
    logger.info("CV %s: score %.5f at the best epochs, %s at the last (prior %.5f)", run.run_id, score.total,
                "n/a" if honest is None else f"{honest.total:.5f}", baseline.total)  # fmt: skip
    return result
