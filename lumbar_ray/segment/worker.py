"""The Ray Train worker loop of the segmentation U-Net: the thin Ray layer over :mod:`lumbar_ray.segment.unet`.

Every worker (:func:`train_segment_loop`) builds the same seeded U-Net, wraps it with ``prepare_model`` (DDP) and
trains on its shard of the training samples: a ``DistributedSampler`` over the whole set with the world's size and
the worker's rank, seeded and reshuffled per epoch (``set_epoch``), each worker taking ``batch // world_size``
samples per step. One worker and two therefore take the same global batches in the same order, and since MONAI's
``DiceCELoss`` is a mean over samples (the Dice term per sample, ``batch=False``) and DDP averages the gradients,
they take the same steps up to float rounding. The learning rate follows a cosine over the epochs.

After each epoch every rank validates the U-Net on the WHOLE validation set (no sharding: its Dice is exact and
the same on every rank, so no gather is needed) with MONAI's ``DiceMetric`` on the one-hot argmax, each validation
series one volume (:func:`~lumbar_ray.segment.unet.series_dice`), and reports ``val_score`` (1 - the mean Dice of
the foreground classes present: lower is better, the attribute Ray keeps the best checkpoint by) and
``dice/<class>``. Rank 0 attaches the checkpoint (:func:`lumbar_ray.train.worker.report_epoch`: weights, optimiser,
epoch, history, the best epoch so far as numbers, ``starts``) and logs the epoch to the U-Net's MLflow run. A
restarted worker group, or a rerun under the same run name, resumes from ``ray.train.get_checkpoint()``.

The samples come through Ray's object store (the driver's ``ray.put``, the refs in the job), never through a path of
the driver's: a worker may run on a node without the driver's disk.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lumbar_ray.config import Config, SegmentConfig
from lumbar_ray.raytools import quiet_ray_train_info
from lumbar_ray.segment.data import SegmentSamples
from lumbar_ray.segment.unet import build_unet, dice_by_name, dice_score, predict_samples, series_dice, to_inputs
from lumbar_ray.tracking import RunLogger
from lumbar_ray.train.steps import state_dict_cpu
from lumbar_ray.train.worker import (
    SCORE_ATTRIBUTE,
    checkpoint_staging,
    clear_staging,
    load_checkpoint_state,
    report_epoch,
    running_best,
)

logger = logging.getLogger(__name__)


@dataclass
class SegmentJob:
    """What a segmentation ``TorchTrainer`` trains (its ``train_loop_config["job"]``, beside the config).

    Attributes:
        train: the training :class:`~lumbar_ray.segment.data.SegmentSamples`, or a Ray object ref to them.
        val: the validation samples (every slice of each validation series), or a ref.
        classes: the class names, background first.
        run_logger: the MLflow run the epochs go to (None: no logging).
    """

    train: Any
    val: Any
    classes: tuple[str, ...]
    run_logger: RunLogger | None = None


def _resolve(samples: Any) -> SegmentSamples:
    """Samples given by value (a test in Ray Train's local mode) or by an object ref (the stage)."""
    if isinstance(samples, SegmentSamples):
        return samples
    import ray

    return ray.get(samples)


def epoch_lr(cfg: SegmentConfig, epoch: int) -> float:
    """The learning rate of ``epoch``: ``cfg.lr`` decayed by a half cosine over ``cfg.epochs`` (no warm-up)."""
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def train_loader(samples: SegmentSamples, cfg: SegmentConfig, rank: int, world_size: int):
    """This rank's loader: its shard of a seeded ``DistributedSampler`` over all samples, ``batch // world_size``
    samples per step (the same global batch for any number of workers)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(torch.from_numpy(samples.inputs), torch.from_numpy(samples.targets))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    return DataLoader(dataset, batch_size=max(1, cfg.batch // world_size), sampler=sampler)


def train_one_epoch(model: torch.nn.Module, loader, loss_fn, optimizer, device: torch.device) -> dict[str, float]:
    """One pass over this rank's shard; the mean loss and the samples seen."""
    model.train()
    total, seen = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = to_inputs(inputs).to(device), targets.to(device).long().unsqueeze(1)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(inputs)
        seen += len(inputs)
    return {"loss": total / max(seen, 1), "samples": seen}


def validate(model: torch.nn.Module, samples: SegmentSamples, n_classes: int) -> np.ndarray:
    """Dice per foreground class of ``model`` (bare, not DDP) on every validation sample, each series a volume."""
    predicted = predict_samples(model, samples.inputs)
    groups = [np.flatnonzero(samples.series == index) for index in range(len(samples.keys))]
    groups = [group for group in groups if len(group)]
    return series_dice([predicted[g] for g in groups], [samples.targets[g] for g in groups], n_classes)


def train_segment_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the segmentation ``TorchTrainer`` (see the module docstring).

    Args:
        config: ``cfg`` (the resolved config as a dict) and ``job`` (a :class:`SegmentJob`).
    """
    import ray.train
    import ray.train.torch
    from monai.losses import DiceCELoss

    cfg, job = Config.model_validate(config["cfg"]), config["job"]
    seg, n_classes = cfg.segment, len(job.classes)
    quiet_ray_train_info()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    staging = checkpoint_staging(context.get_experiment_name())
    if rank == 0:
        clear_staging(staging)
    train_samples, val_samples = _resolve(job.train), _resolve(job.val)
    torch.manual_seed(seg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_unet(seg, n_classes)
    state = load_checkpoint_state(ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    bare = getattr(model, "module", model)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=seg.lr, weight_decay=seg.weight_decay)
    # The loader's own DistributedSampler shards (with one worker too: the same order for any world size).
    loader = ray.train.torch.prepare_data_loader(train_loader(train_samples, seg, rank, world_size),
                                                 add_dist_sampler=False)  # fmt: skip
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start_epoch, best, history, starts = 0, None, [], []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history, starts = state["epoch"] + 1, state["best"], state["history"], state["starts"]
        logger.info("segmentation rank %d: resumed after epoch %d", rank, state["epoch"])
    starts = [*starts, start_epoch]  # the epoch each (re)start began at, for the record
    for epoch in range(start_epoch, seg.epochs):
        started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(seg, epoch)
        loader.sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        trained = train_one_epoch(model, loader, loss_fn, optimizer, device)
        dice = validate(bare, val_samples, n_classes)
        score = dice_score(dice)
        best = running_best(best, epoch, score)
        metrics = {"epoch": epoch, "train_loss": trained["loss"], "train_samples": trained["samples"],
                   SCORE_ATTRIBUTE: score, "best_val_score": best["score"], "mean_dice": 1.0 - score,
                   "lr": epoch_lr(seg, epoch), "world_size": world_size, "torch_threads": torch.get_num_threads(),
                   "epoch_seconds": time.time() - started,
                   **{f"dice/{name}": value for name, value in dice_by_name(dice, job.classes).items()}}  # fmt: skip
        history.append(metrics)
        if rank == 0:
            _log_progress(epoch, seg.epochs, metrics)
            if job.run_logger is not None:
                job.run_logger.log_epoch(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
        state = {"model": state_dict_cpu(bare), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best,
                 "last": {"epoch": epoch, "score": score, "dice": dice.tolist()}, "history": history,
                 "starts": starts, "classes": list(job.classes)}  # fmt: skip
        report_epoch(rank, metrics, state, staging)


def _log_progress(epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    """One line per epoch from rank 0 (a Ray worker has no logging set up: this module gets a plain handler)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's own root handler would print every line a second time
    dice = ", ".join(f"{key.removeprefix('dice/')} {value:.3f}" for key, value in metrics.items()
                     if key.startswith("dice/"))  # fmt: skip
    logger.info("segmentation epoch %d/%d: train loss %.4f, val score %.4f (best %.4f), Dice %s, %.1f s", epoch + 1,
                epochs, metrics["train_loss"], metrics[SCORE_ATTRIBUTE], metrics["best_val_score"], dice,
                metrics["epoch_seconds"])  # fmt: skip
