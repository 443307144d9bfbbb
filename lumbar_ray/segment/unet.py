"""The 2.5D segmentation U-Net, through MONAI and torch alone: no Ray and no MLflow here (the registered model and
:mod:`lumbar_ray.inference` load it where neither is installed); :mod:`lumbar_ray.segment.stage` trains it on
Ray Train and owns its MLflow runs.

- :func:`build_unet`: ``monai.networks.nets.UNet`` (2D) whose input channels are ``in_slices`` adjacent cached
  slices (:func:`slab_inputs`) and whose outputs are the classes of its source
  (:func:`lumbar_ray.segment.data.classes_for`);
- :func:`predict_volume`: class probabilities of every slice of a cached volume, on the cache grid;
- :func:`save_unet` / :func:`load_unet`: ``unet.pt``, a self-describing file: the weights, the
  :class:`~lumbar_ray.config.SegmentConfig` that built them, the class names, the source and what it was trained
  and measured on; loaded with ``weights_only=True`` (plain tensors and JSON-like values, no pickled code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lumbar_ray.config import SegmentConfig
from lumbar_ray.paths import atomic_path
from lumbar_ray.segment.data import classes_for, slab

if TYPE_CHECKING:  # annotations only: torch and MONAI are imported where a network is built or run
    import torch

UNET_FORMAT = 1
"""The version of ``unet.pt``'s layout (:func:`save_unet`)."""
PREDICT_BATCH = 32
"""Slices per forward pass in :func:`predict_volume`."""


def build_unet(cfg: SegmentConfig, out_channels: int) -> torch.nn.Module:
    """MONAI's 2D U-Net: ``cfg.in_slices`` input channels, ``out_channels`` class logits, ``cfg.channels`` features
    per level with ``cfg.unet_strides`` between them and ``cfg.num_res_units`` residual units per block."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=cfg.in_slices, out_channels=int(out_channels),
                channels=tuple(cfg.channels), strides=tuple(cfg.unet_strides),
                num_res_units=cfg.num_res_units)  # fmt: skip


def slab_inputs(volume: np.ndarray, index: int, in_slices: int, size: int) -> np.ndarray:
    """``(in_slices, size, size)`` float32 in ``[0, 1]``: slice ``index`` of a uint8 volume and its neighbours
    (indices clamped at the edges), resized to the U-Net's input (:func:`lumbar_ray.segment.data.slab`)."""
    return slab(volume, index, in_slices, size).astype(np.float32) / 255.0


def to_inputs(samples: np.ndarray) -> torch.Tensor:
    """uint8 slabs ``(N, in_slices, size, size)`` as the network's float input in ``[0, 1]``."""
    import torch

    return torch.as_tensor(samples).float().div_(255.0)


def predict_volume(model: torch.nn.Module, volume: np.ndarray, cfg: SegmentConfig,
                   batch: int = PREDICT_BATCH) -> np.ndarray:  # fmt: skip
    """Class probabilities of every slice of a cached volume, on the cache grid.

    Each slice's slab is resized to ``cfg.image_size`` (:func:`slab_inputs`), the network's softmax resized back to
    the volume's in-plane size bilinearly (pixel-centre aligned, ``align_corners=False``; a convex combination of
    probabilities sums to one), ``batch`` slices at a time, in ``torch.inference_mode`` on the model's device.

    Args:
        model: a U-Net of :func:`build_unet` (not DDP-wrapped); put in eval mode here.
        volume: ``(n_slices, S, S)`` uint8.
        cfg: the settings it was built with (``in_slices``, ``image_size``).
        batch: slices per forward pass.

    Returns:
        ``(n_slices, C, S, S)`` float32 probabilities.
    """
    import torch
    from torch.nn import functional

    volume = np.asarray(volume)
    n_slices, height, width = volume.shape
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, n_slices, batch):
            stack = np.stack([slab(volume, i, cfg.in_slices, cfg.image_size)
                              for i in range(start, min(start + batch, n_slices))])  # fmt: skip
            probs = torch.softmax(model(to_inputs(stack).to(device)), dim=1)
            if probs.shape[-2:] != (height, width):
                probs = functional.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            outputs.append(probs.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0, height, width), np.float32)


