"""The segmentation worker loop without a Ray cluster: Ray Train's local mode (``ScalingConfig(num_workers=0)``: the
loop runs in this process), on small hand-made samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumbar_ray.config import Config, SegmentConfig
from lumbar_ray.segment.data import SeriesTarget, build_samples
from lumbar_ray.segment.worker import SegmentJob, epoch_lr, train_loader, train_segment_loop


def _samples(cfg: SegmentConfig, seed: int, n_series: int):
    """Series of bright boxes (class 1) and dark bars (class 2) on noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    targets = []
    for index in range(n_series):
        volume = rng.integers(60, 120, (6, 32, 32), dtype=np.uint8)
        target = np.zeros(volume.shape, np.uint8)
        y, x = rng.integers(4, 18, 2)
        target[1:5, y : y + 10, x : x + 10] = 1
        target[1:5, 28:31, :] = 2
        volume[target == 1], volume[target == 2] = 230, 5
        targets.append(SeriesTarget(index, 100 + index, "Sagittal T2/STIR", volume, target))
    return build_samples(targets, cfg, every_slice=True)


def test_each_rank_takes_its_share_of_the_same_global_batches():
    cfg = SegmentConfig(batch=4, image_size=32)
    samples = _samples(cfg, 0, 3)  # 18 samples
    one = [batch[1] for batch in train_loader(samples, cfg, 0, 1)]
    ranks = [[batch[1] for batch in train_loader(samples, cfg, rank, 2)] for rank in (0, 1)]
    assert [len(b) for b in ranks[0]] == [2] * 4 + [1] and len(one) == 5
    for step in range(4):  # a global batch of 4 is the two ranks' batches of 2
        both = np.concatenate([ranks[0][step].numpy(), ranks[1][step].numpy()])
        assert sorted(map(bytes, both)) == sorted(map(bytes, one[step].numpy()))
    assert epoch_lr(cfg, 0) == cfg.lr and epoch_lr(cfg, cfg.epochs) == pytest.approx(0.0)


def test_the_loop_trains_validates_and_checkpoints_in_ray_trains_local_mode(tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lumbar_ray.train.worker import load_checkpoint_state

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    # Local mode leaves its report functions installed in this process: put back what was there (nothing).
    import ray.train.v2._internal.execution.train_fn_utils as train_fn_utils

    monkeypatch.setattr(train_fn_utils, "_train_fn_utils", train_fn_utils._train_fn_utils)
    cfg = Config.model_validate({"segment": {"image_size": 32, "epochs": 3, "batch": 4, "lr": 0.01,
                                             "channels": [8, 16], "strides": [2]}})  # fmt: skip
    classes = ("background", "box", "bar")
    job = SegmentJob(_samples(cfg.segment, 1, 6), _samples(cfg.segment, 2, 3), classes)
    config = {"cfg": cfg.model_dump(mode="json"), "job": job}
    run = RunConfig(name="seg-local", storage_path=str(tmp_path / "ray"))
    result = TorchTrainer(train_segment_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                          run_config=run).fit()  # fmt: skip
    state = load_checkpoint_state(result.checkpoint)
    assert Path(result.checkpoint.path).parent == tmp_path / "lumbar_ray_checkpoints" / "seg-local"
    assert state["epoch"] == 2 and state["starts"] == [0] and [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert set(state["best"]) == {"score", "epoch"} and state["classes"] == list(classes)
    last = state["history"][-1]
    assert {"dice/box", "dice/bar", "val_score", "train_loss", "lr"} <= set(last)
    assert last["val_score"] == pytest.approx(1 - (last["dice/box"] + last["dice/bar"]) / 2)
    assert state["last"]["score"] == last["val_score"] == result.metrics["val_score"]
    assert last["dice/box"] > 0.5, state["history"]  # it learnt something in 3 short epochs
    assert state["history"][0]["train_loss"] > last["train_loss"]
    assert {"model", "optimizer"} <= set(state)
