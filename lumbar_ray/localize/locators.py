"""The sagittal localisers behind ``localize.method``: ultralytics YOLO detectors or one MONAI U-Net.

Both are :class:`~lumbar_ray.localize.study.LevelDetector` s: ``detect`` gives raw per-slice detections (target,
slice, x, y, confidence) and ``resolve`` turns them into one point per target with the same rules
(:func:`lumbar_ray.localize.levels.resolve_targets`: the slab centre per target, cranio-caudal order repair, filled
gaps), so the study-level steps after them (Sagittal T1 sides and levels from patient space, axial geometry) are
one implementation whichever localiser found the levels.

:class:`UnetLocator` segments every slice of a cached volume (2.5D) and reads the detections off the predicted
classes (:mod:`lumbar_ray.segment.post`): from the anatomy (discs, canal, foramina) when the U-Net learnt masks, or
from per-level blobs when it learnt maps drawn around the label points (``segment.source: points``, the only
option on RSNA data). No Ray and no MLflow here: the registered model loads these where only its pinned
requirements are installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import LocalizeConfig, SegmentConfig
from lumbar_ray.constants import LEVELS
from lumbar_ray.localize.detector import load_detectors
from lumbar_ray.localize.levels import resolve_targets
from lumbar_ray.segment.post import detections_from_masks, detections_from_points
from lumbar_ray.segment.unet import load_unet, predict_volume

logger = logging.getLogger(__name__)

POINT_CLASS_OFFSET = {"Sagittal T2/STIR": 0, "Sagittal T1": len(LEVELS)}
"""Where a series type's level classes start among a points-trained U-Net's classes (after the background)."""


class UnetLocator:
    """One series type's localiser from a trained U-Net (``unet.pt`` of :func:`lumbar_ray.segment.unet.save_unet`).

    Args:
        weights: the U-Net's file.
        description: the sagittal series type it localises on.
        device: torch device; None = CUDA when available, else CPU.
    """

    def __init__(self, weights: str | Path, description: str, device: str | None = None) -> None:
        self.model, self.meta = load_unet(weights, device)
        self.cfg = SegmentConfig(**self.meta["config"])
        self.description = description
        self.source = str(self.meta["source"])

    def probabilities(self, volume: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n_slices, C, H, W)`` of a cached ``(n_slices, H, W)`` uint8 volume."""
        return predict_volume(self.model, np.asarray(volume), self.cfg)

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Every detection the U-Net's classes give on the volume (columns of
        :data:`~lumbar_ray.localize.levels.DETECTION_COLUMNS`; T1 sides provisional, as YOLO's)."""
        volume = np.asarray(volume)
        if volume.ndim != 3 or volume.shape[0] == 0:
            raise ValueError(f"expected a (n_slices, H, W) volume, got shape {volume.shape}")
        probs = self.probabilities(volume)
        if self.source != "points":
            return detections_from_masks(probs.argmax(axis=1), self.description, left_first, probs)
        offset = POINT_CLASS_OFFSET[self.description]
        channels = [0, *range(offset + 1, offset + 1 + len(LEVELS))]
        level_probs = probs[:, channels]  # this series type's levels only: the other type's blobs are background
        return detections_from_points(level_probs.argmax(axis=1), self.description, left_first, level_probs)

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        """One point per target from given detections (the rules YOLO's detections go through)."""
        return resolve_targets(detections, self.description, n_slices)

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Exactly one point per target of this series type (see
        :meth:`lumbar_ray.localize.detector.SagittalDetector.locate`)."""
        return self.resolve(self.detect(volume, left_first), len(volume))


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
    return {description: UnetLocator(path, description, device=device) for description, path in weights.items()}
