"""The study-level model in the registry: DICOM in through ``mlflow.pyfunc``, its signature, requirements and
input checks (a model without detectors: what the registry and the input handling do, not the localisation)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from lumbar_ray.config import Config
from lumbar_ray.constants import TARGETS
from lumbar_ray.errors import StudyInputError
from lumbar_ray.inference.model import pinned_requirements, study_packaging
from lumbar_ray.inference.study import ROW_COLUMNS
from lumbar_ray.registry import ensemble_contract, load_ensemble, log_and_register, model_source
from lumbar_ray.tracking import Tracker
from tests.test_registry import FOLDS, _states


@pytest.fixture(scope="module")
def study_model(tmp_path_factory, synthetic_dir):
    """A study-level model (two tiny folds, no detectors) registered in a fresh SQLite store."""
    root = tmp_path_factory.mktemp("study_model")
    cfg = Config.model_validate({
        "workdir": str(root / "work"),
        "crop": {"size": 16, "slices": 3},
        "model": {"arch": "tiny"},
        "preprocess": {"image_size": 96},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "model_name": "study-model-tests"},
    })  # fmt: skip
    tracker = Tracker.from_config(cfg)
    prior = np.tile([0.6, 0.3, 0.1], (len(TARGETS), 1))
    contract = ensemble_contract(cfg, FOLDS, prior=prior)
    parent = tracker.parent_run("cv-study", kind="cv")
    registered = log_and_register(_states(cfg, seed=0), contract, cfg.tracking, tracker.uri, parent, 0.5,
                                  packaging=study_packaging(contract))  # fmt: skip
    uri = f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"
    local = mlflow.artifacts.download_artifacts(model_source(uri, tracker.uri), tracking_uri=tracker.uri)
    study = sorted((synthetic_dir / "test_images").iterdir())[0]
    return {"uri": uri, "tracking": tracker.uri, "local": local, "registered": registered, "study": study,
            "prior": prior}  # fmt: skip


def _zip(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.dcm")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return buffer.getvalue()


def test_the_registered_model_takes_a_study_folder_or_zip_and_returns_25_rows(study_model):
    model = mlflow.pyfunc.load_model(study_model["local"])
    study = study_model["study"]
    by_folder = model.predict(pd.DataFrame({"study_dir": [str(study)]}))
    assert list(by_folder.columns) == list(ROW_COLUMNS) and len(by_folder) == len(TARGETS)
    assert by_folder["row_id"].tolist() == [f"{study.name}_{target}" for target in TARGETS]
    # No detectors: no point, every target is the prior (flagged so).
    assert by_folder["prior"].all() and by_folder["sop_instance_uid"].isna().all()
    np.testing.assert_allclose(by_folder[["normal_mild", "moderate", "severe"]].to_numpy(), study_model["prior"])
    by_zip = model.predict(pd.DataFrame({"study_zip": [_zip(study)], "study_id": [7]}))
    assert by_zip["row_id"].iloc[0] == f"7_{TARGETS[0]}"
    np.testing.assert_allclose(by_zip[["normal_mild", "moderate", "severe"]].to_numpy(),
                               by_folder[["normal_mild", "moderate", "severe"]].to_numpy())  # fmt: skip


def test_the_signature_takes_study_columns_and_refuses_crops(study_model):
    model = mlflow.pyfunc.load_model(study_model["local"])
    inputs = {spec.name for spec in model.metadata.get_input_schema().inputs}
    assert inputs == {"study_dir", "study_zip", "study_id"}
    assert {param.name for param in model.metadata.get_params_schema().params} == {"fold", "batch_size", "series_map"}
    with pytest.raises(MlflowException):
        model.predict(np.zeros((1, 25, 3, 16, 16), np.float32))
    with pytest.raises(StudyInputError, match="exactly one"):
        model.predict(pd.DataFrame({"study_id": [1]}))
    with pytest.raises(StudyInputError, match="no such folder"):
        model.predict(pd.DataFrame({"study_dir": ["/no/such/study"]}))


def test_the_saved_input_example_is_a_study_the_model_predicts(study_model):
    from mlflow.models import Model

    example = Model.load(study_model["local"]).load_input_example(study_model["local"])
    assert list(example.columns) == ["study_zip"] and len(example) == 1
    rows = mlflow.pyfunc.load_model(study_model["local"]).predict(example)
    assert len(rows) == len(TARGETS) and np.allclose(rows[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0)


def test_the_crop_level_entry_stays_for_batch_inference(study_model):
    loaded = load_ensemble(study_model["uri"], study_model["tracking"])
    crops = np.random.default_rng(0).random((2, 25, 3, 16, 16), dtype=np.float32)
    assert loaded.predict_crops(crops).shape == (2, 25, 3)


def test_requirements_are_pinned_in_the_contract_and_the_model(study_model):
    local = Path(study_model["local"])
    contract = json.loads((local / "artifacts" / "contract.json").read_text())
    pinned = pinned_requirements()
    assert contract["requirements"] == pinned and all("==" in line for line in pinned)
    listed = (local / "requirements.txt").read_text().split()
    assert set(pinned) <= set(listed) and any(line.startswith("mlflow") for line in listed)
    assert "pydicom" in " ".join(listed) and "ultralytics" in " ".join(listed)
    metadata = yaml.safe_load((local / "MLmodel").read_text())
    assert metadata["metadata"]["contract"]["requirements"] == pinned


def test_a_base64_zip_is_what_json_carries(study_model):
    model = mlflow.pyfunc.load_model(study_model["local"])
    encoded = base64.b64encode(_zip(study_model["study"])).decode()
    from lumbar_ray.inference.model import requests_from_frame

    (request,) = requests_from_frame(pd.DataFrame({"study_zip": [encoded]}))
    assert request.study_zip == _zip(study_model["study"])
    assert len(model.predict(pd.DataFrame({"study_zip": [encoded]}))) == len(TARGETS)


def test_a_study_folder_in_object_storage_predicts_as_the_local_folder(study_model, s3_server):
    """``study_dir`` as an ``s3://`` URI: its files come down into a private folder, and its name is still the id."""
    model = mlflow.pyfunc.load_model(study_model["local"])
    study = study_model["study"]
    uri = s3_server.upload(study, f"studies/test_images/{study.name}")

    by_uri = model.predict(pd.DataFrame({"study_dir": [uri]}))

    by_folder = model.predict(pd.DataFrame({"study_dir": [str(study)]}))
    pd.testing.assert_frame_equal(by_uri, by_folder)
    with pytest.raises(StudyInputError, match="no such folder") as missing:
        model.predict(pd.DataFrame({"study_dir": [s3_server.uri("studies/test_images/404")]}))
    assert missing.value.status == 404 and "testing:testing@" not in str(missing.value)  # no credentials shown
