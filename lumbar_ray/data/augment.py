"""Training augmentations of the 2.5D target crops, built from :class:`lumbar_ray.config.AugmentConfig`.

One draw of :meth:`Augmenter.sample` holds every random parameter of one study item: per target a point
jitter (in-plane and in slice, uniform within bounds that may differ by the series type the target is read on,
:func:`jitter_bounds`), a rotation and a zoom (both applied by the crop itself, see
:func:`lumbar_ray.data.crops.crop_stack`), brightness/contrast/gamma, and one left/right flip for the whole
study. Geometry is applied while cropping (a jittered point is just another point); the photometric changes
and the flip act on the finished crops, so the flip is an exact permutation/reversal and applying it twice
restores the item bit for bit.

The flip mirrors the patient, so it must move the sided targets with their pixels:

- the crops, labels and masks of the left and right foraminal targets trade places, and so do those of the
  left and right subarticular targets;
- axial crops (subarticular) are mirrored along their columns: the column axis of an axial image runs across
  the patient's left-right axis;
- sagittal crops (spinal canal and foraminal) have their slice axis reversed: the slice axis of a sagittal
  series runs along the patient's left-right axis, while their rows and columns (cranio-caudal, antero-posterior)
  do not change side; so a sagittal crop's labelled slice moves from index ``k`` to ``S - 1 - k``
  (:func:`flip_slice_targets`).

Every strength 0 gives the identity. All of this runs in the data-loading workers (inside the dataset's
``__getitem__``), never on the driver.

The rule is written once: :func:`flip_permutation` (which target becomes which) and :func:`mirror_crops` (the
crops of a batch of studies, torch). :func:`flip_targets` applies them to one study item in the data pipeline,
and the model's test-time flip (:mod:`lumbar_ray.models.net`) to a batch and its predictions.

Views (``crop.second_view``): an item may hold ``25 * k`` crops, ``k`` blocks of 25 in :data:`TARGETS` order, block
0 each target's own series, block 1 its second view (:data:`~lumbar_ray.constants.SECOND_VIEW_SOURCES`, on the
level's axial slices). Every per-crop rule here reads the series type of each crop from :func:`target_series_types`
of ``25 * k`` crops: the jitter bound, whether a crop mirrors in-plane (axial) or along its slices (sagittal), and
the flip's permutation, which swaps the sided targets within each block, so a second view stays paired with its
target's own crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lumbar_ray.config import AugmentConfig
from lumbar_ray.constants import CONDITION_SERIES, CONDITIONS, LEVELS, MAX_VIEWS, SECOND_VIEW_SOURCES, TARGETS


def view_count(n: int) -> int:
    """How many views ``n`` crops hold (``n = 25 * views``, see the module docstring).

    Raises:
        ValueError: ``n`` is not 25 times a view count from 1 to :data:`~lumbar_ray.constants.MAX_VIEWS`.
    """
    views, rest = divmod(int(n), len(TARGETS))
    if rest or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"crops come in 1 to {MAX_VIEWS} blocks of the {len(TARGETS)} targets, not {n}")
    return views


def _view_condition(condition: str, view: int) -> str:
    """The condition whose series type crop ``view`` of a ``condition`` target is cut on. A target without a
    second view keeps its own (its second crop is all-zero: any type would do, a real one keeps tables total)."""
    return condition if view == 0 else SECOND_VIEW_SOURCES.get(condition, (condition,))[0]


def target_series_types(n: int = len(TARGETS)) -> list[str]:
    """The series type each of ``n`` crops is cut on, ``n = 25 * views`` in view-major :data:`TARGETS` order:
    ``Sagittal T2/STIR`` for spinal... then, in the second block, ``Axial T2`` for the second views."""
    return [CONDITION_SERIES[_view_condition(target[:-6], view)] for view in range(view_count(n)) for target in TARGETS]


def jitter_bounds(cfg: AugmentConfig, n: int = len(TARGETS)) -> tuple[np.ndarray, np.ndarray]:
    """Per crop, the in-plane (cache pixels) and slice bounds of the point jitter.

    ``jitter_px`` and ``jitter_slices`` for every crop, except where ``jitter_px_by_series`` or
    ``jitter_slices_by_series`` names the series type the crop is cut on (the localiser's error differs by
    series type: the measured one is what training points should share). In-plane bounds stay in cache pixels,
    also when crops are cut in millimetres (``crop.region_mm``): a localiser's error is measured in cache pixels.

    Args:
        cfg: the augmentation settings.
        n: number of crops; per-series bounds need ``25 * views`` of them (:func:`target_series_types`).

    Returns:
        ``(px, slices)``: float64 ``(n,)`` and int64 ``(n,)`` bounds.

    Raises:
        ValueError: per-series bounds asked for ``n`` crops that are not blocks of the 25 targets.
    """
    px, slices = np.full(n, float(cfg.jitter_px)), np.full(n, int(cfg.jitter_slices), dtype=np.int64)
    if not (cfg.jitter_px_by_series or cfg.jitter_slices_by_series):
        return px, slices
    for t, series_type in enumerate(target_series_types(n)):
        px[t] = (cfg.jitter_px_by_series or {}).get(series_type, cfg.jitter_px)
        slices[t] = (cfg.jitter_slices_by_series or {}).get(series_type, cfg.jitter_slices)
    return px, slices


def flip_permutation(n: int = len(TARGETS)) -> np.ndarray:
    """Crop index -> the index of its mirror crop, for ``n = 25 * views`` crops: left <-> right within each block of
    25 (spinal targets map to themselves), so every view keeps its place next to its target's other views."""
    order = np.arange(len(TARGETS))
    for index, condition in enumerate(CONDITIONS):
        if condition.startswith("left_"):
            mirror = CONDITIONS.index("right_" + condition.removeprefix("left_"))
            for level in range(len(LEVELS)):
                order[index * len(LEVELS) + level] = mirror * len(LEVELS) + level
                order[mirror * len(LEVELS) + level] = index * len(LEVELS) + level
    return np.concatenate([order + view * len(TARGETS) for view in range(view_count(n))])


