"""A finished CV registered with its temperatures (``calibrate.temperature``), without Ray: the folds of a small CV
trained by the plain-torch steps, scored by :func:`finish_cv` and registered by :func:`register_cv` into a
temporary SQLite MLflow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from lumbar_ray.config import CalibrateConfig
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.metrics import score_arrays
from lumbar_ray.registry import load_ensemble
from lumbar_ray.tracking import Tracker
from lumbar_ray.train.cv import CVRun, assemble_oof, finish_cv
from lumbar_ray.train.inputs import CVInputs
from lumbar_ray.train.register import register_cv
from tests.train.conftest import SMALL_FOLDS, predict_held_out


def test_a_calibrated_cv_reports_its_cross_fitted_score_and_registers_its_temperatures(
    small_members, small_cache, synthetic_dir, tmp_path
) -> None:
    member, outcomes = small_members["cv-tiny"]
    tracking = member.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                  "model_name": "calibrated_cv"})  # fmt: skip
    cfg = member.model_copy(update={"workdir": str(tmp_path), "tracking": tracking,
                                    "calibrate": CalibrateConfig(temperature=True)})  # fmt: skip
    folds = pd.DataFrame({"study_id": small_cache.study_ids, "fold": SMALL_FOLDS})
    inputs = CVInputs(load_rsna(synthetic_dir), small_cache.study_ids, small_cache.labels, folds, small_cache.points,
                      pd.DataFrame(), small_cache.cache_root, small_cache.cache_settings)  # fmt: skip
    tracker = Tracker.from_config(cfg)
    run = CVRun("cv-calibrated", tmp_path / "runs" / "cv-calibrated", inputs, tracker,
                tracker.parent_run("cv-calibrated", kind="cv", config=cfg))  # fmt: skip
    run.run_dir.mkdir(parents=True)
    cv = finish_cv(cfg, run, outcomes, [0, 1], [])

    calibrated = cv.calibrated
    assert calibrated is not None and calibrated.epoch == "last"
    scores = calibrated.fit.scores
    assert scores["uncalibrated"].total == pytest.approx(cv.last_epoch_score.total)  # fitted on the honest OOF
    assert cv.columns()["calibrated"] is scores["calibrated"]
    assert "temperatures spinal" in cv.format() and "its cv_score" in cv.format()
    model_oof = calibrated.fit.calibration.apply([assemble_oof(small_cache.study_ids, outcomes)])
    assert cv.model_score.total == pytest.approx(score_arrays(small_cache.labels, model_oof).total)
    metrics = MlflowClient(tracker.uri).get_run(run.parent).data.metrics
    assert metrics["cv_calibrated_total"] == pytest.approx(scores["calibrated"].total)
    assert metrics["temperature_spinal"] == pytest.approx(calibrated.fit.calibration.temperatures["spinal"])
    assert metrics["cv_model_total"] == pytest.approx(cv.model_score.total)

    registered = register_cv(cfg, cv)
    version = MlflowClient(tracker.uri).get_model_version("calibrated_cv", str(registered.version))
    assert float(version.tags["cv_score"]) == pytest.approx(cv.model_score.total)
    loaded = load_ensemble(f"models:/calibrated_cv@{cfg.tracking.alias}", tracker.uri)
    assert loaded.calibration == calibrated.fit.calibration
    assert loaded.contract["calibration"]["fitted_on"] == "last epoch, out of fold"
    for fold in (0, 1):
        np.testing.assert_allclose(predict_held_out(loaded, small_cache, fold), model_oof[np.equal(SMALL_FOLDS, fold)],
                                   atol=1e-5)  # fmt: skip
    assert np.abs(model_oof - assemble_oof(small_cache.study_ids, outcomes)).max() > 1e-3  # the temperatures act
