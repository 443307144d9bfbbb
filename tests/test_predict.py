"""Inference end to end on the real Ray Data, MLflow and pydicom code: the registered ensemble pulled by alias
(through a real ``mlflow server`` on loopback), localisation, crops and the submission; held-out studies scored
against the prior and against the same fold's ground-truth-point predictions."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import cache_settings, load_config
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.metrics import score_submission, validate_submission
from lumbar_ray.pipeline import predict
from tests.net import free_port, wait_for_http
from tests.pipeline import pipeline_figures

pytestmark = [pytest.mark.ray, pytest.mark.slow]
logger = logging.getLogger(__name__)

# Thresholds on the shared pipeline (tests/pipeline.py) sit well outside its run-to-run spread, measured with
# `python benchmarks/pipeline_spread.py --runs 2:0 1:0 2:1 1:2` (OMP threads 1 and 2, training and detector seeds
# 0, 1, 2; 2026-12-02): each comment gives min..max over those 4 runs. Threads alone changed no localisation figure
# (the detectors train in 1-CPU Ray tasks); seeds moved them by up to the spreads below.


@pytest.fixture
def mlflow_server(trained_pipeline, tmp_path):
    """``mlflow server`` over the pipeline's SQLite store on a loopback port; stopped after the test."""
    cfg, _ = trained_pipeline
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking.tracking_uri,
               "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", server, tmp_path / "server.log", "mlflow server")
    yield url
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def test_quickstart_prediction_is_a_valid_submission_with_points(trained_pipeline):
    _, result = trained_pipeline
    prediction = result.prediction
    data = load_rsna(result.data_root)
    test_ids = sorted(data.test_series["study_id"].unique())
    submission = validate_submission(pd.read_csv(prediction.submission_path), study_ids=test_ids)
    assert len(submission) == 25 * len(test_ids)
    for study_id in test_ids:
        report = json.loads((prediction.points_dir / f"{study_id}.json").read_text())
        assert report["study_id"] == study_id and len(report["points"]) + len(report["unplaced_targets"]) == 25
    assert result.registered is not None and result.localize.weights
    assert json.loads(prediction.report_path.read_text())["prior_targets"] <= 0.2 * 25 * len(test_ids)  # 0..0


def test_localisation_metrics_of_the_held_out_fold(trained_pipeline):
    """Detectors trained on 30 studies at 96 px for seconds: rough but working; the axial geometry is exact."""
    cfg, result = trained_pipeline
    summary = result.localize.summary.set_index(["series_type", "level"])
    figures = pipeline_figures(result)
    logger.warning("pipeline figures: %s", figures)
    assert figures["t2_within_10px"] >= 0.75  # spread 0.905..1.000
    assert figures["t2_slice_within_1"] >= 0.9  # 0.987..1.000
    assert figures["t1_within_10px"] >= 0.75  # 0.928..1.000; levels re-assigned from the canal on T2
    assert figures["t1_slice_within_1"] >= 0.9  # 1.000..1.000
    assert figures["axial_slice_within_1"] >= 0.6  # 0.820..1.000; 4 mm slices vs a ~2 mm/px sagittal grid
    assert figures["axial_from_labels_slice"] >= 0.95  # 1.000..1.000: the geometry alone, no detector
    val_studies = result.cv.folds.loc[result.cv.folds["fold"] == cfg.localize.val_fold, "study_id"]
    assert set(result.localize.val_points["study_id"]) == set(val_studies)  # no study dropped

    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.localize.mlflow_run_id)
    assert run.data.metrics["loc.sagittal_t2_stir.all.within_10px"] == pytest.approx(
        summary.loc[("Sagittal T2/STIR", "all"), "within_10px"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "localisation")}
    assert any(path.endswith(".png") for path in artifacts) and "localisation/summary.csv" in artifacts


def test_model_pulled_by_alias_through_an_mlflow_server_predicts_the_test_studies(trained_pipeline, mlflow_server,
                                                                                 tmp_path):  # fmt: skip
    cfg, result = trained_pipeline
    out = tmp_path / "served" / "submission.csv"
    served = cfg.model_copy(update={
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": mlflow_server}),
        "predict": cfg.predict.model_copy(update={"model": "models:/pipeline_ensemble@champion", "out": str(out)}),
    })  # fmt: skip
    prediction = predict(served)
    test_ids = sorted(load_rsna(result.data_root).test_series["study_id"].unique())
    submission = validate_submission(pd.read_csv(out), study_ids=test_ids)  # 25 rows each, sums 1, no NaN
    assert not submission.isna().any().any() and len(submission) == 25 * len(test_ids)
    # The same model through the server and from the SQLite file directly: the same predictions.
    direct = pd.read_csv(result.prediction.submission_path)
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), direct.iloc[:, 1:].to_numpy(), atol=1e-6)
    assert prediction.report_path.is_file()
    assert load_config(out.parent / "resolved_config.yaml").predict.model == "models:/pipeline_ensemble@champion"


