"""The composition layer: stages put together into what the commands, the jobs and the quickstart run.

Stages never import each other; this module is where one stage's output becomes the next one's input:

- :func:`prepare_data` writes the built-in synthetic dataset when no ``data.root`` is given, and
  :func:`complete_cache` caches every series the cache lacks: every command that needs the cache calls it first;
- :func:`train` = cache, CV (:func:`lumbar_ray.train.cv.run_cv`), registration
  (:func:`lumbar_ray.train.register.register_cv`);
- :func:`segment` = cache, the segmentation U-Net (:func:`lumbar_ray.segment.stage.run_segment`);
- :func:`with_measured_jitter`: the localisation's held-out errors become the training jitter
  (``augment.jitter_measured``) before a CV or a search trains;
- :func:`predict` = the model's contract, the studies cached with the model's own preprocessing, inference;
- :func:`ensemble` = trained CV runs of the workdir combined into one registered model
  (:func:`lumbar_ray.train.ensemble.run_ensemble`);
- :func:`compare_points_on_fold`: one fold's held-out studies through the whole inference path against the same
  fold's out-of-fold predictions at the labelled points;
- :func:`run_quickstart`: the whole pipeline on built-in synthetic data with embedded defaults: synthesise,
  validate and report, score the prior, preprocess with Ray Data, train the sagittal YOLO level detectors and
  measure localisation on a held-out fold, train the k-fold CV on Ray Train, register the ensemble with its
  detectors, run a short Ray Tune + Optuna search and predict the synthetic test studies with the model pulled
  back by its alias. It registers under its own name (:func:`quickstart_config`: ``lumbar_ray_quickstart``, not
  the production ``lumbar_ray_ensemble``), so a quickstart run against a shared registry never takes a production
  alias.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lumbar_ray.baseline import BaselineResult, fit_prior, run_baseline
from lumbar_ray.config import MODEL_NAME, QUICKSTART_MODEL_NAME, AugmentConfig, Config, save_config
from lumbar_ray.data.cache import is_uri
from lumbar_ray.data.preprocess import PreprocessSummary, run_preprocess
from lumbar_ray.data.rsna import DataReport, build_report, load_rsna
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.labels import encode_labels
from lumbar_ray.localize.evaluate import jitter_values
from lumbar_ray.localize.stage import LocalizeResult, load_val_errors, run_localize
from lumbar_ray.metrics import ScoreResult, score_arrays, score_submission, submission_to_probs
from lumbar_ray.paired import bootstrap_se
from lumbar_ray.paths import RESOLVED_CONFIG, cache_root_for, data_root_for, tracking_uri_for
from lumbar_ray.predict import PredictResult, plan_prediction, run_predict
from lumbar_ray.registry import RegisteredEnsemble
from lumbar_ray.segment.stage import SegmentResult, check_source, run_segment
from lumbar_ray.tracking import Tracker
from lumbar_ray.train.cv import CVResult, run_cv
from lumbar_ray.train.ensemble import EnsembleResult, run_ensemble
from lumbar_ray.train.register import detectors_to_register, register_cv, registered_model_uri
from lumbar_ray.tune.run import TuneResult, experiment_exists, run_tune

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> Path | str:
    """The RSNA-format folder of ``cfg``: ``data.root`` as it is (a URI such as ``s3://bucket/rsna`` as the string it
    is), or the built-in synthetic dataset (written once, reused when its files are there).

    Raises:
        FileNotFoundError: ``data.root`` names a folder that does not exist (a URI is checked when its CSVs are read).
    """
    if cfg.data.root is not None and is_uri(cfg.data.root):
        return cfg.data.root
    root = data_root_for(cfg)
    if cfg.data.root is not None:
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        return root
    if not (root / "train.csv").is_file():
        write_dataset(root, cfg.synth)  # the embedded default: the built-in synthetic dataset
    return root


def complete_cache(cfg: Config) -> PreprocessSummary:
    """Cache every series of the config's data that the cache version lacks (resumable: nothing is redone)."""
    summary = run_preprocess(prepare_data(cfg), cache_root_for(cfg), cfg.preprocess)
    if summary.failed:
        logger.warning("%d series failed preprocessing; their targets fall back to the prior", summary.failed)
    return summary


