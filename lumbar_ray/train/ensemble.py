"""Ensembles of trained CVs: the folds of several CV runs (architectures, crop geometries) as one registered model.

``lumbar-ray ensemble --cv <run id> --cv <run id>`` finds each CV under ``<workdir>/runs/<run id>/`` (its
``config.yaml``, ``folds.csv`` and every ``fold<k>.pt``), checks that they can be combined, fits the blend out of
fold and registers one model version holding every member's folds:

- members must share their folds (the same studies in the same folds: the same data, ``cv.n_folds`` and
  ``cv.seed``), so that each fold's out-of-fold predictions of every member come from models that never saw it,
  and their training data digest (:mod:`lumbar_ray.data.lineage`, recorded in each CV's folder; a CV from before
  digests were recorded takes its data's digest as it is now), which the version is tagged with;
  they must also share the preprocessing (one cache feeds them all at prediction) and the level detectors
  (``localize`` settings: one set of predicted points is cropped for every member). Each member keeps its own crop
  geometry and model config in the contract (:mod:`lumbar_ray.registry`);
- the blend is a convex weighting of the members per condition group, fitted on the official score of their
  out-of-fold predictions (each fold's last epoch when every fold kept it, as the CV's own calibration does), then,
  with ``calibrate.temperature``, a temperature per group of the blend (:mod:`lumbar_ray.calibrate`). Figures are
  reported cross-fitted (each fold post-processed by parameters fitted on the other folds) beside every member
  alone and the equal mean; the parameters registered are fitted on every fold;
- the version's ``cv_score`` is the score of the registered model's own out-of-fold predictions (each member's
  best-epoch weights, which are the ones registered), each fold blended and calibrated by parameters fitted
  without it, so the alias moves to an ensemble only when it beats the holder as a single CV would have to. The
  ``oof`` the ensemble writes is what the registered parameters (fitted on every fold) predict.

One member is allowed too: that registers a trained CV again with temperatures (``calibrate.temperature=true``)
without retraining it. A rerun of the same ensemble (same members, settings and model name: the same
:func:`lumbar_ray.paths.ensemble_id`) finds its MLflow run and registers no second version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lumbar_ray.baseline import fit_prior
from lumbar_ray.calibrate import calibrate_out_of_fold
from lumbar_ray.config import Config, cache_settings, load_config
from lumbar_ray.data.lineage import DataDigest, data_digest
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.splits import load_folds
from lumbar_ray.errors import EnsembleError
from lumbar_ray.inference.model import study_packaging
from lumbar_ray.labels import encode_labels
from lumbar_ray.metrics import ScoreResult, labels_to_submission, score_arrays
from lumbar_ray.paths import (
    FOLDS_CSV,
    data_root_for,
    ensemble_id,
    fold_outcome_path,
    localize_key,
    run_dir_for,
    tracking_uri_for,
)
from lumbar_ray.registry import (
    RegisteredEnsemble,
    ensemble_contract,
    log_and_register,
    mark_registered,
    registered_version,
)
from lumbar_ray.tracking import KIND_TAG, RUN_ID_TAG, Tracker
from lumbar_ray.train.cv import (
    CVCalibration,
    assemble_oof,
    calibration_epoch,
    cross_fitted_model_score,
    recorded_data_digest,
)
from lumbar_ray.train.register import detectors_to_register
from lumbar_ray.train.report import calibration_values, log_training_data
from lumbar_ray.train.worker import FoldOutcome

logger = logging.getLogger(__name__)

KIND = "ensemble"
"""``lumbar_ray.kind`` of an ensemble's MLflow run."""


@dataclass
class Member:
    """One trained CV of an ensemble.

    Attributes:
        run_id: the CV's run id (its folder under ``<workdir>/runs``).
        cfg: the config it was trained with.
        folds: ``study_id, fold`` of its studies.
        outcomes: fold -> the finished fold (weights, out-of-fold predictions).
        data_digest: the digest of the data it was trained on (None: not known).
    """

    run_id: str
    cfg: Config
    folds: pd.DataFrame
    outcomes: dict[int, FoldOutcome]
    data_digest: DataDigest | None = None