def predict_samples(model: torch.nn.Module, inputs: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """The argmax class map of each uint8 slab of ``inputs`` ``(N, in_slices, size, size)`` at the input's size:
    ``(N, size, size)`` uint8 (the model put in eval mode, ``torch.inference_mode``, on its own device)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    labels = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            logits = model(to_inputs(inputs[start : start + batch]).to(device))
            labels.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    return np.concatenate(labels) if labels else np.zeros((0, *inputs.shape[2:]), np.uint8)


@dataclass
class LoadedUnet:
    """A U-Net read back from ``unet.pt``: the network (eval mode) and what it describes about itself."""

    model: torch.nn.Module
    config: SegmentConfig
    classes: tuple[str, ...]
    source: str
    trained: dict[str, Any] = field(default_factory=dict)

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        """:func:`predict_volume` with this U-Net's own settings."""
        return predict_volume(self.model, volume, self.config)


def unet_meta(cfg: SegmentConfig, trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``unet.pt`` says about its network besides the weights: its settings, classes, source and ``trained``
    (JSON-like: data, validation studies, Dice per class, epochs)."""
    return {"format": UNET_FORMAT, "config": cfg.model_dump(mode="json"), "classes": list(classes_for(cfg.source)),
            "source": cfg.source, "trained": dict(trained or {})}  # fmt: skip


def save_unet(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``unet.pt`` atomically: ``{"state_dict": CPU weights} | meta`` (:func:`unet_meta`).

    Raises:
        ValueError: if the meta lacks the config, the classes or the source.
    """
    import torch

    missing = {"config", "classes", "source"} - set(meta)
    if missing:
        raise ValueError(f"unet meta lacks {sorted(missing)}")
    bare = getattr(model, "module", model)  # a DDP wrapper's network
    weights = {key: value.detach().cpu().clone() for key, value in bare.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save({"state_dict": weights, **meta}, temporary)
    return Path(path)


def read_unet_meta(path: str | Path) -> dict[str, Any]:
    """The meta of ``unet.pt`` (everything but the weights), read with ``weights_only=True``."""
    import torch

    content = torch.load(path, map_location="cpu", weights_only=True)
    content.pop("state_dict")
    return content


def load_unet(path: str | Path, device: str | torch.device = "cpu") -> LoadedUnet:
    """Build the U-Net ``unet.pt`` describes, load its weights (``weights_only=True``) and put it in eval mode on
    ``device``."""
    import torch

    content = torch.load(path, map_location="cpu", weights_only=True)
    cfg = SegmentConfig.model_validate(content["config"])
    classes = tuple(content["classes"])
    model = build_unet(cfg, len(classes))
    model.load_state_dict(content["state_dict"])
    model.to(device).eval()
    return LoadedUnet(model, cfg, classes, str(content["source"]), dict(content.get("trained", {})))


def series_dice(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Dice per foreground class with MONAI's ``DiceMetric``, each series one sample (its slices a volume).

    A class absent from a series' truth does not count for that series (``ignore_empty``: a false positive there
    is not scored); its Dice is the mean over the series whose truth has it, and NaN when none has.

    Args:
        predicted: class volumes (``n x H x W`` ints), one per series.
        truth: the true class volumes, in the same order and shapes.
        n_classes: classes, background (0) included.

    Returns:
        ``(n_classes - 1,)`` float64: classes 1, 2, ...
    """
    import torch
    from monai.metrics import DiceMetric

    # Class maps with num_classes: MONAI compares each class's one-hot mask itself, without float one-hot volumes.
    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, num_classes=n_classes)
    for pred, true in zip(predicted, truth, strict=True):
        metric(y_pred=torch.as_tensor(np.asarray(pred))[None, None], y=torch.as_tensor(np.asarray(true))[None, None])
    if not len(predicted):
        return np.full(n_classes - 1, np.nan)
    dice, counted = (value.double().cpu().numpy() for value in metric.aggregate())
    return np.where(counted > 0, dice, np.nan)


def dice_score(dice: np.ndarray) -> float:
    """``1 - the mean Dice over the classes present`` (lower is better, like every validation score here); 1 when
    none is present."""
    present = np.asarray(dice, dtype=np.float64)[~np.isnan(dice)]
    return float(1.0 - present.mean()) if len(present) else 1.0


def dice_by_name(dice: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """``{class name: Dice}`` of the foreground classes present (``classes`` includes the background)."""
    return {name: float(value) for name, value in zip(classes[1:], dice, strict=True) if not np.isnan(value)}