def test_predict_reads_the_test_studies_from_an_s3_uri_and_gives_the_local_folders_submission(
    trained_pipeline, s3_server, tmp_path
):
    """``lumbar-ray predict --data s3://...``: the CSVs read from the URI, each test series downloaded by its
    preprocessing actor into a fresh cache, then localised and predicted: the submission of the local folder."""
    cfg, result = trained_pipeline
    test_only = tmp_path / "rsna"  # the test split only: what a user would upload to predict
    shutil.copytree(result.data_root / "test_images", test_only / "test_images")
    for name in ("test_series_descriptions.csv", "sample_submission.csv"):
        shutil.copy2(result.data_root / name, test_only / name)
    uri = s3_server.upload(test_only, "predict-data/rsna")
    out = tmp_path / "s3" / "submission.csv"
    from_s3 = cfg.model_copy(update={
        "preprocess": cfg.preprocess.model_copy(update={"cache": str(tmp_path / "cache")}),
        "predict": cfg.predict.model_copy(update={"model": "models:/pipeline_ensemble@champion", "out": str(out),
                                                  "data": uri}),
    })  # fmt: skip
    prediction = predict(from_s3)
    assert sorted(prediction.study_ids) == sorted(load_rsna(result.data_root).test_series["study_id"].unique())
    local = pd.read_csv(result.prediction.submission_path)
    submission = pd.read_csv(out)
    assert submission["row_id"].tolist() == local["row_id"].tolist()
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), local.iloc[:, 1:].to_numpy(), atol=1e-6)
    manifest = SeriesCache(tmp_path / "cache", cache_settings(cfg.preprocess)).read_manifest()
    assert len(manifest) == len(load_rsna(test_only).test_series)  # every test series came from the URI


def test_held_out_training_studies_beat_the_prior_with_predicted_points(trained_pipeline):
    cfg, result = trained_pipeline
    check = result.points_check  # fold localize.val_fold, predicted through the whole inference path
    data = load_rsna(result.data_root)
    held_out = sorted(int(s) for s in result.cv.folds.loc[result.cv.folds["fold"] == check.fold, "study_id"])
    assert check.fold == cfg.localize.val_fold and check.studies == len(held_out)
    logger.warning("%s", check.format())
    # predicted 0.532..0.597 against a prior of 0.736 (the same studies every run): a margin of 0.14, twice the spread
    assert check.predicted_points.total < check.prior.total
    # predicted minus labelled: -0.035..+0.054; localisation costs little here
    assert check.predicted_points.total < check.labelled_points.total + 0.2
    submission = validate_submission(pd.read_csv(check.prediction.submission_path), study_ids=held_out)
    own = score_submission(data.train[data.train["study_id"].isin(held_out)], submission)
    assert own.total == pytest.approx(check.predicted_points.total, abs=1e-9)
    missing = {s for s in held_out if data.train_series["study_id"].eq(s).sum() < 3}
    assert set(check.prediction.missing_series) >= missing  # a study lacking a series is reported, and predicted

    from mlflow import MlflowClient

    metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(result.cv.mlflow_run_id).data.metrics
    assert metrics[f"points_fold{check.fold}_predicted"] == pytest.approx(check.predicted_points.total)


def test_studies_to_predict_follow_the_split_and_name_unknown_studies(synthetic_dir):
    from lumbar_ray.data.preprocess import series_items
    from lumbar_ray.predict import studies_to_predict

    data = load_rsna(synthetic_dir)
    test_ids, series = studies_to_predict(data, "test", None)
    assert test_ids == sorted(data.test_series["study_id"].unique()) and len(series) == len(data.test_series)
    # A study named only by sample_submission.csv (all its series missing) is still predicted.
    lonely = data.sample_submission.assign(row_id=lambda f: "123_" + f["row_id"].str.split("_", n=1).str[1])
    data.sample_submission = pd.concat([data.sample_submission, lonely.iloc[:25]])
    assert 123 in studies_to_predict(data, "test", None)[0]
    train_id = int(data.train_series["study_id"].iloc[0])
    assert studies_to_predict(data, "train", [train_id])[0] == [train_id]
    with pytest.raises(ValueError, match=r"\[999\] are not in the test split"):
        studies_to_predict(data, "test", [999])
    items = series_items(synthetic_dir, splits=["test"], study_ids=test_ids[:1])
    assert {item["study_id"] for item in items} == {test_ids[0]} and {item["split"] for item in items} == {"test"}
