"""End to end on the real Ray Train, MLflow and pydicom code: k-fold CV with 2-worker DDP on CPU (gloo),
resume of an interrupted CV, the MLflow record, and the registered ensemble pulled back by alias.

One module-scoped CV serves every test here: a TorchTrainer start costs 10-20 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.labels import encode_labels
from lumbar_ray.metrics import score_arrays
from lumbar_ray.paths import cv_run_id, data_root_for, ray_storage_for, run_dir_for
from lumbar_ray.pipeline import train
from lumbar_ray.train.cv import assemble_oof, run_cv
from lumbar_ray.train.worker import CHECKPOINT_FILE

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def interrupted_then_resumed(ray_local, tmp_path_factory, small_config):
    """Fold 0 alone (an interrupted CV), then the full CV under the same run id, then a rerun of it: each through
    ``pipeline.train`` (the cache is completed first, the ensemble registered after)."""
    workdir = tmp_path_factory.mktemp("cv")
    cfg = small_config(workdir)
    first = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"folds": [0]})}))
    second = train(cfg)
    third = train(cfg)
    return cfg, first, second, third


def test_parallel_folds_give_the_sequential_cvs_out_of_fold_predictions(interrupted_then_resumed):
    """``train.parallel_folds=2``: each fold's TorchTrainer fitted by its own zero-CPU driver task; every fold keeps
    its own seeds, so the out-of-fold predictions are the sequential CV's. (On 2 CPUs the second fold's workers
    wait for the first's: the overlap in time is measured on a larger machine, see benchmarks/README.md.)"""
    cfg, _, sequential, _ = interrupted_then_resumed
    train_cfg = cfg.train.model_copy(update={"parallel_folds": 2, "run_id": "cv-parallel"})
    parallel = run_cv(cfg.model_copy(update={"train": train_cfg}))
    assert sorted(parallel.trained_folds) == [0, 1] and parallel.skipped_folds == []
    for fold in (0, 1):
        torch.testing.assert_close(parallel.outcomes[fold].model_state, sequential.cv.outcomes[fold].model_state)
    study_ids = sequential.cv.folds["study_id"].to_numpy()
    np.testing.assert_allclose(assemble_oof(study_ids, parallel.outcomes),
                               assemble_oof(study_ids, sequential.cv.outcomes), atol=1e-6, rtol=0)  # fmt: skip
    assert parallel.score.total == pytest.approx(sequential.cv.score.total, abs=1e-6)