def load_member(cfg: Config, run_id: str) -> Member:
    """The finished CV ``run_id`` of ``cfg``'s workdir (its config's workdir is taken to be this one).

    Raises:
        FileNotFoundError: no such CV run (no ``config.yaml`` or ``folds.csv`` in its folder).
        EnsembleError: a CV with folds not yet trained.
    """
    run_dir = run_dir_for(cfg, run_id)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / FOLDS_CSV).is_file():
        raise FileNotFoundError(f"no trained CV run {run_id!r} in {run_dir.parent} (no config.yaml and "
                                f"{FOLDS_CSV} in {run_dir})")  # fmt: skip
    member_cfg = load_config(run_dir / "config.yaml").model_copy(update={"workdir": cfg.workdir})
    missing = [k for k in range(member_cfg.cv.n_folds) if not fold_outcome_path(run_dir, k).is_file()]
    if missing:
        raise EnsembleError(f"CV run {run_id} has not finished folds {missing} of {member_cfg.cv.n_folds}: finish "
                            f"it (lumbar-ray train with its config) before ensembling it")  # fmt: skip
    outcomes = {k: FoldOutcome.load(fold_outcome_path(run_dir, k)) for k in range(member_cfg.cv.n_folds)}
    digest = recorded_data_digest(run_dir)
    if digest is None:
        digest = data_digest(data_root_for(member_cfg), cache_settings(member_cfg.preprocess))
        logger.warning("CV run %s recorded no data digest (trained before digests were): taking its data as it is "
                       "now, %s", run_id, digest.digest)  # fmt: skip
    return Member(run_id, member_cfg, load_folds(run_dir / FOLDS_CSV), outcomes, digest)


def _fold_table(member: Member) -> pd.DataFrame:
    return member.folds.sort_values("study_id").reset_index(drop=True)


def check_members(members: list[Member]) -> None:
    """Refuse members that cannot share one registered model (see the module docstring).

    Raises:
        EnsembleError: no member, a run named twice, or members that differ in their folds, data (its folder or
            its digest), preprocessing or level detectors (the message names the two runs and what differs).
    """
    if not members:
        raise EnsembleError("an ensemble needs at least one trained CV run")
    names = [member.run_id for member in members]
    if len(set(names)) != len(names):
        raise EnsembleError(f"a CV run is named twice: {names}")
    first = members[0]
    for other in members[1:]:
        pair = f"CV runs {first.run_id} and {other.run_id}"
        if str(data_root_for(first.cfg)) != str(data_root_for(other.cfg)):
            raise EnsembleError(f"{pair} were trained on different data ({data_root_for(first.cfg)} and "
                                f"{data_root_for(other.cfg)})")  # fmt: skip
        mine, theirs = _fold_table(first), _fold_table(other)
        if not mine.equals(theirs):
            moved = len(mine.merge(theirs, how="outer", indicator=True).query("_merge != 'both'")) // 2 or "some"
            raise EnsembleError(f"{pair} do not share their folds ({moved} studies differ in their fold or are not "
                                "in both): members must be trained with the same cv.n_folds and cv.seed on the "
                                "same data")  # fmt: skip
        if sorted(first.outcomes) != sorted(other.outcomes):
            raise EnsembleError(f"{pair} hold different folds: {sorted(first.outcomes)} and {sorted(other.outcomes)}")
        if cache_settings(first.cfg.preprocess) != cache_settings(other.cfg.preprocess):
            raise EnsembleError(f"{pair} were trained on differently preprocessed caches (preprocess.image_size, "
                                "clip_percentiles): one cache feeds every member at prediction")  # fmt: skip
        if localize_key(first.cfg) != localize_key(other.cfg):
            raise EnsembleError(f"{pair} use different level detectors (localize settings): the model localises "
                                "once and crops every member at the same points")  # fmt: skip
        if _digest(first) != _digest(other):
            raise EnsembleError(f"{pair} were trained on different data (digests {_digest(first)} and "
                                f"{_digest(other)}: the training CSVs changed between them): a version is trained "
                                "on one data digest")  # fmt: skip


def _digest(member: Member) -> str | None:
    return None if member.data_digest is None else member.data_digest.digest


def member_labels(member: Member) -> np.ndarray:
    """``(n, 25)`` labels of the member's studies, in its ``folds.csv`` order (from its data's ``train.csv``)."""
    study_ids, labels = encode_labels(load_rsna(data_root_for(member.cfg)).train)
    position = {int(study): i for i, study in enumerate(study_ids)}
    return labels[[position[int(study)] for study in member.folds["study_id"]]]