@dataclass
class TrainResult:
    """A CV and what registering it did."""

    cv: CVResult
    registered: RegisteredEnsemble | str | None

    def format(self) -> str:
        return self.cv.format(self.registered)


JITTER_KEYS = ("jitter_px", "jitter_slices")
"""The augment settings a measured jitter stands in for (each by its ``*_by_series``)."""


def with_measured_jitter(cfg: Config, errors: pd.DataFrame | None = None, searched: Iterable[str] = ()) -> Config:
    """``cfg`` with the per-series jitter its localiser's held-out errors call for (``augment.jitter_measured``).

    The errors are those ``lumbar-ray localize`` measured on ``localize.val_fold`` with detectors that never saw
    it, unless given (:func:`lumbar_ray.localize.evaluate.jitter_values`: per series type, the 90th percentile of
    the in-plane and of the slice error). Per-series values given in the config are kept, and so is a setting a
    search varies (``searched``: ``jitter_px`` or ``jitter_slices``; a per-series value would override it).
    Without errors, or with nothing left to set, ``jitter_measured`` is switched off with a warning, so the config
    (and the run id hashed from it) says what is trained: ``jitter_px`` and ``jitter_slices``.

    Args:
        cfg: the config.
        errors: held-out point errors (:func:`lumbar_ray.localize.evaluate.point_errors`); None = this config's
            evaluated localisation.
        searched: the jitter settings a search varies.
    """
    if not cfg.augment.jitter_measured:
        return cfg
    errors = errors if errors is not None else load_val_errors(cfg)
    measured = {} if errors is None else jitter_values(errors)
    measured = {key.split(".", 1)[1]: value for key, value in measured.items()}
    measured = {key: value for key, value in measured.items()
                if getattr(cfg.augment, key) is None and key.removesuffix("_by_series") not in searched}  # fmt: skip
    if not measured:
        reason = "no evaluated localisation (run `lumbar-ray localize`)" if errors is None else "nothing left to set"
        logger.warning("augment.jitter_measured: %s; training with jitter_px=%g, jitter_slices=%d", reason,
                       cfg.augment.jitter_px, cfg.augment.jitter_slices)  # fmt: skip
        measured = {"jitter_measured": False}
    else:
        logger.info("augment.jitter_measured: %s, from the localiser's held-out errors", measured)
    augment = AugmentConfig.model_validate(cfg.augment.model_dump() | measured)
    return cfg.model_copy(update={"augment": augment})


def train(cfg: Config) -> TrainResult:
    """Complete the cache, run the CV (resumable) and register its ensemble with the config's detectors.

    Raises:
        MissingDetectorsError: before any training, when the CV would be registered without its detectors.
    """
    if cfg.tracking.register_model and cfg.train.folds is None:
        detectors_to_register(cfg)  # now, not after hours of training
    complete_cache(cfg)
    cfg = with_measured_jitter(cfg)
    cv = run_cv(cfg)
    return TrainResult(cv, register_cv(cfg, cv))


def ensemble(cfg: Config, run_ids: list[str]) -> EnsembleResult:
    """Combine trained CV runs of the workdir into one registered model, blended (and calibrated) out of fold."""
    return run_ensemble(cfg, run_ids)


def localize(cfg: Config) -> LocalizeResult:
    """Complete the cache, then train (or reuse) and evaluate the sagittal localisers: the YOLO detectors, or under
    ``localize.method=unet`` the segmentation U-Net (:func:`segment`, reused when trained)."""
    if cfg.localize.method == "unet":
        segment(cfg)
    else:
        complete_cache(cfg)
    return run_localize(cfg)


def segment(cfg: Config) -> SegmentResult:
    """Complete the cache, then train (or reuse) the segmentation U-Net and measure it on the held-out fold (a
    source the config cannot train from is refused first)."""
    check_source(cfg)
    if cfg.segment.source != "spider":  # SPIDER's scans are read from their folder, not from the cache
        complete_cache(cfg)
    return run_segment(cfg)


