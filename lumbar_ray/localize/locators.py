"""The sagittal localisers behind ``localize.method``: ultralytics YOLO detectors or one MONAI U-Net.

Both are :class:`~lumbar_ray.localize.study.LevelDetector` s: ``detect`` gives raw per-slice detections (target,
slice, x, y, confidence) and ``resolve`` turns them into one point per target with the same rules
(:func:`lumbar_ray.localize.levels.resolve_targets`: the slab centre per target, cranio-caudal order repair, filled
gaps), so the study-level steps after them (Sagittal T1 sides and levels from patient space, axial geometry) are
one implementation whichever localiser found the levels.

:func:`unet_locator` segments every slice of a cached volume (2.5D) and reads the detections off the predicted
classes (:mod:`lumbar_ray.segment.post`): from the anatomy (discs, canal, foramina) when the U-Net learnt masks, or
from per-level blobs when it learnt maps drawn around the label points (``segment.source: points``, the only
option on RSNA data). No Ray and no MLflow here: the registered model loads these where only its pinned
requirements are installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lumbar_ray.config import LocalizeConfig
from lumbar_ray.constants import LEVELS
from lumbar_ray.localize.detector import load_detectors
from lumbar_ray.segment.data import POINT_CLASS_OFFSET, level_classes
from lumbar_ray.segment.post import MaskLocator, Segmentation
from lumbar_ray.segment.unet import LoadedUnet, load_unet

logger = logging.getLogger(__name__)


def unet_segmenter(unet: LoadedUnet, description: str) -> Callable[[np.ndarray], Segmentation]:
    """A cached volume -> the U-Net's :class:`~lumbar_ray.segment.post.Segmentation` of it, as ``description``'s
    localiser reads it: the anatomy classes, or (a points-trained U-Net) this series type's five level classes, the
    other type's blobs counted as background."""

    def segment(volume: np.ndarray) -> Segmentation:
        probabilities = unet.predict_volume(np.asarray(volume))
        classes = probabilities.argmax(axis=1).astype(np.uint8)
        if unet.source != "points":
            return Segmentation(classes, probabilities)
        offset = POINT_CLASS_OFFSET[description]
        own = probabilities[:, [0, *range(offset + 1, offset + 1 + len(LEVELS))]]  # the confidences of its levels
        return Segmentation(level_classes(classes, description), own)

    return segment


def unet_locator(weights: str | Path, description: str, device: str | None = None) -> MaskLocator:
    """One series type's localiser from a trained U-Net (``unet.pt`` of :func:`lumbar_ray.segment.unet.save_unet`).

    Args:
        weights: the U-Net's file.
        description: the sagittal series type it localises on.
        device: torch device; None = CUDA when available, else CPU.
    """
    import torch

    unet = load_unet(weights, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = "points" if unet.source == "points" else "anatomy"
    return MaskLocator(description, unet_segmenter(unet, description), kind)


def load_locators(
    weights: dict[str, str | Path],
    cfg: LocalizeConfig,
    device: str | None = None,
    settings_dir: str | Path | None = None,
) -> dict[str, Any]:
    """A localiser per sagittal series type from its weights, of the kind ``cfg.method`` names.

    Args:
        weights: series type -> ``detector.pt`` (yolo) or ``unet.pt`` (unet; one file may serve both types).
        cfg: the localisation settings (``method``; ``conf`` filters YOLO's detections).
        device: torch device; None = CUDA when available, else CPU.
        settings_dir: ultralytics' private settings folder (yolo only).
    """
    if cfg.method == "yolo":
        return load_detectors(weights, cfg, device=device, settings_dir=settings_dir)
    return {description: unet_locator(path, description, device) for description, path in weights.items()}