@dataclass
class EnsembleResult:
    """What :func:`build_ensemble` fitted and registered.

    Attributes:
        ensemble_id: the ensemble's stable id (:func:`lumbar_ray.paths.ensemble_id`).
        members: the member CV run ids, in the order of the blend weights.
        study_ids: the studies, in the members' ``folds.csv`` order.
        member_scores: each member alone, on the out-of-fold predictions the blend was fitted on.
        calibrated: the blend and temperatures fitted on every fold, the cross-fitted scores and the registered
            model's own out-of-fold score.
        model_oof: ``(n, 25, 3)`` the registered model's own out-of-fold predictions (best-epoch weights, blended
            and calibrated as registered; a target without a crop holds its fold's prior, calibrated).
        mlflow_run_id: the ensemble's MLflow run.
        registered: the new version; a string naming the version registered earlier; or None (not registered).
    """

    ensemble_id: str
    members: list[str]
    study_ids: np.ndarray
    member_scores: dict[str, ScoreResult]
    calibrated: CVCalibration
    model_oof: np.ndarray
    mlflow_run_id: str
    registered: RegisteredEnsemble | str | None

    def format(self) -> str:
        calibration = self.calibrated.fit.calibration
        lines = [f"ensemble {self.ensemble_id} of {len(self.members)} CV run(s), {len(self.study_ids)} studies, "
                 f"fitted on the {self.calibrated.epoch} epoch's out-of-fold predictions:"]  # fmt: skip
        lines += [f"  member {run_id:<24} {score.total:.5f}" for run_id, score in self.member_scores.items()]
        names = {"uncalibrated": "equal mean", "blended": "blend (cross-fitted)",
                 "calibrated": "blend + temperatures (cross-fitted)"}  # fmt: skip
        lines += [f"  {names[name]:<31} {score.total:.5f}" for name, score in self.calibrated.fit.scores.items()]
        for group, weights in calibration.weights.items():
            lines.append(f"  weights {group:<13} " + ", ".join(f"{w:.3f}" for w in weights))
        if calibration.temperatures is not None:
            fitted = ", ".join(f"{group} {t:.3f}" for group, t in calibration.temperatures.items())
            lines.append(f"  temperatures: {fitted}")
        lines.append(f"  the registered model's own out-of-fold predictions (best-epoch weights): "
                     f"{self.calibrated.model_score.total:.5f} (its cv_score)")  # fmt: skip
        lines.append(f"  MLflow run: {self.mlflow_run_id}")
        if self.registered is not None:
            lines.append(f"  registered: {self.registered}")
        return "\n".join(lines)


def fit_ensemble(members: list[Member], labels: np.ndarray, temperature: bool) -> tuple[CVCalibration, np.ndarray]:
    """The blend (and temperatures) of the members' out-of-fold predictions, and the registered model's own
    out-of-fold predictions (``(n, 25, 3)``, in the first member's ``folds.csv`` order).

    Args:
        members: checked members (:func:`check_members`).
        labels: ``(n, 25)`` labels in the first member's ``folds.csv`` order.
        temperature: fit temperatures of the blend (``calibrate.temperature``).
    """
    study_ids, fold_of = members[0].folds["study_id"].to_numpy(), members[0].folds["fold"].to_numpy()
    epoch = "last" if all(calibration_epoch(member.outcomes) == "last" for member in members) else "best"
    parts = [assemble_oof(study_ids, member.outcomes, epoch) for member in members]
    fit = calibrate_out_of_fold(labels, fold_of, parts, temperature)
    registered = [assemble_oof(study_ids, member.outcomes) for member in members]
    model_score = cross_fitted_model_score(labels, fold_of, parts, registered, temperature)
    return CVCalibration(fit, epoch, model_score), fit.calibration.apply(registered)


def _summary(members: list[Member], member_scores: dict[str, ScoreResult], calibrated: CVCalibration) -> dict:
    """``ensemble.json``: the members, the fitted blend and temperatures, and the scores."""
    return {"members": [{"run_id": m.run_id, "arch": m.cfg.model.arch, "crop": m.cfg.crop.model_dump(mode="json"),
                         "score": member_scores[m.run_id].total} for m in members],
            **calibrated.fit.calibration.to_json(), **calibrated.info()}  # fmt: skip


