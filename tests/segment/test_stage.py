"""``lumbar-ray segment`` end to end on the real Ray Train, MONAI and MLflow: synthetic data with masks ->
cache (Ray Data) -> the U-Net trained through the classifier's trainer builder -> held-out Dice per structure ->
``unet.pt`` and the MLflow record; then 2 DDP workers, one killed after its first checkpoint, resume and match.

Two TorchTrainer fits in all (each 1-2 minutes on 2 cores, the tests marked ``ray`` and ``slow``): the 1-worker stage
run is the session's ``segmented_pipeline`` (on the CI pipeline's data, shared with the U-Net localiser's tests);
its rerun is a no-op. The SPIDER source's data
and the refused sources are checked without Ray.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lumbar_ray.config import Config
from lumbar_ray.paths import cache_root_for, data_root_for, ray_storage_for, segment_key, unet_weights_for
from lumbar_ray.pipeline import segment
from lumbar_ray.segment.stage import UNET_TAG
from lumbar_ray.segment.unet import load_unet
from tests.train.test_fault import kill_a_worker_after_first_checkpoint


@pytest.fixture(scope="module")
def one_worker(segmented_pipeline):
    """The session's U-Net (``segmented_pipeline``: ``pipeline.segment`` on one worker on the CI pipeline's data,
    60 studies with masks at 96 px, 2 folds, fold 0 held out), then the stage run again (a no-op)."""
    cfg, first, _ = segmented_pipeline
    print(f"\nsegment (1 worker): {first.seconds:.0f} s the stage; {first.format()}")
    mtime = unet_weights_for(cfg).stat().st_mtime_ns
    second = segment(cfg)
    return cfg, first, second, mtime


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_reaches_a_held_out_dice_above_one_half_on_discs_and_canal(one_worker, record_property):
    cfg, first, _, _ = one_worker
    record_property("dice", first.dice)
    record_property("stage_seconds", first.seconds)
    assert first.trained_now and first.trained["starts"] == [0] and first.trained["world_size"] == 1
    assert first.dice["disc"] > 0.5 and first.dice["canal"] > 0.5, first.dice
    assert set(first.dice) <= {"vertebra", "disc", "canal", "foramen", "lesion"}
    held_out = cfg.synth.train_studies // cfg.cv.n_folds
    assert first.trained["val_fold"] == cfg.localize.val_fold and len(first.trained["val_studies"]) == held_out
    history = first.trained["history"]
    assert [entry["epoch"] for entry in history] == list(range(cfg.segment.epochs))
    assert min(entry["val_score"] for entry in history) == history[first.trained["best_epoch"]]["val_score"]
    loaded = load_unet(unet_weights_for(cfg))
    assert loaded.config == cfg.segment and loaded.trained["heldout_dice"] == first.dice
    assert "disc" in first.format() and f"{first.dice['canal']:.3f}" in first.format()


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_holds_the_unet_run_its_dice_and_unet_pt(one_worker, tmp_path):
    from mlflow import MlflowClient

    cfg, first, _, _ = one_worker
    client = MlflowClient(cfg.tracking.tracking_uri)
    child = client.get_run(first.unet_run_id)
    assert child.data.tags[UNET_TAG] == "masks" and child.data.tags["mlflow.parentRunId"] == first.mlflow_run_id
    assert child.info.status == "FINISHED" and child.data.params["segment.source"] == "masks"
    for name, value in first.dice.items():
        assert child.data.metrics[f"heldout_dice/{name}"] == pytest.approx(value)
    steps = [m.step for m in client.get_metric_history(first.unet_run_id, "dice/disc")]
    assert steps == list(range(cfg.segment.epochs))  # rank 0 logged every epoch
    assert "unet.pt" in {a.path for a in client.list_artifacts(first.unet_run_id)}
    local = client.download_artifacts(first.unet_run_id, "unet.pt", str(tmp_path))
    assert Path(local).read_bytes() == unet_weights_for(cfg).read_bytes()


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_of_the_finished_stage_is_a_no_op(one_worker):
    from mlflow import MlflowClient

    cfg, first, second, mtime = one_worker
    assert not second.trained_now and second.dice == first.dice and second.unet_run_id == first.unet_run_id
    assert unet_weights_for(cfg).stat().st_mtime_ns == mtime
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    unet_runs = client.search_runs([experiment], f"tags.`{UNET_TAG}` = 'masks'")
    assert [run.info.run_id for run in unet_runs] == [first.unet_run_id]  # the reruns trained nothing new


@pytest.mark.ray
@pytest.mark.slow
def test_two_ddp_workers_resume_after_a_killed_worker_and_match_one_worker(one_worker, ray_local, tmp_path):
    """The same data, cache and folds (named explicitly, so the key differs and the U-Net trains again) on 2 DDP
    workers; one is SIGKILLed once a checkpoint is registered, the group restarts from it."""
    cfg, first, _, _ = one_worker
    ddp = cfg.model_copy(update={
        "workdir": str(tmp_path),
        "data": cfg.data.model_copy(update={"root": str(data_root_for(cfg))}),
        "preprocess": cfg.preprocess.model_copy(update={"cache": cache_root_for(cfg)}),
        "train": cfg.train.model_copy(update={"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 2}),
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}),
    })  # fmt: skip
    run_dir = Path(ray_storage_for(ddp)) / segment_key(ddp)
    context = ray_local.get_runtime_context()
    killed: list[int] = []
    ray_job = (context.gcs_address, context.get_job_id())
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(run_dir, ray_job, killed), daemon=True)
    killer.start()
    started = time.perf_counter()
    result = segment(ddp)
    killer.join(timeout=5)
    differences = {name: abs(result.dice[name] - first.dice[name]) for name in first.dice}
    print(f"\nsegment (2 DDP workers, one killed): {time.perf_counter() - started:.0f} s; starts "
          f"{result.trained['starts']}; Dice {result.dice}; |2 workers - 1| {differences}")  # fmt: skip
    assert killed, "no training worker was found to kill"
    starts = result.trained["starts"]
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < ddp.segment.epochs, starts
    assert [entry["epoch"] for entry in result.trained["history"]] == list(range(ddp.segment.epochs))
    assert all(entry["world_size"] == 2 for entry in result.trained["history"])
    assert result.trained["val_studies"] == first.trained["val_studies"]
    assert max(differences.values()) < 0.02, differences
    assert np.isclose(result.mean_dice, first.mean_dice, atol=0.02)


def test_spider_scans_train_by_patient_folds_with_the_semantic_classes_of_their_masks(tmp_path):
    from lumbar_ray.segment.spider import write_spider
    from lumbar_ray.segment.stage import training_data

    from .conftest import write_masked

    root = write_masked(tmp_path / "rsna", size=64)
    write_spider(root, tmp_path / "spider")
    (tmp_path / "spider" / "images" / "notes_t3.mha").write_bytes(b"")  # not a T1 or T2 scan: left out
    cfg = Config.model_validate({"workdir": str(tmp_path / "work"), "preprocess": {"image_size": 48},
                                 "cv": {"n_folds": 2, "seed": 0},
                                 "segment": {"source": "spider", "spider_dir": str(tmp_path / "spider")}})  # fmt: skip
    data = training_data(cfg)
    assert len(data.train) == len(data.val) == 2  # two patients (studies), a T1 and a T2 each
    assert len(data.train_studies) == len(data.val_studies) == 1 and data.train_studies != data.val_studies
    assert {t.description for t in data.val} == {"Sagittal T1", "Sagittal T2/STIR"}
    for item in data.train + data.val:
        assert item.volume.dtype == np.uint8 and item.volume.shape[1:] == (48, 48) == item.target.shape[1:]
        assert set(np.unique(item.target)) <= {0, 1, 2, 3}  # SPIDER's: vertebra, disc, canal; no foramen, no lesion
        assert {1, 2} <= set(np.unique(item.target)) and item.volume.max() == 255
    other = cfg.model_copy(update={"localize": cfg.localize.model_copy(update={"val_fold": 1})})
    assert training_data(other).val_studies == data.train_studies  # the other fold holds the other patient
    assert Path(data.data_root) == tmp_path / "spider" and data.cache_key is None


def test_sources_the_config_cannot_train_from_are_refused_first(tmp_path):
    from lumbar_ray.config import ConfigError
    from lumbar_ray.segment.stage import check_source

    base = {"workdir": str(tmp_path)}
    with pytest.raises(ConfigError, match="needs segment.spider_dir"):
        check_source(Config.model_validate(base | {"segment": {"source": "spider"}}))
    with pytest.raises(FileNotFoundError, match="is not a SPIDER folder"):
        check_source(Config.model_validate(base | {"segment": {"source": "spider", "spider_dir": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="needs its masks: set synth.masks=true"):
        check_source(Config.model_validate(base))
    check_source(Config.model_validate(base | {"synth": {"masks": True}}))
    check_source(Config.model_validate(base | {"segment": {"source": "points"}}))
    with pytest.raises(ConfigError, match="from a local folder"):
        check_source(Config.model_validate(base | {"data": {"root": "s3://bucket/rsna"}}))
    with pytest.raises(ConfigError, match="localize.val_fold 3 is not a fold"):
        check_source(Config.model_validate(base | {"synth": {"masks": True}, "localize": {"val_fold": 3}}))