def tune(cfg: Config, resume: bool = False, register_best: bool = False) -> TuneResult:
    """Complete the cache, then search ``tune.space`` (see :func:`lumbar_ray.tune.run.run_tune`); with
    ``register_best``, the detectors the registered model ships are checked first."""
    if register_best and cfg.tracking.register_model:
        detectors_to_register(cfg)
    complete_cache(cfg)
    return run_tune(tuning_config(cfg), resume=resume, register_best=register_best)


def tuning_config(cfg: Config) -> Config:
    """The base config of a search: with the measured jitter, except for a jitter setting the space searches."""
    return with_measured_jitter(cfg, searched=[key for key in JITTER_KEYS if f"augment.{key}" in cfg.tune.space])


def predict(cfg: Config) -> PredictResult:
    """Predict the studies of ``cfg.predict``: cache them with the model's own preprocessing, then infer."""
    plan = plan_prediction(cfg)
    summary = run_preprocess(plan.data_root, plan.cache_root, plan.preprocess, splits=[plan.split],
                             study_ids=plan.study_ids)  # fmt: skip
    logger.info("inference cache: %s", summary.format())
    return run_predict(cfg, plan)


@dataclass
class PointsComparison:
    """One fold's held-out studies scored three ways: crops at predicted points, at labelled points, the prior."""

    fold: int
    studies: int
    predicted_points: ScoreResult
    labelled_points: ScoreResult
    prior: ScoreResult
    prediction: PredictResult
    labels: np.ndarray | None = None
    """``(n, 25)`` the held-out studies' class ids, aligned with the two probability arrays below."""
    predicted_probs: np.ndarray | None = None
    """``(n, 25, 3)`` at predicted points (what the submission holds)."""
    labelled_probs: np.ndarray | None = None
    """``(n, 25, 3)`` at labelled points (the out-of-fold predictions, with the model's temperatures)."""

    def gap_se(self, samples: int = 500, seed: int = 0) -> float:
        """Standard error of predicted - labelled (the official total) under a paired bootstrap of the studies."""
        return bootstrap_se(self.labels, self.labelled_probs, self.predicted_probs, samples, seed)["total"]

    def format(self) -> str:
        return (f"fold {self.fold} ({self.studies} held-out studies), official score: predicted points "
                f"{self.predicted_points.total:.5f}, labelled points {self.labelled_points.total:.5f}, "
                f"prior {self.prior.total:.5f}")  # fmt: skip


def compare_points_on_fold(cfg: Config, cv: CVResult, fold: int, model_uri: str | None = None) -> PointsComparison:
    """Score fold ``fold``'s held-out training studies with that fold's model on crops at *predicted* points
    (the whole inference path: localisers, geometry, Ray Data), against its out-of-fold predictions at the
    *labelled* points and the prior of the other folds. The localisers must not have seen the fold: use
    ``localize.val_fold``.

    Args:
        cfg: the config.
        cv: the CV.
        fold: the held-out fold.
        model_uri: the registered model of ``cv`` to predict with (e.g. registered again with the localiser of
            ``cfg.localize.method``, which names its outputs and metrics); None = the version the CV registered.
    """
    held_out = sorted(int(s) for s in cv.folds.loc[cv.folds["fold"] == fold, "study_id"])
    tag = "" if cfg.localize.method == "yolo" else f"_{cfg.localize.method}"  # YOLO's names are the earlier ones
    out = Path(cfg.workdir) / "predict" / f"fold{fold}_predicted_points{tag}" / "submission.csv"
    model_uri = model_uri or registered_model_uri(cfg, cv.mlflow_run_id)
    options = {"model": model_uri, "split": "train", "study_ids": held_out,
               "fold": fold, "out": str(out), "data": None}  # fmt: skip
    prediction = predict(cfg.model_copy(update={"predict": cfg.predict.model_copy(update=options)}))
    train_frame = load_rsna(data_root_for(cfg)).train
    study_ids, labels = encode_labels(train_frame)
    in_fold = np.isin(study_ids, held_out)
    predicted = score_submission(train_frame[train_frame["study_id"].isin(held_out)], pd.read_csv(out))
    predicted_probs = submission_to_probs(pd.read_csv(out), study_ids[in_fold])
    labelled_probs = submission_to_probs(cv.oof, study_ids[in_fold])
    if cv.calibrated is not None:  # the registered model applies its temperatures: compare like with like
        labelled_probs = cv.calibrated.fit.calibration.apply([labelled_probs])
    labelled = score_arrays(labels[in_fold], labelled_probs)
    prior = fit_prior(labels[~in_fold])
    prior_score = score_arrays(labels[in_fold], np.broadcast_to(prior, (int(in_fold.sum()), *prior.shape)))
    comparison = PointsComparison(fold, len(held_out), predicted, labelled, prior_score, prediction,
                                  labels[in_fold], predicted_probs, labelled_probs)  # fmt: skip
    scores = {"predicted": predicted, "labelled": labelled, "prior": prior_score}
    Tracker.from_config(cfg).log_values(cv.mlflow_run_id, {f"points_fold{fold}{tag}_{name}": score.total
                                                           for name, score in scores.items()})  # fmt: skip
    logger.info("%s", comparison.format())
    return comparison