def _register(cfg: Config, members: list[Member], labels: np.ndarray, calibrated: CVCalibration,
              mlflow_run_id: str) -> RegisteredEnsemble | str | None:  # fmt: skip
    """Log and register the members' folds with the fitted calibration, once per ensemble run."""
    if not cfg.tracking.register_model:
        return None
    uri = tracking_uri_for(cfg)
    done = registered_version(uri, mlflow_run_id)
    if done is not None:
        logger.info("this ensemble is already registered (version %s): not registering again", done)
        return f"{cfg.tracking.model_name} version {done} (registered earlier)"
    first = members[0]
    fold_of = first.folds["fold"].to_numpy()
    folds = sorted(first.outcomes)
    fold_priors = {k: fit_prior(labels[fold_of != k]) for k in folds}
    detectors = detectors_to_register(first.cfg.model_copy(update={"tracking": cfg.tracking}))
    contract = ensemble_contract(first.cfg, folds, fit_prior(labels), sorted(detectors), fold_priors,
                                 members=[(member.run_id, member.cfg) for member in members],
                                 calibration=calibrated.fit.calibration,
                                 calibration_info=calibrated.info())  # fmt: skip
    states = [{k: outcome.model_state for k, outcome in sorted(member.outcomes.items())} for member in members]
    registered = log_and_register(states, contract, cfg.tracking, uri, mlflow_run_id, calibrated.model_score.total,
                                  detectors, packaging=study_packaging(contract),
                                  data_digest=_digest(first))  # fmt: skip
    mark_registered(uri, mlflow_run_id, registered.version)
    return registered


def build_ensemble(cfg: Config, members: list[Member], labels: np.ndarray) -> EnsembleResult:
    """Check the members, fit their blend (and temperatures) out of fold, log it to MLflow and register it.

    Args:
        cfg: ``calibrate``, ``tracking`` (store, experiment, model name, alias, ``register_model``).
        members: the trained CVs, in the order of the blend weights.
        labels: ``(n, 25)`` labels in the first member's ``folds.csv`` order (:func:`member_labels`).

    Raises:
        EnsembleError: members that cannot be combined (:func:`check_members`).
    """
    check_members(members)
    run_ids = [member.run_id for member in members]
    study_ids = members[0].folds["study_id"].to_numpy()
    calibrated, model_oof = fit_ensemble(members, labels, cfg.calibrate.temperature)
    epoch = calibrated.epoch
    member_scores = {m.run_id: score_arrays(labels, assemble_oof(study_ids, m.outcomes, epoch)) for m in members}
    identity = ensemble_id(cfg, run_ids)
    tracker = Tracker.from_config(cfg)
    parent = tracker.run_for({RUN_ID_TAG: identity, KIND_TAG: KIND}, identity, config=cfg,
                             params={"members": ",".join(run_ids)})  # fmt: skip
    if members[0].data_digest is not None:
        log_training_data(tracker, parent, members[0].data_digest)
    values = {f"member{i}_total": member_scores[run_id].total for i, run_id in enumerate(run_ids)}
    values |= {f"cv_{name}_total": score.total for name, score in calibrated.fit.scores.items()}
    tracker.log_values(parent, values | calibration_values(calibrated.fit.calibration, calibrated.model_score))
    tracker.log_text(parent, json.dumps(_summary(members, member_scores, calibrated), indent=2), "ensemble.json")
    tracker.log_text(parent, labels_to_submission(study_ids, model_oof).to_csv(index=False), "oof.csv")
    registered = _register(cfg, members, labels, calibrated, parent)
    tracker.finish(parent)
    result = EnsembleResult(identity, run_ids, study_ids, member_scores, calibrated, model_oof, parent, registered)
    logger.info("%s", result.format())
    return result


def run_ensemble(cfg: Config, run_ids: list[str]) -> EnsembleResult:
    """Combine the trained CV runs ``run_ids`` of ``cfg``'s workdir into one registered model (see the module
    docstring).

    Raises:
        FileNotFoundError: a run id that names no trained CV of the workdir.
        EnsembleError: members that cannot be combined, or a CV not finished.
    """
    members = [load_member(cfg, run_id) for run_id in run_ids]
    check_members(members)
    return build_ensemble(cfg, members, member_labels(members[0]))
