"""The generic MLflow adapter: runs found again by tags, child runs, params, epoch metrics (SQLite, no Ray)."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lumbar_ray.config import Config, load_config
from lumbar_ray.tracking import RunLogger, Tracker, flatten_params


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating one costs a second of migrations); one experiment per test."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def cfg(tmp_path: Path, store: Path, request) -> Config:
    return Config.model_validate({
        "workdir": str(tmp_path / "work"),
        "crop": {"size": 32, "slices": 3},
        "train": {"run_id": "cv-test"},
        "tracking": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "experiment": request.node.name},
    })  # fmt: skip


@pytest.fixture
def tracker(cfg: Config, tmp_path: Path, monkeypatch) -> Tracker:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must land beside the database, not in the working directory
    return Tracker.from_config(cfg)


def _client(tracker: Tracker) -> MlflowClient:
    return MlflowClient(tracking_uri=tracker.uri)


def test_parent_run_is_found_again_and_holds_the_config(
    tracker: Tracker, cfg: Config, tmp_path: Path, store: Path
) -> None:
    before = mlflow.get_tracking_uri()
    parent = tracker.parent_run("cv-test", kind="cv", config=cfg)
    tracker.finish(parent)
    client = _client(tracker)
    assert client.get_run(parent).info.status == "FINISHED"

    # a rerun of the same CV, e.g. after an interruption
    again = Tracker.from_config(cfg).parent_run("cv-test", kind="cv", config=cfg)
    assert again == parent
    assert client.get_run(parent).info.status == "RUNNING"
    assert Tracker.from_config(cfg).parent_run("cv-other", kind="cv") != parent
    assert Tracker.from_config(cfg).parent_run("cv-test", kind="localize") != parent  # found by id and kind
    assert mlflow.get_tracking_uri() == before  # no global MLflow state was touched

    run = client.get_run(parent)
    assert run.data.tags["lumbar_ray.run_id"] == "cv-test"
    assert run.data.tags["lumbar_ray.version"]
    assert run.data.params["crop.size"] == "32"
    assert run.data.params["model.encoder"] == "null"
    assert run.data.params["synth.image_sizes"] == "[128, 144, 160]"
    assert run.data.params == flatten_params(cfg.model_dump(mode="json"))
    config_yaml = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path)))
    assert load_config(config_yaml) == cfg
    assert (store / "mlartifacts").is_dir() and not (tmp_path / "cwd" / "mlartifacts").exists()


def test_params_can_be_replayed_as_overrides(cfg: Config) -> None:
    params = flatten_params(cfg.model_dump(mode="json"))
    overrides = [f"{key}={value}" for key, value in params.items() if key != "workdir"]
    replayed = load_config(overrides=[*overrides, f"workdir={cfg.workdir}"])
    assert replayed == cfg


def test_child_runs_are_found_again_by_parent_and_tag(tracker: Tracker) -> None:
    parent = tracker.parent_run("cv-test", kind="cv")
    child0, child1 = (tracker.child_run(parent, "lumbar_ray.fold", str(k), "fold", f"fold{k}") for k in (0, 1))
    assert child0 != child1
    assert tracker.child_run(parent, "lumbar_ray.fold", "0", "fold", "fold0") == child0
    other_parent = tracker.parent_run("cv-other", kind="cv")
    assert tracker.child_run(other_parent, "lumbar_ray.fold", "0", "fold", "fold0") not in (child0, child1)
    run = _client(tracker).get_run(child1)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["lumbar_ray.fold"] == "1" and run.data.tags["lumbar_ray.run_id"] == "cv-test"
    assert run.info.run_name == "fold1"


def test_run_logger_logs_steps_and_pickles(tracker: Tracker) -> None:
    child = tracker.child_run(tracker.parent_run("cv-test", kind="cv"), "lumbar_ray.fold", "0", "fold", "fold0")
    run_logger = pickle.loads(pickle.dumps(RunLogger(tracker.uri, child)))
    run_logger.log_epoch(0, {"train_loss": 1.5, "val_score": 0.9, "note": "ignored"})
    run_logger.log_epoch(1, {"train_loss": 1.0, "val_score": 0.7})
    assert len(pickle.dumps(run_logger)) < 500  # the client is not shipped once created
    history = _client(tracker).get_metric_history(child, "val_score")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.7)]
    assert "note" not in _client(tracker).get_run(child).data.metrics


def test_a_dataset_input_is_logged_once_however_often_the_run_continues(tracker: Tracker, cfg: Config) -> None:
    from mlflow.entities import Dataset

    parent = tracker.parent_run("cv-test", kind="cv")
    dataset = Dataset("rsna", "data-0123456789abcdef", "local", '{"uri": "/data/rsna"}')
    assert tracker.log_dataset_input(parent, dataset, "train")
    again = Tracker.from_config(cfg)  # a continued CV: the run found again, the same input logged again
    assert not again.log_dataset_input(again.parent_run("cv-test", kind="cv"), dataset, "train")
    inputs = _client(tracker).get_run(parent).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.dataset.source) for i in inputs] == [
        ("rsna", "data-0123456789abcdef", '{"uri": "/data/rsna"}')]  # fmt: skip
    assert [(tag.key, tag.value) for tag in inputs[0].tags] == [("mlflow.data.context", "train")]


def test_system_metrics_are_sampled_into_the_run_while_a_block_runs(tracker: Tracker, monkeypatch) -> None:
    import time

    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    child = tracker.child_run(tracker.parent_run("cv-test", kind="cv"), "lumbar_ray.fold", "0", "fold", "fold0")
    run_logger = RunLogger(tracker.uri, child)
    with run_logger.system_metrics(interval=0.3):
        time.sleep(1.2)
    metrics = _client(tracker).get_run(child).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert mlflow.active_run() is None  # nothing global was started
