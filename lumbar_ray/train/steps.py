"""Plain-torch training and evaluation steps: no Ray here, so they are tested (and benchmarked) on their own.

The Ray Train worker loop (:mod:`lumbar_ray.train.worker`) and the bare-PyTorch benchmark loop call the same
functions, so whatever Ray adds is measured against exactly this code.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lumbar_ray.config import TrainConfig
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.metrics import ScoreResult, score_arrays

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU (``bf16``/``fp16``); full precision on CPU, where autocast brings no speed."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (bf16 has fp32's range and needs none); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm parameters (1-d tensors), as timm does."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 1 % of the peak, stepped every batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = 5.0,
) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean loss (and its parts), samples and seconds.

    Args:
        model: the classifier (plain or DDP-wrapped).
        loader: yields dicts with ``crops`` (B, 25, S, H, W) and ``labels`` (B, 25).
        loss_fn: a :class:`lumbar_ray.losses.SeverityLoss`.
        optimizer: stepped every batch.
        scheduler: stepped every batch (or None).
        device: where the batch goes.
        amp: ``off``, ``bf16`` or ``fp16`` (GPU only).
        scaler: the fp16 loss scaler (see :func:`make_grad_scaler`).
        grad_clip: max global gradient norm (None = no clipping).
    """
    model.train()
    scaler = scaler or make_grad_scaler(device, amp)
    totals: dict[str, float] = {}
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        batch = _to_device(batch, device)
        with autocast(device, amp):
            logits = model(batch["crops"])
        output = loss_fn(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(output.total).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        n = len(batch["labels"])
        samples += n
        totals["loss"] = totals.get("loss", 0.0) + float(output.total.detach()) * n
        for name, value in output.parts.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
    seconds = time.perf_counter() - start
    means = {name: value / max(1, samples) for name, value in totals.items()}
    return means | {"samples": float(samples), "seconds": seconds}


@dataclass
class Predictions:
    """Per-study outputs of :func:`predict`, in loader order.

    Attributes:
        study_ids: ``(n,)``.
        probs: ``(n, 25, 3)`` softmax probabilities (float64).
        labels: ``(n, 25)`` class ids, :data:`IGNORE_INDEX` where unscored or without a point.
        mask: ``(n, 25)`` whether the target had a point (a crop) at all.
    """

    study_ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, amp: str = "off") -> Predictions:
    """Softmax probabilities for every study of ``loader`` (eval mode)."""
    model.eval()
    study_ids, probs, labels, masks = [], [], [], []
    for batch in loader:
        crops = batch["crops"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(crops)
        probs.append(torch.softmax(logits.float(), dim=-1).double().cpu().numpy())
        study_ids.append(np.asarray(batch["study_id"]).reshape(-1))
        labels.append(np.asarray(batch["labels"]))
        masks.append(np.asarray(batch["mask"]))
    if not probs:
        raise ValueError("predict got an empty loader")
    return Predictions(np.concatenate(study_ids), np.concatenate(probs), np.concatenate(labels), np.concatenate(masks))


def fill_missing(predictions: Predictions, prior: np.ndarray) -> np.ndarray:
    """Probabilities where targets without a point (no series, no coordinate) get the prior instead.

    A crop of zeros says nothing about the target, so its prediction falls back to the training prior
    (``(25, 3)``, see :func:`lumbar_ray.baseline.fit_prior`): every target is still predicted and scored.
    """
    filled = predictions.probs.copy()
    missing = ~predictions.mask.astype(bool)
    filled[missing] = np.broadcast_to(prior, filled.shape)[missing]
    return filled


def score_predictions(probs: np.ndarray, labels: np.ndarray) -> ScoreResult:
    """The official score over every labelled target (labels keep :data:`IGNORE_INDEX` for empty cells)."""
    return score_arrays(np.where(labels < 0, IGNORE_INDEX, labels), probs)