def test_fold_ran_ddp_on_two_workers_keeping_its_best_and_latest_checkpoints(interrupted_then_resumed):
    cfg, first, _, _ = interrupted_then_resumed
    outcome = first.cv.outcomes[0]
    assert [entry["world_size"] for entry in outcome.history] == [2, 2]
    samples = outcome.ranks["samples"]
    assert len(samples) == 2 and min(samples) > 0  # both ranks trained on their shard
    n_train = int((first.cv.folds["fold"] != 0).sum())
    assert sum(samples) >= n_train  # the distributed sampler covers the whole training fold
    checksum = outcome.ranks["checksum"]
    assert checksum[0] == pytest.approx(checksum[1], rel=1e-9)  # DDP kept the replicas identical
    fold_dir = ray_storage_for(cfg).rstrip("/") + f"/{cv_run_id(cfg)}-fold0"
    checkpoints = sorted(p.name for p in Path(fold_dir).rglob("checkpoint_*") if p.is_dir())
    # num_to_keep=1 by val_score: the best checkpoint, and the latest (Ray never deletes the latest), one if they agree
    assert {Path(outcome.checkpoint_path).name, Path(outcome.best_checkpoint_path).name} == set(checkpoints)
    assert (len(checkpoints) == 1) == (outcome.best_epoch == outcome.last_epoch), (checkpoints, outcome.best_epoch)
    for path in {outcome.checkpoint_path, outcome.best_checkpoint_path}:
        state = torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        assert set(state["best"]) == {"score", "epoch"}  # no copy of the best weights in any checkpoint
    best = torch.load(Path(outcome.best_checkpoint_path) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert best["epoch"] == outcome.best_epoch and best["last"]["score"] == outcome.best_score
    torch.testing.assert_close(outcome.model_state, best["model"])  # no EMA here: the trained weights


def test_interrupted_cv_rerun_trains_only_missing_folds(interrupted_then_resumed):
    _, first_run, second_run, third_run = interrupted_then_resumed
    first, second, third = first_run.cv, second_run.cv, third_run.cv
    assert (first.trained_folds, first.skipped_folds, first_run.registered) == ([0], [], None)
    assert (second.trained_folds, second.skipped_folds) == ([1], [0])
    assert (third.trained_folds, third.skipped_folds) == ([], [0, 1])
    assert first.run_id == second.run_id == third.run_id
    torch.testing.assert_close(second.outcomes[0].model_state, first.outcomes[0].model_state)
    assert third.score.total == pytest.approx(second.score.total, abs=1e-12)
    assert len(second.oof) == 24 * 25  # every training study predicted out of fold, every target
    assert second_run.registered.version == 1
    assert "registered earlier" in str(third_run.registered)  # no duplicate model version


def test_mlflow_holds_runs_metrics_plots_and_the_version(interrupted_then_resumed):
    from mlflow import MlflowClient

    cfg, _, second_run, _ = interrupted_then_resumed
    second = second_run.cv
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [
        run for run in runs
        if run.data.tags.get("lumbar_ray.run_id") == second.run_id and run.data.tags.get("lumbar_ray.kind") == "cv"
    ]  # fmt: skip
    assert len(parents) == 1  # the rerun found its parent again
    parent = parents[0]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["lumbar_ray.fold"] for run in children) == ["0", "1"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_score")
        assert [m.step for m in history] == [0, 1]
    assert parent.data.metrics["cv_total"] == pytest.approx(second.score.total)
    # The honest CV (each fold's last epoch, fixed in advance) sits beside the best-epoch one: recomputed here
    # from the folds' kept last-epoch predictions and the labels.
    assert all(outcome.last_epoch == cfg.train.epochs - 1 for outcome in second.outcomes.values())
    study_ids = second.folds["study_id"].to_numpy()
    ids, labels = encode_labels(load_rsna(data_root_for(cfg)).train)
    labels = labels[[list(ids).index(s) for s in study_ids]]
    honest = score_arrays(labels, assemble_oof(study_ids, second.outcomes, epoch="last")).total
    assert parent.data.metrics["cv_last_epoch_total"] == pytest.approx(honest)
    assert "last epoch" in second.format() and f"{honest:.5f}" in second.format()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"oof.csv", "folds.csv", "config.yaml"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/confusion_matrices.png", "plots/level_scores.png"} <= plots
    curves = {a.path for a in client.list_artifacts(children[0].info.run_id, "plots")}
    assert "plots/training_curves.png" in curves
    version = client.get_model_version_by_alias(cfg.tracking.model_name, cfg.tracking.alias)
    assert version.run_id == parent.info.run_id
    # the training data: one dataset input though the CV ran twice, its digest on the run and on the version
    lineage = client.get_run(parent.info.run_id)
    digest = lineage.data.tags["lumbar_ray.data_digest"]
    assert [i.dataset.digest for i in lineage.inputs.dataset_inputs] == [digest]
    assert version.tags["lumbar_ray.data_digest"] == digest == second.data_digest


def test_model_loaded_by_alias_reproduces_a_folds_oof(interrupted_then_resumed):
    from lumbar_ray.data.cache import SeriesCache
    from lumbar_ray.data.crops import CropDataset
    from lumbar_ray.registry import load_ensemble
    from lumbar_ray.train.inputs import prepare_inputs

    cfg, _, second_run, _ = interrupted_then_resumed
    second = second_run.cv
    uri = f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"
    ensemble = load_ensemble(uri, cfg.tracking.tracking_uri)
    inputs = prepare_inputs(cfg, run_dir_for(cfg, second.run_id))
    fold = 1
    outcome = second.outcomes[fold]
    held_out = inputs.folds["fold"].to_numpy() == fold
    dataset = CropDataset(
        SeriesCache(inputs.cache_root, inputs.cache_settings), inputs.study_ids[held_out], inputs.points, cfg.crop
    )
    items = [dataset[i] for i in range(len(dataset))]
    crops = np.stack([item["crops"].numpy() for item in items])
    mask = np.stack([item["mask"].numpy() for item in items])
    probs = ensemble.predict_crops(crops, fold=fold)
    order = {int(s): i for i, s in enumerate(outcome.study_ids)}
    expected = outcome.probs[[order[int(item["study_id"])] for item in items]]
    assert mask.any()
    np.testing.assert_allclose(probs[mask], expected[mask], atol=1e-5)
