"""Ensembles of trained CVs, without Ray: two small CVs of other architectures and crop geometries (trained by the
plain-torch fold steps, written to a workdir as a CV writes them) combined by :func:`run_ensemble` into one
registered version of a temporary SQLite MLflow, pulled back by alias."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from lumbar_ray.config import Config
from lumbar_ray.data.splits import save_folds
from lumbar_ray.errors import EnsembleError
from lumbar_ray.paths import FOLDS_CSV, fold_outcome_path, tracking_uri_for
from lumbar_ray.registry import load_ensemble
from lumbar_ray.train.cv import assemble_oof
from lumbar_ray.train.ensemble import Member, check_members, load_member, run_ensemble
from tests.train.conftest import SMALL_FOLDS, predict_held_out


def _write_run(workdir: Path, name: str, cfg: Config, outcomes: dict, study_ids: np.ndarray) -> Path:
    """A CV's folder as :mod:`lumbar_ray.train.cv` leaves it: ``config.yaml``, ``folds.csv``, ``fold<k>.pt``."""
    run_dir = workdir / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    save_folds(pd.DataFrame({"study_id": study_ids, "fold": SMALL_FOLDS}), run_dir / FOLDS_CSV)
    for fold, outcome in outcomes.items():
        outcome.save(fold_outcome_path(run_dir, fold))
    return run_dir


def _ensemble_config(workdir: Path, **calibrate) -> Config:
    return Config.model_validate({
        "workdir": str(workdir),
        "calibrate": calibrate,
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "ensembles",
                     "model_name": "two_archs", "register_without_detectors": True},
    })  # fmt: skip


@pytest.fixture(scope="module")
def ensembled(small_members, small_cache, tmp_path_factory):
    """The two small CVs in a workdir, ensembled with temperatures, then ensembled again (a rerun)."""
    workdir = tmp_path_factory.mktemp("ensemble")
    for name, (cfg, outcomes) in small_members.items():
        _write_run(workdir, name, cfg, outcomes, small_cache.study_ids)
    cfg = _ensemble_config(workdir, temperature=True)
    return cfg, run_ensemble(cfg, list(small_members)), run_ensemble(cfg, list(small_members))


def test_a_registered_two_architecture_ensemble_loads_by_alias_and_reproduces_its_oof(
    ensembled, small_members, small_cache
) -> None:
    """Each member's folds, their blend and the temperatures travel in one version: pulled by alias, each fold
    predicts its held-out studies (crops of both geometries, the calibrated prior where there is no crop) as the
    ensemble's own out-of-fold predictions have them, to 1e-5."""
    cfg, result, _ = ensembled
    loaded = load_ensemble(f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}", tracking_uri_for(cfg))
    assert [member["name"] for member in loaded.contract["members"]] == ["cv-tiny", "cv-effnet"]
    assert {name: crop.slices for name, crop in loaded.inputs.items()} == {"crops": 3, "crops_1": 1}
    assert loaded.calibration == result.calibrated.fit.calibration and loaded.calibration.temperatures is not None
    study_ids = small_cache.study_ids
    best = [assemble_oof(study_ids, outcomes) for _, outcomes in small_members.values()]
    np.testing.assert_allclose(result.model_oof, loaded.calibration.apply(best), atol=1e-12)
    for fold in (0, 1):
        predicted = predict_held_out(loaded, small_cache, fold)
        np.testing.assert_allclose(predicted, result.model_oof[np.equal(SMALL_FOLDS, fold)], atol=1e-5)
    # the blend and the temperatures really act: neither member alone nor their plain mean is what it predicts
    assert min(np.abs(result.model_oof - part).max() for part in [*best, (best[0] + best[1]) / 2]) > 1e-3


def test_the_ensemble_reports_its_members_and_cross_fitted_figures_and_registers_once(ensembled, tmp_path) -> None:
    cfg, result, rerun = ensembled
    calibrated = result.calibrated
    assert result.members == ["cv-tiny", "cv-effnet"] and calibrated.epoch == "last"
    assert list(calibrated.fit.scores) == ["uncalibrated", "blended", "calibrated"]
    weights = calibrated.fit.calibration.weights
    assert all(w.shape == (2,) and np.isclose(w.sum(), 1.0) and (w >= 0).all() for w in weights.values())
    assert set(calibrated.fit.calibration.temperatures) == {"spinal", "foraminal", "subarticular"}
    text = result.format()
    assert "member cv-tiny" in text and "blend + temperatures (cross-fitted)" in text and "its cv_score" in text
    client = MlflowClient(tracking_uri_for(cfg))
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["lumbar_ray.kind"] == "ensemble" and run.data.params["members"] == "cv-tiny,cv-effnet"
    metrics = run.data.metrics
    assert metrics["member1_total"] == pytest.approx(result.member_scores["cv-effnet"].total)
    assert metrics["cv_calibrated_total"] == pytest.approx(calibrated.fit.scores["calibrated"].total)
    assert {"temperature_spinal", "weight_spinal_1", "cv_model_total"} <= set(metrics)
    summary = json.loads(
        Path(client.download_artifacts(result.mlflow_run_id, "ensemble.json", str(tmp_path))).read_text()
    )
    assert [member["run_id"] for member in summary["members"]] == result.members
    version = client.get_model_version(cfg.tracking.model_name, str(result.registered.version))
    assert float(version.tags["cv_score"]) == pytest.approx(calibrated.model_score.total)
    # one epoch each, so the registered weights are the ones fitted on: their cv_score is the cross-fitted column
    assert calibrated.model_score.total == pytest.approx(calibrated.fit.scores["calibrated"].total)
    assert rerun.mlflow_run_id == result.mlflow_run_id and "registered earlier" in str(rerun.registered)
    # the members recorded no digest (folders written by hand): the data as it is now, on the version and the run
    digest = load_member(cfg, "cv-tiny").data_digest.digest
    assert version.tags["lumbar_ray.data_digest"] == digest == result.registered.data_digest
    assert run.data.tags["lumbar_ray.data_digest"] == digest
    assert [i.dataset.digest for i in client.get_run(result.mlflow_run_id).inputs.dataset_inputs] == [digest]


