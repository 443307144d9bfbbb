"""Plain-torch training and evaluation of a fold: no Ray here, so it is tested (and benchmarked) on its own.

:func:`build_fold` assembles one fold's datasets, loaders, model, loss, optimiser and scheduler (with hooks through
which Ray Train wraps the model and loader for DDP), and :func:`run_epoch` runs one epoch of it: train, predict
the validation fold, fill targets without a crop with the prior, score. The Ray Train worker loop
(:mod:`lumbar_ray.train.worker`), the bare-PyTorch benchmark loop and the tests call exactly these functions, so
whatever Ray adds is measured against this code.

With ``train.ema_decay`` > 0 the fold also keeps an EMA of the weights (:class:`lumbar_ray.models.ema.ModelEma`),
updated after every optimiser step; that average, not the trained weights, is then what predicts the validation
fold (the OOF predictions), what :func:`keep_best` keeps and what gets registered (:attr:`Fold.evaluated`).
:func:`training_state` is what a checkpoint must hold to resume the fold, the average included, and
:func:`evaluated_weights` reads the evaluated weights back out of it (the Ray worker keeps no other copy of them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from lumbar_ray.baseline import fill_with_prior
from lumbar_ray.config import Config, ConfigError, TrainConfig
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.data.cache import SeriesCache, copy_to_node, is_uri
from lumbar_ray.data.crops import CropDataset
from lumbar_ray.losses import LossOutput, SeverityLoss
from lumbar_ray.metrics import ScoreResult, score_arrays
from lumbar_ray.models import build_model
from lumbar_ray.models.ema import ModelEma, unwrap
from lumbar_ray.paths import ShippedFile

logger = logging.getLogger(__name__)

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


def batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: SeverityLoss, device: torch.device, amp: str = "off"
) -> LossOutput:
    """The loss of one batch; the pool's attention logits are asked for only when the loss trains them (the
    auxiliary slice term, against the batch's ``slice_target``), so the default forward is the one predicted with."""
    with autocast(device, amp):
        if loss_fn.uses_slice_attention:
            logits, attention = model(batch["crops"], return_attention=True)
        else:
            logits, attention = model(batch["crops"]), None
    if attention is None:
        return loss_fn(logits.float(), batch["labels"])
    return loss_fn(logits.float(), batch["labels"], attention.float(), batch["slice_target"])


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
    ema: ModelEma | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean loss (and its parts), samples and seconds.

    Args:
        model: the classifier (plain or DDP-wrapped).
        loader: yields dicts with ``crops`` (B, 25 * views, S, H, W) and ``labels`` (B, 25) (and ``slice_target``
            (B, 25) when the loss has an auxiliary slice term).
        loss_fn: a :class:`lumbar_ray.losses.SeverityLoss`.
        optimizer: stepped every batch.
        scheduler: stepped every batch (or None).
        device: where the batch goes.
        amp: ``off``, ``bf16`` or ``fp16`` (GPU only).
        scaler: the fp16 loss scaler (see :func:`make_grad_scaler`).
        grad_clip: max global gradient norm (None = no clipping).
        ema: an average of the weights, updated after every optimiser step (None = none).
    """
    model.train()
    scaler = scaler or make_grad_scaler(device, amp)
    totals: dict[str, float] = {}
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        batch = _to_device(batch, device)
        output = batch_loss(model, batch, loss_fn, device, amp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(output.total).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
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
    """Probabilities where targets without a point (no series, no coordinate) get the prior instead
    (:func:`lumbar_ray.baseline.fill_with_prior`): every target is still predicted and scored."""
    return fill_with_prior(predictions.probs, predictions.mask, prior)


def score_predictions(probs: np.ndarray, labels: np.ndarray) -> ScoreResult:
    """The official score over every labelled target (labels keep :data:`IGNORE_INDEX` for empty cells)."""
    return score_arrays(np.where(labels < 0, IGNORE_INDEX, labels), probs)


@dataclass
class FoldPayload:
    """What one fold's training needs besides the config: picklable, built once on the driver.

    Attributes:
        cache_root: the preprocessing cache root (folder or URI).
        cache_settings: its settings (:func:`lumbar_ray.config.cache_settings`).
        points: POINTS frame of every label point (cache pixels).
        train_ids: ``(n_train,)`` study ids trained on; ``train_labels`` ``(n_train, 25)`` their labels.
        val_ids: ``(n_val,)`` held-out study ids; ``val_labels`` their labels.
        prior: ``(25, 3)`` prior of the training labels, for targets without a crop.
        val_points: POINTS frame of predicted points (detectors that never saw this fold): the held-out studies
            are also predicted at them (None = only at the label points).
        pretrained_file: ``model.pretrained_file`` as the driver read it, written on the worker's node
            (:class:`~lumbar_ray.paths.ShippedFile`); None = none, or a name the worker resolves itself.
    """

    cache_root: str
    cache_settings: dict[str, Any]
    points: pd.DataFrame
    train_ids: np.ndarray
    val_ids: np.ndarray
    train_labels: np.ndarray
    val_labels: np.ndarray
    prior: np.ndarray
    val_points: pd.DataFrame | None = None
    pretrained_file: ShippedFile | None = None


def fold_entries(payload: FoldPayload) -> set[tuple[int, int]]:
    """``(study_id, series_id)`` of every cache entry the fold's datasets may read: the series of its studies'
    label points and, when given, of its predicted points."""
    studies = np.concatenate([np.asarray(payload.train_ids), np.asarray(payload.val_ids)]).astype(np.int64)
    entries: set[tuple[int, int]] = set()
    for frame in (payload.points, payload.val_points):
        if frame is None:
            continue
        rows = frame[frame["study_id"].isin(studies) & frame["series_id"].notna()]
        entries |= set(zip(rows["study_id"].astype(int), rows["series_id"].astype(int), strict=True))
    return entries


def fold_cache(cfg: Config, payload: FoldPayload) -> SeriesCache:
    """The cache version the fold's datasets read.

    A local cache root is read in place (memory-mapped). A remote one (a URI: ``s3://...``) is copied once per node
    into ``train.node_cache`` (by default under the node's temporary directory), only the entries this fold needs
    (:func:`fold_entries`), so that the loaders read local files instead of fetching every series from object
    storage for every item of every epoch (:func:`lumbar_ray.data.cache.copy_to_node`).
    """
    cache = SeriesCache(payload.cache_root, payload.cache_settings)
    if not is_uri(payload.cache_root):
        return cache
    return copy_to_node(cache, fold_entries(payload), cfg.train.node_cache)


def fold_loaders(
    cfg: Config, payload: FoldPayload, cache: SeriesCache | None = None
) -> tuple[CropDataset, DataLoader, DataLoader]:
    """The fold's training dataset and the training/validation DataLoaders (not yet prepared for DDP), reading
    ``cache`` (None = :func:`fold_cache`)."""
    cache = cache if cache is not None else fold_cache(cfg, payload)
    train_set = CropDataset(cache, payload.train_ids, payload.points, cfg.crop, labels=payload.train_labels,
                            augment=cfg.augment, seed=cfg.train.seed, slice_points=payload.points)  # fmt: skip
    val_set = CropDataset(cache, payload.val_ids, payload.points, cfg.crop, labels=payload.val_labels)
    workers = cfg.train.loader_workers
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": cfg.train.use_gpu}
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=False, **common)
    val_loader = DataLoader(val_set, batch_size=cfg.train.batch_size, shuffle=False, **common)
    return train_set, train_loader, val_loader


def predicted_points_loader(cfg: Config, payload: FoldPayload, cache: SeriesCache | None = None) -> DataLoader | None:
    """The held-out studies cropped at the predicted points ``payload.val_points`` (None without them), reading
    ``cache`` (None = :func:`fold_cache`)."""
    if payload.val_points is None:
        return None
    cache = cache if cache is not None else fold_cache(cfg, payload)
    val_set = CropDataset(cache, payload.val_ids, payload.val_points, cfg.crop, labels=payload.val_labels)
    return DataLoader(val_set, batch_size=cfg.train.batch_size, shuffle=False, num_workers=cfg.train.loader_workers)


@dataclass
class Fold:
    """One fold's training parts, as :func:`build_fold` assembles them.

    ``model`` is what is trained (DDP-wrapped under Ray Train), ``bare`` the plain network inside it, ``ema`` the
    average of its weights (None unless ``train.ema_decay`` > 0). :attr:`evaluated` is the one whose predictions
    are scored and whose weights are kept as the best and registered.
    """

    model: nn.Module
    bare: nn.Module
    train_set: CropDataset
    train_loader: Any
    val_loader: Any
    loss_fn: SeverityLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str
    prior: np.ndarray
    ema: ModelEma | None = None
    predicted_points_loader: Any = None
    val_ids: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def evaluated(self) -> nn.Module:
        """The EMA's network when there is one, else the trained one."""
        return self.ema.module if self.ema is not None else self.bare


def _unchanged(thing: Any) -> Any:
    return thing


def build_fold(
    cfg: Config,
    payload: FoldPayload,
    device: torch.device,
    state: dict[str, Any] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] = _unchanged,
    wrap_loader: Callable[[DataLoader], Any] = _unchanged,
) -> Fold:
    """Datasets, loaders, model (restored from ``state``), loss, optimiser, scheduler and loss scaler of a fold.

    The order of construction is fixed (it draws from torch's RNG: the model's initial weights), so a seeded
    run builds the same fold whoever calls this.

    Args:
        cfg: the resolved config.
        payload: the fold's data.
        device: where the model trains.
        state: a checkpoint's :func:`training_state` to resume from; None = fresh.
        wrap_model: e.g. ``ray.train.torch.prepare_model`` (moves to the device, wraps in DDP).
        wrap_loader: e.g. ``ray.train.torch.prepare_data_loader`` (a distributed sampler).
    """
    amp = cfg.train.amp if device.type == "cuda" else "off"
    if payload.pretrained_file is not None:  # the driver's file, written on this node
        model_cfg = cfg.model.model_copy(update={"pretrained_file": str(payload.pretrained_file.local_path())})
        cfg = cfg.model_copy(update={"model": model_cfg})
    cache = fold_cache(cfg, payload)  # a remote cache is copied to this node here, once
    train_set, train_loader, val_loader = fold_loaders(cfg, payload, cache)
    train_loader = wrap_loader(train_loader)
    model = build_model(cfg.model, cfg.crop)
    if cfg.loss.aux_slice_weight > 0 and not model.has_slice_attention:
        raise ConfigError(f"loss.aux_slice_weight > 0 trains the slice attention, but the slice pooling of model.arch "
                          f"{cfg.model.arch!r} (model.pool {cfg.model.pool!r}) has none: set model.pool=attention or "
                          "lstm, or loss.aux_slice_weight=0")  # fmt: skip
    if state is not None:
        model.load_state_dict(state["model"])
    model = wrap_model(model) if wrap_model is not _unchanged else model.to(device)
    bare = unwrap(model)  # the one DDP-unwrap rule, shared with the EMA
    loss_fn = SeverityLoss(cfg.loss).to(device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, len(train_loader))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return Fold(model, bare, train_set, train_loader, val_loader, loss_fn, optimizer, scheduler,
                make_grad_scaler(device, amp), device, amp, np.asarray(payload.prior),
                _build_ema(bare, cfg.train, state), predicted_points_loader(cfg, payload, cache),
                np.asarray(payload.val_ids), np.asarray(payload.val_labels))  # fmt: skip


def _build_ema(bare: nn.Module, cfg: TrainConfig, state: dict[str, Any] | None) -> ModelEma | None:
    """The fold's weight average (after the model is restored and on its device), resumed from ``state``."""
    if cfg.ema_decay <= 0:
        return None
    ema = ModelEma(bare, cfg.ema_decay)
    if state is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    elif state is not None:  # not written by an EMA run: the average restarts from the restored weights
        logger.warning("the checkpoint holds no EMA of the weights: the average restarts from its weights")
    return ema


def training_state(fold: Fold) -> dict[str, Any]:
    """What :func:`build_fold` resumes from: weights, optimiser, scheduler and the EMA (None without one)."""
    return {"model": state_dict_cpu(fold.bare), "optimizer": fold.optimizer.state_dict(),
            "scheduler": fold.scheduler.state_dict(),
            "ema": fold.ema.state_dict() if fold.ema is not None else None}  # fmt: skip


def evaluated_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of :attr:`Fold.evaluated` in a :func:`training_state`: the EMA's when the fold keeps one, else
    the trained ones. The state holds them already, so the weights of an epoch need no second copy beside it."""
    ema = state.get("ema")
    return ema["module"] if ema is not None else state["model"]


@dataclass
class Epoch:
    """One epoch's outcome: its metrics, the validation predictions and their prior-filled probabilities."""

    metrics: dict[str, float]
    predictions: Predictions
    probs: np.ndarray


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def run_epoch(fold: Fold, epoch: int) -> Epoch:
    """Train one epoch, then predict and score the whole validation fold (with :attr:`Fold.evaluated`).

    Every rank of a DDP run evaluates the whole validation fold (deterministic crops), so all ranks agree on the
    score without a gather.
    """
    epoch_started_at = time.time()  # consecutive starts bound the whole epoch: train, eval, report
    sampler = getattr(fold.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # a new shuffle per epoch under DistributedSampler
    fold.train_set.set_epoch(epoch)  # a new augmentation stream per epoch
    trained = train_epoch(fold.model, fold.train_loader, fold.loss_fn, fold.optimizer, fold.scheduler, fold.device,
                          fold.amp, fold.scaler, ema=fold.ema)  # fmt: skip
    predictions = predict(fold.evaluated, fold.val_loader, fold.device, fold.amp)
    probs = fill_missing(predictions, fold.prior)
    score = score_predictions(probs, predictions.labels)
    val_loss = fold.loss_fn(
        torch.log(torch.as_tensor(predictions.probs).clamp_min(1e-12)), torch.as_tensor(predictions.labels)
    )  # log-probs are valid logits: softmax(log p) = p
    metrics = {
        "epoch": epoch,
        "train_loss": trained["loss"],
        "train_samples": trained["samples"],
        "world_size": _world_size(),
        "torch_threads": torch.get_num_threads(),
        "train_seconds": trained["seconds"],
        "train_samples_per_s": trained["samples"] / max(trained["seconds"], 1e-9),
        "val_loss": float(val_loss.total),
        "lr": fold.optimizer.param_groups[0]["lr"],
        "epoch_started_at": epoch_started_at,
        **score.to_dict(prefix="val_"),
    }
    if fold.loss_fn.uses_slice_attention:
        metrics["train_aux_slice"] = trained["aux_slice"]
    metrics["val_score"] = metrics.pop("val_total")
    return Epoch(metrics, predictions, probs)


def predict_at_predicted_points(fold: Fold) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The held-out studies predicted at the predicted points by the evaluated model (None without them).

    Returns:
        ``(study_ids, probs, score)``: prior-filled probabilities (a target without a predicted point gets the
        prior, as at inference) and their official score over every labelled cell of the held-out studies (the
        crop dataset ignores the labels of targets without a point: a localiser's miss must count, not vanish).
    """
    if fold.predicted_points_loader is None:
        return None
    predictions = predict(fold.evaluated, fold.predicted_points_loader, fold.device, fold.amp)
    probs = fill_missing(predictions, fold.prior)
    position = {int(study): i for i, study in enumerate(fold.val_ids)}
    labels = fold.val_labels[[position[int(study)] for study in predictions.study_ids]]
    return predictions.study_ids, probs, score_predictions(probs, labels).total


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights (safe to keep while training goes on)."""
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def improves(score: float, best: float | None) -> bool:
    """Whether an epoch's validation score takes the best epoch's place (lower is better): the one rule of
    :func:`keep_best` and of the Ray worker's running best.

    On an exact tie the later epoch wins, as Ray's ``CheckpointConfig`` keeps the later of two equal scores (the
    earlier checkpoint is deleted), so the epoch named best is the one whose checkpoint exists. A NaN score never
    takes a number's place; any score takes a NaN's.
    """
    if best is None or math.isnan(best):
        return True
    return not math.isnan(score) and score <= best


def keep_best(best: dict[str, Any] | None, epoch: Epoch, model: nn.Module) -> dict[str, Any]:
    """The best epoch so far by validation score (:func:`improves`): its score, weights and probabilities.

    ``model`` is the network that predicted the epoch (:attr:`Fold.evaluated`): its weights are the ones kept.
    """
    if best is not None and not improves(epoch.metrics["val_score"], best["score"]):
        return best
    return {
        "score": epoch.metrics["val_score"],
        "epoch": int(epoch.metrics["epoch"]),
        "model": state_dict_cpu(model),
        "study_ids": epoch.predictions.study_ids,
        "probs": epoch.probs,
        "labels": epoch.predictions.labels,
    }
