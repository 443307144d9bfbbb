"""A finished CV registered with its temperatures (``calibrate.temperature``), without Ray: the folds of a small CV
trained by the plain-torch steps, scored by :func:`finish_cv` and registered by :func:`register_cv` into a
temporary SQLite MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from lumbar_ray.calibrate import apply_group_temperatures, fit_group_temperatures
from lumbar_ray.config import CalibrateConfig, Config
from lumbar_ray.errors import MissingDetectorsError
from lumbar_ray.metrics import score_arrays
from lumbar_ray.paths import DETECTOR_WEIGHTS, detector_dir_for, tracking_uri_for
from lumbar_ray.registry import load_ensemble
from lumbar_ray.train.cv import assemble_oof
from lumbar_ray.train.register import detectors_to_register, register_cv
from tests.train.conftest import SMALL_FOLDS, finish_small_cv, predict_held_out


def test_a_calibrated_cv_reports_its_cross_fitted_score_and_registers_its_temperatures(
    small_members, small_cache, synthetic_dir, tmp_path
) -> None:
    member, outcomes = small_members["cv-tiny"]
    tracking = member.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                  "model_name": "calibrated_cv"})  # fmt: skip
    cfg = member.model_copy(update={"workdir": str(tmp_path), "tracking": tracking,
                                    "calibrate": CalibrateConfig(temperature=True)})  # fmt: skip
    cv = finish_small_cv(cfg, outcomes, small_cache, synthetic_dir, "cv-calibrated")

    calibrated = cv.calibrated
    assert calibrated is not None and calibrated.epoch == "last"
    scores = calibrated.fit.scores
    assert scores["uncalibrated"].total == pytest.approx(cv.last_epoch_score.total)  # fitted on the honest OOF
    assert cv.columns()["calibrated"] is scores["calibrated"]
    assert "temperatures spinal" in cv.format() and "its cv_score" in cv.format()
    model_oof = calibrated.fit.calibration.apply([assemble_oof(small_cache.study_ids, outcomes)])
    last, best = (assemble_oof(small_cache.study_ids, outcomes, epoch) for epoch in ("last", "best"))
    crossed = np.empty_like(best)  # each fold's registered weights, by temperatures fitted on the other fold
    for fold in (0, 1):
        held = np.equal(SMALL_FOLDS, fold)
        crossed[held] = apply_group_temperatures(best[held], fit_group_temperatures(small_cache.labels[~held],
                                                                                    last[~held]))  # fmt: skip
    assert cv.model_score.total == pytest.approx(score_arrays(small_cache.labels, crossed).total)  # cannot flatter
    assert cv.model_score.total != pytest.approx(score_arrays(small_cache.labels, model_oof).total, abs=1e-6)
    metrics = MlflowClient(tracking_uri_for(cfg)).get_run(cv.mlflow_run_id).data.metrics
    assert metrics["cv_calibrated_total"] == pytest.approx(scores["calibrated"].total)
    assert metrics["temperature_spinal"] == pytest.approx(calibrated.fit.calibration.temperatures["spinal"])
    assert metrics["cv_model_total"] == pytest.approx(cv.model_score.total)

    registered = register_cv(cfg, cv)
    version = MlflowClient(tracking_uri_for(cfg)).get_model_version("calibrated_cv", str(registered.version))
    assert float(version.tags["cv_score"]) == pytest.approx(cv.model_score.total)
    assert version.tags["lumbar_ray.data_digest"] == cv.data_digest and cv.data_digest.startswith("data-")
    loaded = load_ensemble(f"models:/calibrated_cv@{cfg.tracking.alias}", tracking_uri_for(cfg))
    assert loaded.calibration == calibrated.fit.calibration
    assert loaded.contract["calibration"]["fitted_on"] == "last epoch, out of fold"
    for fold in (0, 1):
        np.testing.assert_allclose(predict_held_out(loaded, small_cache, fold), model_oof[np.equal(SMALL_FOLDS, fold)],
                                   atol=1e-5)  # fmt: skip
    assert np.abs(model_oof - assemble_oof(small_cache.study_ids, outcomes)).max() > 1e-3  # the temperatures act


def test_registering_without_the_detectors_is_an_error_unless_asked_for(tmp_path, caplog) -> None:
    cfg = Config.model_validate({"workdir": str(tmp_path)})
    with pytest.raises(MissingDetectorsError, match="lumbar-ray localize"):
        detectors_to_register(cfg)
    weights = detector_dir_for(cfg, "Sagittal T2/STIR") / DETECTOR_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    with pytest.raises(MissingDetectorsError, match="Sagittal T1"):  # one of two is not enough
        detectors_to_register(cfg)

    allowed = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"register_without_detectors": True})})
    with caplog.at_level("WARNING"):
        assert detectors_to_register(allowed) == {"Sagittal T2/STIR": weights}
    assert "Sagittal T1" in caplog.text
