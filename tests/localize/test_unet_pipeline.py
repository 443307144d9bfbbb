"""``localize.method=unet`` end to end on the CI-sized pipeline's data (real Ray Train, MONAI, MLflow, Ray Serve).

The session's pipeline (``trained_pipeline``: YOLO detectors, a 2-fold CV, registered) and its U-Net
(``segmented_pipeline``: ``lumbar-ray segment`` on the same data's masks, then ``lumbar-ray localize`` with it) are
compared on the same held-out fold; the CV's folds are registered again with the U-Net and predict through the
registry by alias, through batch inference and through the Serve app.
"""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import SUBMISSION_COLUMNS, TARGETS
from lumbar_ray.metrics import validate_submission
from lumbar_ray.paths import unet_weights_for
from tests.net import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

UNET_MODEL = "pipeline_unet"


def _headline(summary: pd.DataFrame) -> pd.DataFrame:
    rows = summary[(summary["level"] == "all") & summary["series_type"].str.startswith("Sagittal")]
    return rows.set_index("series_type")[["points", "within_5px", "within_10px", "slice_accuracy", "slice_within_1"]]


def test_the_unet_localises_the_held_out_fold_next_to_yolo(trained_pipeline, segmented_pipeline, record_property):
    _, yolo = trained_pipeline
    cfg, segmented, localized = segmented_pipeline
    table = pd.concat({"yolo": _headline(yolo.localize.summary), "unet": _headline(localized.summary)}, axis=1)
    print(f"\n{segmented.format()}\n{table.round(3).to_string()}")
    record_property("dice", segmented.dice)
    record_property("localisation", table.round(4).to_dict())
    assert segmented.dice["disc"] > 0.5 and segmented.dice["canal"] > 0.5, segmented.dice
    unet = _headline(localized.summary)
    assert (unet["points"] == _headline(yolo.localize.summary)["points"]).all()  # the same held-out points
    assert unet.loc["Sagittal T2/STIR", "within_10px"] >= 0.9, table
    assert unet.loc["Sagittal T1", "within_10px"] >= 0.8, table
    assert (unet["slice_within_1"] >= 0.9).all(), table
    assert {str(path) for path in localized.weights.values()} == {str(unet_weights_for(cfg))}


def test_the_localisation_reports_millimetres_measured_on_the_unets_masks(segmented_pipeline):
    cfg, _, localized = segmented_pipeline
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    folder = client.download_artifacts(localized.mlflow_run_id, "localisation")
    table = pd.read_csv(f"{folder}/measurements.csv")
    assert len(table) == 5 * table["study_id"].nunique() > 0
    canal = table["canal_ap_mm"].dropna()
    assert len(canal) >= 0.8 * len(table) and canal.between(3, 30).all()  # the phantoms' canals: 11-16 mm deep
    assert table["disc_height_mm"].dropna().between(4, 16).mean() > 0.9
    assert client.get_run(localized.mlflow_run_id).data.metrics["measure.canal_ap_mm.median"] > 0


@pytest.fixture(scope="module")
def unet_registered(trained_pipeline, segmented_pipeline):
    """The pipeline CV's folds registered again, with the U-Net as the localiser, under their own name."""
    from lumbar_ray.train.register import register_ensemble

    _, result = trained_pipeline
    cfg, _, _ = segmented_pipeline
    named = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"model_name": UNET_MODEL})})
    registered = register_ensemble(named, result.cv)
    return named, result, registered, f"models:/{UNET_MODEL}@{named.tracking.alias}"


def test_a_model_registered_with_the_unet_predicts_a_study_by_alias_offline(unet_registered):
    cfg, result, _, uri = unet_registered
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model(uri)
    contract = model.unwrap_python_model().contract
    assert contract["localize"]["config"]["method"] == "unet"
    assert sorted(contract["localize"]["detectors"]) == ["Sagittal T1", "Sagittal T2/STIR"]
    folder = sorted(p for p in (result.data_root / "test_images").iterdir() if p.is_dir())[0]
    rows = model.predict(pd.DataFrame({"study_dir": [str(folder)]}))
    assert len(rows) == 25 and set(rows["row_id"]) == {f"{folder.name}_{t}" for t in TARGETS}
    np.testing.assert_allclose(rows[list(SUBMISSION_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    sagittal = rows[~rows["row_id"].str.contains("subarticular")]
    assert (~sagittal["filled"]).mean() >= 0.8, rows[["row_id", "filled", "prior"]]  # the U-Net placed them


def test_batch_prediction_at_unet_points_scores_the_held_out_fold_near_its_labelled_points(unet_registered):
    """The CV at U-Net-predicted points next to the CV at the labelled points, on the fold the U-Net never saw."""
    from lumbar_ray.pipeline import compare_points_on_fold

    cfg, result, _, uri = unet_registered
    comparison = compare_points_on_fold(cfg, result.cv, cfg.localize.val_fold, model_uri=uri)
    print(f"\nat U-Net points: {comparison.format()}; YOLO's: {result.points_check.format()}")
    held_out = sorted(int(s) for s in result.cv.folds.loc[result.cv.folds["fold"] == cfg.localize.val_fold,
                                                          "study_id"])  # fmt: skip
    submission = pd.read_csv(comparison.prediction.submission_path)
    validate_submission(submission, study_ids=held_out)
    assert comparison.predicted_points.total < comparison.prior.total
    assert abs(comparison.predicted_points.total - comparison.labelled_points.total) < 0.03  # measured: -0.0014


def _zip(folder, base) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.dcm")):
            archive.write(path, path.relative_to(base).as_posix())
    return buffer.getvalue()


def test_the_serve_app_serves_the_unet_model(unet_registered, tmp_path):
    from ray import serve

    from lumbar_ray.serve import run_serve

    cfg, result, _, uri = unet_registered
    options = {"model": uri, "port": free_port(), "upload_dir": str(tmp_path), "name": "lumbar_ray_unet"}
    url = run_serve(cfg.model_copy(update={"serve": cfg.serve.model_copy(update=options)}), blocking=False)
    try:
        images = result.data_root / "test_images"
        folder = sorted(p for p in images.iterdir() if p.is_dir())[0]
        response = httpx.post(f"{url}/v1/studies:predict", content=_zip(folder, images),
                              headers={"Content-Type": "application/zip"}, timeout=300)  # fmt: skip
    finally:
        serve.shutdown()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == UNET_MODEL
    rows = pd.DataFrame(body["rows"])
    assert rows["row_id"].tolist() == [f"{folder.name}_{t}" for t in TARGETS]
    np.testing.assert_allclose(rows[list(SUBMISSION_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    sagittal = rows[~rows["row_id"].str.contains("subarticular")]
    assert (~sagittal["filled"].astype(bool)).mean() >= 0.8, json.dumps(body["rows"])[:2000]