@dataclass
class QuickstartResult:
    """Where the quickstart put things and what it measured."""

    workdir: Path
    data_root: Path
    report: DataReport
    baseline: BaselineResult
    preprocess: PreprocessSummary
    localize: LocalizeResult
    cv: CVResult
    registered: RegisteredEnsemble | str | None
    prediction: PredictResult
    tracking_uri: str
    points_check: PointsComparison | None = None
    tuning: TuneResult | None = None


def quickstart_config(cfg: Config) -> Config:
    """``cfg`` as the quickstart runs it: registered as ``lumbar_ray_quickstart`` (and predicted from its alias)
    where it names the production model ``lumbar_ray_ensemble``; another name given on purpose is kept. The model
    name is no part of the run ids (:func:`lumbar_ray.paths.cv_run_id`): the quickstart finds its CVs as before."""
    if cfg.tracking.model_name != MODEL_NAME:
        return cfg
    tracking = cfg.tracking.model_copy(update={"model_name": QUICKSTART_MODEL_NAME})
    predict = cfg.predict.model_copy(update={"model": f"models:/{QUICKSTART_MODEL_NAME}@{cfg.tracking.alias}"})
    return cfg.model_copy(update={"tracking": tracking, "predict": predict})


def run_quickstart(config: Config, tune: bool = True) -> QuickstartResult:
    """Synthesise (or reuse) the dataset, validate and report it, score the prior, preprocess, localise, train,
    register (under :func:`quickstart_config`'s name), tune and predict the test studies with the model pulled back
    by its alias."""
    config = quickstart_config(config)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir / RESOLVED_CONFIG)
    root = data_root_for(config)
    if config.data.root is None:
        write_dataset(root, config.synth, overwrite=True)
    report = build_report(load_rsna(root), check_images=True)
    (workdir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    baseline = run_baseline(root, n_folds=config.cv.n_folds, seed=config.cv.seed, out_csv=workdir / "baseline_oof.csv")
    preprocessed = complete_cache(config)
    if config.localize.method == "unet":
        run_segment(config)  # resumable: a trained U-Net is reused
    localized = run_localize(config)  # resumable: trained detectors and a written evaluation are reused
    trained = with_measured_jitter(config)
    cv = run_cv(trained)  # resumable: a rerun skips the folds already trained
    registered = register_cv(trained, cv)
    # The detectors never saw localize.val_fold: its studies show what predicted points cost against labelled ones.
    points_check = compare_points_on_fold(trained, cv, config.localize.val_fold) if registered else None
    searched = tuning_config(config)
    tuning = run_tune(searched, resume=experiment_exists(searched)) if tune else None  # a rerun resumes (or reads)
    model_uri = f"models:/{config.tracking.model_name}@{config.tracking.alias}"
    prediction = predict(config.model_copy(update={"predict": config.predict.model_copy(update={"model": model_uri})}))
    logger.info("quickstart finished in %s", workdir)
    return QuickstartResult(workdir, root, report, baseline, preprocessed, localized, cv, registered, prediction,
                            tracking_uri_for(config), points_check, tuning)  # fmt: skip
