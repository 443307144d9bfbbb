"""Registering a finished CV: its fold ensemble, with the level detectors of its config, as one model version
tagged with the digest of the CV's training data (the registry moves the alias only between versions of one digest).

A step of its own, after :func:`lumbar_ray.train.cv.run_cv`: ``lumbar-ray train``, the pipeline and
``lumbar-ray tune --register-best`` compose the two. The detectors are found through :mod:`lumbar_ray.paths`
(trained by ``lumbar-ray localize``), so the registered model localises new studies itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lumbar_ray.config import Config
from lumbar_ray.constants import DETECTED_SERIES_TYPES
from lumbar_ray.errors import MissingDetectorsError
from lumbar_ray.inference.model import study_packaging
from lumbar_ray.paths import detector_dir_for, tracking_uri_for, trained_detectors
from lumbar_ray.registry import (
    RegisteredEnsemble,
    ensemble_contract,
    log_and_register,
    mark_registered,
    registered_version,
)
from lumbar_ray.train.cv import CVResult

logger = logging.getLogger(__name__)


def register_cv(cfg: Config, cv: CVResult) -> RegisteredEnsemble | str | None:
    """Log and register the fold ensemble of a complete CV, once per CV run.

    A rerun that finds every fold done (and the ensemble already registered from this parent run) must not add
    a duplicate model version: the parent run's ``lumbar_ray.registered_version`` tag records the version.

    Returns:
        The new version; a string naming the version registered earlier; or None when nothing is registered
        (``tracking.register_model`` off, or a CV of only some folds).
    """
    if not cfg.tracking.register_model:
        return None
    if not cv.complete:
        logger.info("CV %s covers folds %s only: no ensemble registered", cv.run_id, sorted(cv.outcomes))
        return None
    uri = tracking_uri_for(cfg)
    done = registered_version(uri, cv.mlflow_run_id)
    if done is not None:
        logger.info("the ensemble of this CV is already registered (version %s): not registering again", done)
        return f"{cfg.tracking.model_name} version {done} (registered earlier)"
    registered = register_ensemble(cfg, cv)
    mark_registered(uri, cv.mlflow_run_id, registered.version)
    return registered


def register_ensemble(cfg: Config, cv: CVResult) -> RegisteredEnsemble:
    """Log and register a complete CV's fold ensemble with ``cfg``'s localisers (a new version each call).

    :func:`register_cv` calls this once per CV. Called on its own it registers the same folds again, e.g. with
    another localiser (``localize.method``) than the one the CV was registered with, under ``cfg.tracking``'s name.

    Raises:
        MissingDetectorsError: see :func:`detectors_to_register`.
    """
    uri = tracking_uri_for(cfg)
    states = {fold: outcome.model_state for fold, outcome in sorted(cv.outcomes.items())}
    detectors = detectors_to_register(cfg)
    calibration = None if cv.calibrated is None else cv.calibrated.fit.calibration
    info = None if cv.calibrated is None else cv.calibrated.info()
    contract = ensemble_contract(cfg, sorted(cv.outcomes), cv.prior, sorted(detectors), cv.fold_priors,
                                 members=[(cv.run_id, cfg)], calibration=calibration,
                                 calibration_info=info)  # fmt: skip
    registered = log_and_register(states, contract, cfg.tracking, uri, cv.mlflow_run_id, cv.model_score.total,
                                  detectors, packaging=study_packaging(contract),
                                  data_digest=cv.data_digest)  # fmt: skip
    return registered


def detectors_to_register(cfg: Config) -> dict[str, Path]:
    """The level detectors of ``cfg`` that a registered model ships (series type -> weights).

    Raises:
        MissingDetectorsError: when one is missing, unless ``tracking.register_without_detectors`` asks for a model
            without them (then a warning names what is missing).
    """
    detectors = trained_detectors(cfg)
    missing = [description for description in DETECTED_SERIES_TYPES if description not in detectors]
    if not missing:
        return detectors
    where = detector_dir_for(cfg, missing[0]).parent
    if not cfg.tracking.register_without_detectors:
        raise MissingDetectorsError(f"no trained level detector for {missing} under {where}: run `lumbar-ray localize` "
                                    "with this config first (on this machine's workdir; under localize.method=unet "
                                    "it trains the U-Net first), or set "
                                    "tracking.register_without_detectors=true for a model that only predicts from "
                                    "given points")  # fmt: skip
    logger.warning("registering without the level detectors for %s (tracking.register_without_detectors): those "
                   "series types can only be predicted from given points", missing)  # fmt: skip
    return detectors


def registered_model_uri(cfg: Config, mlflow_run_id: str) -> str:
    """``models:/<name>/<version>`` of the ensemble a CV parent run registered.

    Raises:
        ValueError: if that run registered nothing (an incomplete CV, or ``tracking.register_model`` off).
    """
    version = registered_version(tracking_uri_for(cfg), mlflow_run_id)
    if version is None:
        raise ValueError(f"CV run {mlflow_run_id} registered no ensemble")
    return f"models:/{cfg.tracking.model_name}/{version}"
