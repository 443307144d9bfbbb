"""The Ray Train worker loop of one fold: the thin Ray layer over :mod:`lumbar_ray.train.steps`.

Each worker builds the fold's crop datasets from the cache, wraps model and loader with ``prepare_model`` /
``prepare_data_loader`` (DDP and a distributed sampler), and resumes from ``ray.train.get_checkpoint()`` when Ray
restarts it after a failure or when an interrupted CV is rerun under the same run name.

Every epoch every worker evaluates the whole validation fold (deterministic crops, so all ranks agree on the
score without a gather; the validation fold is a fifth of the data), then every worker calls
``ray.train.report`` once (it is a barrier); rank 0 attaches the checkpoint and logs the epoch to MLflow.

A checkpoint holds the latest state (model, optimiser, scheduler, epoch, history) and the best epoch's weights
and validation probabilities: Ray keeps only the latest checkpoint, which therefore always carries the best model
by the validation score.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumbar_ray.config import Config

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


def fold_loaders(cfg: Config, payload: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The fold's training dataset and the training/validation DataLoaders (not yet prepared for Ray).

    Args:
        cfg: the resolved config.
        payload: ``cache_root``, ``cache_settings``, ``points`` (POINTS frame), ``train_ids``/``val_ids`` and
            ``train_labels``/``val_labels`` as built by :func:`lumbar_ray.train.cv.fold_payload`.
    """
    from torch.utils.data import DataLoader

    from lumbar_ray.data.cache import SeriesCache
    from lumbar_ray.data.crops import CropDataset

    cache = SeriesCache(payload["cache_root"], payload["cache_settings"])
    train_set = CropDataset(
        cache,
        payload["train_ids"],
        payload["points"],
        cfg.crop,
        labels=payload["train_labels"],
        augment=cfg.augment,
        seed=cfg.train.seed,
    )
    val_set = CropDataset(cache, payload["val_ids"], payload["points"], cfg.crop, labels=payload["val_labels"])
    workers = cfg.train.loader_workers
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": cfg.train.use_gpu}
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=False, **common)
    val_loader = DataLoader(val_set, batch_size=cfg.train.batch_size, shuffle=False, **common)
    return train_set, train_loader, val_loader


def _load_state(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def _state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def _per_rank(value: float, device: torch.device) -> list[float]:
    """``value`` of every rank, in rank order (just ``[value]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(value)]
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([float(value)], dtype=torch.float64, device=device))
    return [float(tensor.item()) for tensor in gathered]


def _parameter_checksum(model: torch.nn.Module) -> float:
    """A sum over every weight: equal on all ranks exactly when DDP kept the replicas in sync."""
    return float(sum(parameter.detach().double().sum().item() for parameter in model.parameters()))


def train_fold_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the fold's ``TorchTrainer``.

    Args:
        config: ``cfg`` (the resolved config as a dict), ``fold``, ``payload`` (see :func:`fold_loaders`),
            ``prior`` ((25, 3) training-fold prior for targets without a crop), ``mlflow`` (``tracking_uri``
            and ``run_id`` of the fold's child run, or None).
    """
    import ray.train
    import ray.train.torch

    from lumbar_ray.losses import SeverityLoss
    from lumbar_ray.models import build_model
    from lumbar_ray.train.steps import (
        fill_missing,
        make_grad_scaler,
        make_optimizer,
        make_scheduler,
        predict,
        score_predictions,
        train_epoch,
    )

    cfg = Config.model_validate(config["cfg"])
    _quiet_ray_train_info()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    amp = cfg.train.amp if device.type == "cuda" else "off"

    train_set, train_loader, val_loader = fold_loaders(cfg, config["payload"])
    train_loader = ray.train.torch.prepare_data_loader(train_loader)
    model = build_model(cfg.model, cfg.crop)
    state = _load_state(ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    loss_fn = SeverityLoss(cfg.loss).to(device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, len(train_loader))
    scaler = make_grad_scaler(device, amp)
    start_epoch, best, history, starts = 0, None, [], []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        starts = state.get("starts", [])
        logger.info("fold %s rank %d: resumed after epoch %d", config["fold"], rank, state["epoch"])
    starts = [*starts, start_epoch]  # the epoch each (re)start of this fold began at, for the record

    run_logger = None
    if rank == 0 and config.get("mlflow"):
        from lumbar_ray.tracking import RunLogger

        run_logger = RunLogger(config["mlflow"]["tracking_uri"], config["mlflow"]["run_id"])

    prior = np.asarray(config["prior"])
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_started_at = time.time()  # consecutive starts bound the whole epoch: train, eval, report
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)  # a new shuffle per epoch under DistributedSampler
        train_set.set_epoch(epoch)  # a new augmentation stream per epoch
        trained = train_epoch(model, train_loader, loss_fn, optimizer, scheduler, device, amp, scaler)
        predictions = predict(bare, val_loader, device, amp)
        probs = fill_missing(predictions, prior)
        score = score_predictions(probs, predictions.labels)
        val_loss = loss_fn(
            torch.log(torch.as_tensor(predictions.probs).clamp_min(1e-12)), torch.as_tensor(predictions.labels)
        )  # log-probs are valid logits: softmax(log p) = p
        metrics = {
            "epoch": epoch,
            "train_loss": trained["loss"],
            "train_samples": trained["samples"],
            "world_size": context.get_world_size(),
            "torch_threads": torch.get_num_threads(),
            "train_seconds": trained["seconds"],
            "train_samples_per_s": trained["samples"] / max(trained["seconds"], 1e-9),
            "val_loss": float(val_loss.total),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_started_at": epoch_started_at,
            **score.to_dict(prefix="val_"),
        }
        metrics["val_score"] = metrics.pop("val_total")
        history.append(metrics)
        # Per-rank evidence (kept in the checkpoint, not sent to MLflow): every replica trained, and in sync.
        ranks = {
            "samples": _per_rank(trained["samples"], device),
            "checksum": _per_rank(_parameter_checksum(bare), device),
        }
        improved = best is None or metrics["val_score"] < best["score"]
        if improved:
            best = {
                "score": metrics["val_score"],
                "epoch": epoch,
                "model": _state_dict_cpu(bare),
                "study_ids": predictions.study_ids,
                "probs": probs,
                "labels": predictions.labels,
            }
        metrics["best_val_score"] = best["score"]
        if rank == 0:
            _log_progress(config["fold"], epoch, cfg.train.epochs, metrics)
        if run_logger is not None:
            run_logger.log_epoch(epoch, {k: v for k, v in metrics.items() if k not in ("epoch", "epoch_started_at")})
        _report(rank, metrics, {
            "model": _state_dict_cpu(bare),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best": best,
            "history": history,
            "starts": starts,
            "ranks": ranks,
        })  # fmt: skip


def _quiet_ray_train_info() -> None:
    """One progress line per epoch (ours) instead of Ray Train's INFO line per report and per checkpoint, which
    ``log_to_driver`` would forward; some of Ray Train's loggers are named by file path, not module."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _log_progress(fold: int, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    """One line per epoch from rank 0; Ray forwards worker output to the driver (and to ``ray job logs``)."""
    if not logger.handlers:  # a Ray worker process has no logging set up: give this module a plain handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's own root handler would print every line a second time
    logger.info(
        "fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val score %.5f (best %.5f), %.1f samples/s",
        fold, epoch + 1, epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_score"],
        metrics["best_val_score"], metrics["train_samples_per_s"],
    )  # fmt: skip


def _report(rank: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
