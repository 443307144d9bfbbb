"""A CV's training data lineage, without Ray: the digest recorded in its folder and checked on a rerun, and logged
on its MLflow parent run as one dataset input however often the CV continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lumbar_ray.config import Config
from lumbar_ray.data.lineage import DataDigest
from lumbar_ray.errors import DataChangedError
from lumbar_ray.tracking import Tracker
from lumbar_ray.train.cv import record_data_digest, recorded_data_digest
from lumbar_ray.train.report import log_training_data

FILES = {"train.csv": "a" * 64, "train_series_descriptions.csv": "b" * 64, "train_label_coordinates.csv": "c" * 64}
DIGEST = DataDigest("data-0123456789abcdef", FILES, "pp-000000000000", "/data/rsna-2024")


def test_the_training_data_is_one_dataset_input_and_a_tag_of_the_cv_run(tmp_path: Path) -> None:
    cfg = Config.model_validate({"workdir": str(tmp_path / "work"),
                                 "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})  # fmt: skip
    tracker = Tracker.from_config(cfg)
    parent = tracker.parent_run("cv-lineage", kind="cv")
    log_training_data(tracker, parent, DIGEST)
    again = Tracker.from_config(cfg)  # the CV continued: its parent run found again, the data logged again
    log_training_data(again, again.parent_run("cv-lineage", kind="cv"), DIGEST)
    run = MlflowClient(tracker.uri).get_run(parent)
    assert run.data.tags["lumbar_ray.data_digest"] == DIGEST.digest
    [logged] = run.inputs.dataset_inputs
    dataset = logged.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("rsna-2024", DIGEST.digest, "local")
    assert json.loads(dataset.source) == {"uri": "/data/rsna-2024"}  # a path, no patient value
    assert json.loads(dataset.profile) == {"files_sha256": FILES, "cache_key": "pp-000000000000"}
    assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "train")]


def test_a_cv_is_refused_when_its_data_changed_since_it_started(tmp_path: Path) -> None:
    assert recorded_data_digest(tmp_path) is None  # a CV folder from before digests were recorded
    record_data_digest(tmp_path, DIGEST)
    assert recorded_data_digest(tmp_path) == DIGEST
    moved = DataDigest(DIGEST.digest, FILES, DIGEST.cache_key, "/mnt/copy")
    record_data_digest(tmp_path, moved)  # the same data elsewhere: fine, and the record stays
    assert recorded_data_digest(tmp_path) == DIGEST
    relabelled = DataDigest("data-fedcba9876543210", FILES | {"train.csv": "d" * 64}, DIGEST.cache_key, DIGEST.root)
    with pytest.raises(DataChangedError, match=r"digests to data-fedcba9876543210 \(changed: \['train.csv'\]\)"):
        record_data_digest(tmp_path, relabelled)