def test_members_that_cannot_share_a_model_are_refused_clearly(ensembled, small_members, small_cache) -> None:
    cfg, _, _ = ensembled
    tiny = load_member(cfg, "cv-tiny")
    assert sorted(tiny.outcomes) == [0, 1] and tiny.cfg.workdir == cfg.workdir
    moved = tiny.folds.assign(fold=np.roll(tiny.folds["fold"].to_numpy(), 1))
    with pytest.raises(EnsembleError, match="do not share their folds"):
        check_members([tiny, dataclasses.replace(tiny, run_id="other", folds=moved)])
    resized = tiny.cfg.model_copy(update={"preprocess": tiny.cfg.preprocess.model_copy(update={"image_size": 96})})
    with pytest.raises(EnsembleError, match="differently preprocessed"):
        check_members([tiny, Member("other", resized, tiny.folds, tiny.outcomes)])
    detectors = tiny.cfg.model_copy(update={"localize": tiny.cfg.localize.model_copy(update={"imgsz": 64})})
    with pytest.raises(EnsembleError, match="different level detectors"):
        check_members([tiny, Member("other", detectors, tiny.folds, tiny.outcomes)])
    elsewhere = tiny.cfg.model_copy(update={"data": tiny.cfg.data.model_copy(update={"root": "/elsewhere"})})
    with pytest.raises(EnsembleError, match="different data"):
        check_members([tiny, Member("other", elsewhere, tiny.folds, tiny.outcomes)])
    other_data = dataclasses.replace(tiny.data_digest, digest="data-ffffffffffffffff")
    with pytest.raises(EnsembleError, match="trained on different data \\(digests data-"):
        check_members([tiny, dataclasses.replace(tiny, run_id="other", data_digest=other_data)])
    with pytest.raises(EnsembleError, match="named twice"):
        check_members([tiny, tiny])
    with pytest.raises(FileNotFoundError, match="no trained CV run 'nope'"):
        run_ensemble(cfg, ["cv-tiny", "nope"])
    member_cfg, outcomes = small_members["cv-tiny"]
    _write_run(Path(cfg.workdir), "cv-half", member_cfg, {0: outcomes[0]}, small_cache.study_ids)
    with pytest.raises(EnsembleError, match=r"cv-half has not finished folds \[1\]"):
        run_ensemble(cfg, ["cv-tiny", "cv-half"])


def test_the_inference_actor_feeds_every_input_and_falls_back_on_the_calibrated_prior(
    ensembled, small_cache, synthetic_dir, tmp_path
) -> None:
    """:class:`lumbar_ray.predict.StudyPredictor` (the Ray Data actor, called here as a plain object) on a model
    without level detectors: no point is placed, each input still gets its crops (all zero), and every target gets
    the model's calibrated prior, which is what its out-of-fold predictions held where a crop was missing."""
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.predict import StudyPredictor

    cfg, result, _ = ensembled
    study_ids = small_cache.study_ids[:2].tolist()
    series = load_rsna(synthetic_dir).train_series
    records = series[series["study_id"].isin(study_ids)].to_dict("records")
    predictor = StudyPredictor(f"models:/{cfg.tracking.model_name}/{result.registered.version}", tracking_uri_for(cfg),
                               small_cache.cache_root, small_cache.cache_settings, records,
                               settings_dir=str(tmp_path))  # fmt: skip
    assert set(predictor.scorer.model.inputs) == {"crops", "crops_1"} and not predictor.scorer.detectors
    probs, reports = predictor.predict_studies(study_ids)
    prior = predictor.ensemble.calibrated_prior()
    assert np.abs(prior - predictor.ensemble.prior()).max() > 1e-4  # the temperatures reach the prior too
    np.testing.assert_allclose(probs, np.broadcast_to(prior, probs.shape), atol=1e-12)
    assert all(len(report["prior_targets"]) == 25 for report in reports)