def axial_targets(n: int = len(TARGETS)) -> np.ndarray:
    """Boolean ``(n,)``: crops cut on an axial series (they mirror in-plane under a flip), ``n = 25 * views``."""
    return np.array([series_type.startswith("Axial") for series_type in target_series_types(n)])


def mirror_crops(crops: torch.Tensor) -> torch.Tensor:
    """Mirror studies left/right: the sided targets trade crops, and each crop is mirrored along the patient's x axis.

    Axial crops (subarticular, and every second view) are reversed along their columns, sagittal crops (spinal,
    foraminal) along their slices (see the module docstring). A pure permutation and reversal: applying it twice
    restores the input bit for bit.

    Args:
        crops: ``(..., 25 * views, S, H, W)`` crops in view-major :data:`TARGETS` order (one study or a batch).

    Returns:
        A new tensor of the same shape, dtype and device.
    """
    n = crops.shape[-4]
    order = torch.as_tensor(flip_permutation(n), device=crops.device)
    axial = torch.as_tensor(axial_targets(n), device=crops.device).reshape(-1, 1, 1, 1)
    swapped = crops.index_select(-4, order)
    return torch.where(axial, swapped.flip(-1), swapped.flip(-3))


def flip_targets(crops: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror one study left/right: :func:`mirror_crops` on its crops, the same swap of its labels and mask.

    Args:
        crops: (25 * views, slices, size, size) crops in view-major :data:`TARGETS` order.
        labels: (25,) labels.
        mask: (25,) whether each target has a crop, or (25 * views,) whether each crop has a point.

    Returns:
        New ``(crops, labels, mask)``; the inputs are not modified.
    """
    flipped = mirror_crops(torch.from_numpy(np.ascontiguousarray(crops))).numpy()
    return flipped, labels[flip_permutation()].copy(), mask[flip_permutation(len(mask))].copy()


def flip_slice_targets(slice_targets: np.ndarray, n_slices: int) -> np.ndarray:
    """The labelled slice's index in each crop after :func:`flip_targets`: the sided targets swap, and on the
    sagittal crops, whose slice axis is reversed, index ``k`` becomes ``n_slices - 1 - k``.

    Args:
        slice_targets: (25,) index of the labelled slice in each crop, negative (IGNORE_INDEX) where unknown.
        n_slices: slices per crop.

    Returns:
        A new (25,) array; unknown targets stay as they are.
    """
    flipped = slice_targets[flip_permutation()].copy()
    reversed_ = ~axial_targets() & (flipped >= 0)
    flipped[reversed_] = n_slices - 1 - flipped[reversed_]
    return flipped


@dataclass(frozen=True)
class AugmentParams:
    """The random draw of one study item (arrays are per crop, in view-major :data:`TARGETS` order).

    Attributes:
        shift_xy: (n, 2) in-plane point shift (x, y), cache pixels, each within its target's bound.
        shift_slice: (n,) integer shift of the centre slice, within its target's bound.
        angle_deg: (n,) in-plane rotation of the crop (content turns counter-clockwise as displayed).
        zoom: (n,) magnification of the crop (> 1 cuts a smaller region).
        brightness: (n,) additive shift, in units of the [0, 1] intensity range.
        contrast: (n,) factor around the crop's mean.
        gamma: (n,) exponent applied to the clipped intensities.
        flip: whether the study is mirrored left/right.
    """

    shift_xy: np.ndarray
    shift_slice: np.ndarray
    angle_deg: np.ndarray
    zoom: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    gamma: np.ndarray
    flip: bool

    @classmethod
    def identity(cls, n: int = len(TARGETS)) -> AugmentParams:
        """Parameters that change nothing."""
        zeros, ones = np.zeros(n), np.ones(n)
        return cls(np.zeros((n, 2)), np.zeros(n, dtype=np.int64), zeros, ones, zeros, ones, ones, False)


class Augmenter:
    """Draws and applies the augmentations of :class:`AugmentConfig` (strength 0 switches one off).

    Args:
        cfg: the strengths.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def sample(self, rng: np.random.Generator, n: int = len(TARGETS)) -> AugmentParams:
        """Draw the parameters of one study item.

        Args:
            rng: the item's generator.
            n: number of crops (``25 * views``); each crop draws its own jitter, rotation, zoom and photometry.
        """
        cfg = self.cfg
        px, slices = jitter_bounds(cfg, n)
        return AugmentParams(
            shift_xy=rng.uniform(-px[:, None], px[:, None], size=(n, 2)),
            shift_slice=rng.integers(-slices, slices + 1, size=n),
            angle_deg=rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, size=n),
            zoom=1.0 + rng.uniform(-cfg.scale, cfg.scale, size=n),
            brightness=rng.uniform(-cfg.brightness, cfg.brightness, size=n),
            contrast=1.0 + rng.uniform(-cfg.contrast, cfg.contrast, size=n),
            gamma=np.exp(rng.uniform(-cfg.gamma, cfg.gamma, size=n)),
            flip=bool(rng.random() < cfg.flip_p),
        )

    @staticmethod
    def jitter_points(
        slices: np.ndarray, xs: np.ndarray, ys: np.ndarray, params: AugmentParams
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shift the per-target points ``(slice, x, y)`` by the drawn jitter (clamping is the crop's job)."""
        return slices + params.shift_slice, xs + params.shift_xy[:, 0], ys + params.shift_xy[:, 1]

    @staticmethod
    def photometric(crops: np.ndarray, params: AugmentParams) -> np.ndarray:
        """Brightness, contrast (around each crop's mean), gamma, clipped to [0, 1]; a new array.

        An operation whose drawn parameters are all neutral is skipped, so zero strengths return the crops
        unchanged bit for bit.
        """
        out = crops.astype(np.float32, copy=True)
        shape = (-1,) + (1,) * (crops.ndim - 1)
        if np.any(params.brightness != 0):
            out += params.brightness.astype(np.float32).reshape(shape)
        if np.any(params.contrast != 1):
            mean = out.reshape(len(out), -1).mean(axis=1).reshape(shape)
            out = (out - mean) * params.contrast.astype(np.float32).reshape(shape) + mean
        # Clip before gamma: a negative base has no real power.
        np.clip(out, 0.0, 1.0, out=out)
        if np.any(params.gamma != 1):
            np.power(out, params.gamma.astype(np.float32).reshape(shape), out=out)
        return out

    def apply(
        self, crops: np.ndarray, labels: np.ndarray, mask: np.ndarray, params: AugmentParams
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The post-crop part: photometric changes, missing targets back to zero, then the flip.

        Args:
            crops: (25 * views, slices, size, size) float32 crops cut at the jittered points.
            labels: (25,) labels (IGNORE_INDEX where empty or missing).
            mask: (25 * views,) whether each crop has a point.
            params: this item's draw.

        Returns:
            ``(crops, labels, mask)``, new arrays.
        """
        out = self.photometric(crops, params)
        out[~mask] = 0.0  # a missing crop stays all-zero whatever the brightness (the network masks it by that)
        if params.flip:
            return flip_targets(out, labels, mask)
        return out, labels.copy(), mask.copy()
