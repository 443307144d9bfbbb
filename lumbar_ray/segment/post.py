"""From a segmentation of a cached sagittal series to a localiser's detections, and to one point per target.

A segmentation localiser reports what the YOLO detector reports: per-slice detections
(:data:`~lumbar_ray.localize.levels.DETECTION_COLUMNS`), which the rules every sagittal localiser shares turn into
one point per target (:func:`~lumbar_ray.localize.levels.resolve_targets`; on Sagittal T1
:func:`~lumbar_ray.localize.study.localise_study` takes each foramen's level from the canal and its side from
patient space first). :class:`MaskLocator` is that localiser over any segmenter (a U-Net's prediction, or the
ground-truth masks). Two kinds of segmentation are read:

- anatomy, the classes of :data:`~lumbar_ray.segment.labels.SEMANTIC_CLASSES` (:func:`detections_from_masks`):

  - Sagittal T2/STIR, the canal at each disc: the discs are the 3D connected components of the disc class
    (fragments a voxel apart joined, specks dropped); the lowest five are L5/S1 upwards. On every slice of a disc,
    a line runs from the disc's in-plane centroid along the disc's own long axis (the major axis of its pixels:
    antero-posterior, tilted with the lordosis) to the canal footprint beside it, canal and canal lesions together
    (a disc bulge fills the front of the canal; with it the footprint is the canal's whole outline, so its middle
    does not move). The point is the middle of the line's run through the footprint, its confidence the run's
    length over the longest run of the volume: widest on the mid-line slice, where the slab centre then lands;
  - Sagittal T1, the foramina: the 3D components of the foramen class with the lesions that narrow it (a lesion
    goes with the canal or a foramen by what it touches on its slice, :func:`lesion_split`); each
    takes the level of the disc nearest to it in rows (without discs: its rank from the bottom on its side), and
    gives one detection per slice it covers at its in-slice centroid, confidence its area there over the largest
    area of any foramen on any slice (a speck of a predicted mask stays weak next to a foramen);

- points maps (classes 1..5 = :data:`~lumbar_ray.constants.LEVELS`, the targets drawn from label coordinates;
  :func:`detections_from_points`): per level and slice the centroid of the largest blob.

On Sagittal T1 the side of a detection is provisional, the half of the slab its slice lies in, as the detector's
(:func:`~lumbar_ray.localize.levels.provisional_target`). A volume is the cache's ``(n_slices, H, W)`` with rows
running head to feet; which side of a disc the canal lies on is read from the mask, not assumed. Pure
numpy/scipy/pandas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from lumbar_ray.constants import LEVELS
from lumbar_ray.localize.levels import DETECTION_COLUMNS, detector_targets, provisional_target, resolve_targets
from lumbar_ray.segment.labels import SEMANTIC_CLASSES, semantic

SAG_T2, SAG_T1 = "Sagittal T2/STIR", "Sagittal T1"
_CLASS = {name: index for index, name in enumerate(SEMANTIC_CLASSES)}
DISC, CANAL, FORAMEN, LESION = (_CLASS[name] for name in ("disc", "canal", "foramen", "lesion"))
_CONNECTED = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: a tilted thin disc stays one piece across slices
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True  # 8-connectivity within each slice
CANAL_CONTACT = 0.3
"""Share of a lesion piece's outline that must touch the canal for it to narrow the canal (:func:`lesion_split`)."""
MIN_COMPONENT_SHARE = 0.05
"""A component with fewer voxels than this share of its class's largest is a speck, not a structure (a sacralised
L5's remnant L5/S1 disc keeps about a third of a disc's voxels)."""
MIN_SLICE_PIXELS = 6
"""A disc's section on a slice needs this many pixels for its axis to mean anything."""
MIN_ELONGATION = 2.0
"""A disc section whose long axis is less than this many times its short one (the edge of a disc, seen across)
follows the whole disc's axis instead of its own."""
STEP = 0.25
"""Sampling step (pixels) along a disc's axis."""
BRIDGE = 1.0
"""Gaps in the canal footprint up to this long (pixels) along the axis are bridged (speckle of a predicted mask)."""
MAX_GAP = 1.0
"""The canal footprint must start within this many disc half-lengths of the disc's edge along its axis (in the
phantoms the canal lies ~2 mm behind a disc ~15 mm in half-length)."""


@dataclass(frozen=True)
class Segmentation:
    """A segmenter's output for one cached volume.

    Attributes:
        classes: ``(n_slices, H, W)`` class per pixel.
        probabilities: optional ``(n_slices, n_classes, H, W)`` class probabilities (softmax); scale the
            confidences when given.
    """

    classes: np.ndarray
    probabilities: np.ndarray | None = None


def _empty_detections() -> pd.DataFrame:
    return _typed(pd.DataFrame([], columns=list(DETECTION_COLUMNS)))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"target": "int64", "slice": "int64", "x": "float64", "y": "float64",
                         "confidence": "float64"})  # fmt: skip


def _check_volume(volume: np.ndarray, probabilities: np.ndarray | None) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise ValueError(f"expected a (n_slices, H, W) class volume, got shape {volume.shape}")
    if probabilities is not None:
        shape = np.shape(probabilities)
        if len(shape) != 4 or shape[0] != volume.shape[0] or shape[2:] != volume.shape[1:]:
            raise ValueError(f"probabilities must be (n_slices, n_classes, H, W) for {volume.shape}, got {shape}")
    return volume


def as_semantic(volume: np.ndarray) -> np.ndarray:
    """A class volume of :data:`SEMANTIC_CLASSES` from either kind of volume: one holding only class ids passes as
    it is, a label volume (:mod:`lumbar_ray.segment.labels` values) is mapped by
    :func:`~lumbar_ray.segment.labels.semantic`."""
    volume = np.asarray(volume)
    if volume.size and volume.min() >= 0 and volume.max() < len(SEMANTIC_CLASSES):
        return volume.astype(np.uint8, copy=False)
    return semantic(volume)


# ---------------------------------------------------------------------------------------------------- components


def components(mask: np.ndarray, min_share: float = MIN_COMPONENT_SHARE, join: bool = False) -> list[np.ndarray]:
    """The 3D connected components of ``mask`` (26-connectivity) without specks, as boolean volumes.

    Args:
        mask: ``(n_slices, H, W)`` boolean.
        min_share: components smaller than this share of the largest are dropped.
        join: also join components one empty voxel apart (the fragments of a thin tilted disc sampled onto a
            coarser grid).
    """
    if not mask.any():
        return []
    grouping = ndimage.binary_dilation(mask, _CONNECTED) if join else mask
    labelled, count = ndimage.label(grouping, _CONNECTED)
    labelled = np.where(mask, labelled, 0)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= max(min_share * sizes.max(), 1))
    return [labelled == index for index in keep]


def _centroid_row(component: np.ndarray) -> float:
    return float(np.nonzero(component)[1].mean())


def discs_bottom_up(classes: np.ndarray) -> list[np.ndarray]:
    """Every disc of a class volume (see :func:`components`), lowest (largest row) first: index k < 5 is
    ``LEVELS[4 - k]``, L5/S1 upwards."""
    found = components(classes == DISC, join=True)
    return sorted(found, key=_centroid_row, reverse=True)


def lesion_split(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(canal footprint, foramen footprint)``: each structure with the lesions that narrow it.

    Slice by slice, a lesion's piece (8-connected in the slice) narrows the canal when more of it touches canal
    pixels than foramen pixels on that slice, and at least :data:`CANAL_CONTACT` of its outline does; else a
    foramen. The canal is a tube along the spine, so on a slice that shows it a canal lesion (a disc bulge, a
    lateral recess) has canal behind, above and below it even where it fills the canal's whole depth; a foraminal
    lesion can fill all of its foramen's fat and touch nothing but a sliver of the canal's side. In 3D the two can
    touch (a foramen lies against the canal's side), hence pieces per slice.
    """
    canal, foramen, lesion = classes == CANAL, classes == FORAMEN, classes == LESION
    if not lesion.any():
        return canal, foramen
    labelled, count = ndimage.label(lesion, _IN_PLANE)
    near_canal = np.bincount(labelled[ndimage.binary_dilation(canal, _IN_PLANE) & lesion], minlength=count + 1)
    near_foramen = np.bincount(labelled[ndimage.binary_dilation(foramen, _IN_PLANE) & lesion], minlength=count + 1)
    edge = np.bincount(labelled[lesion & ~ndimage.binary_erosion(lesion, _IN_PLANE)], minlength=count + 1)
    owner = np.where((near_canal > near_foramen) & (near_canal >= CANAL_CONTACT * edge), 1, 2)
    owner[0] = 0
    of_voxel = owner[labelled]
    return canal | (of_voxel == 1), foramen | (of_voxel == 2)


# ----------------------------------------------------------------------------------------- the canal at each disc


@dataclass(frozen=True)
class CanalRun:
    """Where a disc's long axis crosses the canal footprint on one slice (pixels; ``length_mm`` in mm when the
    pixel size was given, else in pixels)."""

    x: float
    y: float
    start: tuple[float, float]
    end: tuple[float, float]
    length_mm: float
    direction: tuple[float, float]


def disc_axis(rows: np.ndarray, cols: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(centroid (x, y), unit major axis (x, y) in pixels, elongation)`` of a disc section's pixels.

    The axes are those of the pixels' covariance in millimetres (``scale`` = mm per pixel (x, y)); elongation is
    the ratio of the major to the minor standard deviation.
    """
    points = np.stack([cols, rows], axis=1).astype(np.float64)
    centroid = points.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(((points - centroid) * scale).T))
    major = vectors[:, 1] / scale  # back to pixels
    elongation = float(np.sqrt(values[1] / max(values[0], 1e-12)))
    return centroid, major / np.linalg.norm(major), elongation


def _runs(inside: np.ndarray, bridge: int) -> list[tuple[int, int]]:
    """``(first, last)`` sample indices of each run of True, gaps of up to ``bridge`` samples bridged."""
    index = np.flatnonzero(inside)
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) > bridge + 1)
    starts = np.concatenate([[index[0]], index[breaks + 1]])
    ends = np.concatenate([index[breaks], [index[-1]]])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def canal_run(
    footprint: np.ndarray, disc: np.ndarray, scale: np.ndarray | None = None, axis: np.ndarray | None = None
) -> CanalRun | None:
    """The run of a disc's long axis through the canal footprint on one slice, or None when the axis meets no
    footprint within :data:`MAX_GAP` disc half-lengths of the disc's edge.

    Both directions along the axis are followed from the disc's centroid; of the runs found, the longer (the canal
    lies on one side of a disc only).

    Args:
        footprint: ``(H, W)`` boolean canal footprint (canal and its lesions) of the slice.
        disc: ``(H, W)`` boolean, the disc's pixels on the slice.
        scale: mm per pixel ``(x, y)``; None = square pixels (lengths in pixels).
        axis: the major axis to use instead of this section's own (a section too round to have one).
    """
    scale = np.ones(2) if scale is None else np.asarray(scale, dtype=np.float64)
    rows, cols = np.nonzero(disc)
    centroid, major, _ = disc_axis(rows, cols, scale)
    if axis is not None:
        major = np.asarray(axis, dtype=np.float64)
    height, width = footprint.shape
    best = None
    for direction in (major, -major):
        half_length = float(np.max((np.stack([cols, rows], axis=1) - centroid) @ direction)) + 0.5
        reach = int(np.hypot(height, width) / STEP)
        t = np.arange(reach) * STEP
        xs, ys = centroid[0] + t * direction[0], centroid[1] + t * direction[1]
        ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
        valid = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
        inside = np.zeros(reach, dtype=bool)
        inside[valid] = footprint[iy[valid], ix[valid]]
        runs = [(a, b) for a, b in _runs(inside, int(BRIDGE / STEP)) if t[a] <= (1 + MAX_GAP) * half_length]
        if not runs:
            continue
        first, last = runs[0]
        middle = 0.5 * (t[first] + t[last])
        length = (t[last] - t[first] + STEP) * float(np.linalg.norm(direction * scale))
        if best is None or length > best.length_mm:
            best = CanalRun(float(centroid[0] + middle * direction[0]), float(centroid[1] + middle * direction[1]),
                            (float(xs[first]), float(ys[first])), (float(xs[last]), float(ys[last])), length,
                            (float(direction[0]), float(direction[1])))  # fmt: skip
    return best


def _mean_probability(probabilities: np.ndarray | None, slice_index: int, classes: tuple[int, ...], rows, cols):
    if probabilities is None:
        return 1.0
    values = sum(np.asarray(probabilities[slice_index, c])[rows, cols] for c in classes)
    return float(np.mean(values)) if np.size(values) else 0.0


def canal_detections(
    classes: np.ndarray, probabilities: np.ndarray | None = None, scale: np.ndarray | None = None
) -> pd.DataFrame:
    """Sagittal T2/STIR detections of the spinal canal at each of the lowest five discs (see the module docstring).

    Args:
        classes: ``(n_slices, H, W)`` :data:`SEMANTIC_CLASSES`.
        probabilities: see :class:`Segmentation`; the confidence is scaled by the footprint's mean probability
            along the run.
        scale: mm per pixel ``(x, y)`` for the disc's axis; None = square pixels.
    """
    footprint, _ = lesion_split(classes)
    targets = detector_targets(SAG_T2)
    scale = np.ones(2) if scale is None else np.asarray(scale, dtype=np.float64)
    found = []
    for rank, disc in enumerate(discs_bottom_up(classes)[: len(LEVELS)]):
        whole_axis = disc_axis(*np.nonzero(disc.any(axis=0)), scale)[1]
        for slice_index in np.flatnonzero(disc.any(axis=(1, 2))):
            section = disc[slice_index]
            if section.sum() < MIN_SLICE_PIXELS or not footprint[slice_index].any():
                continue
            round_section = disc_axis(*np.nonzero(section), scale)[2] < MIN_ELONGATION
            run = canal_run(footprint[slice_index], section, scale, whole_axis if round_section else None)
            if run is not None:
                found.append((targets[len(LEVELS) - 1 - rank], int(slice_index), run))
    if not found:
        return _empty_detections()
    longest = max(run.length_mm for *_, run in found)
    rows = []
    for target, slice_index, run in found:
        confidence = run.length_mm / longest
        if probabilities is not None:
            t = np.linspace(0.0, 1.0, 16)
            xs = np.rint(run.start[0] + t * (run.end[0] - run.start[0])).astype(int)
            ys = np.rint(run.start[1] + t * (run.end[1] - run.start[1])).astype(int)
            confidence *= _mean_probability(probabilities, slice_index, (CANAL, LESION), ys, xs)
        rows.append((target, slice_index, run.x, run.y, confidence))
    return _typed(pd.DataFrame(rows, columns=list(DETECTION_COLUMNS)))


# ------------------------------------------------------------------------------------------------------ foramina


def foramen_detections(
    classes: np.ndarray, left_first: bool = True, probabilities: np.ndarray | None = None
) -> pd.DataFrame:
    """Sagittal T1 detections of the foramina, with provisional sides (see the module docstring).

    Args:
        classes: ``(n_slices, H, W)`` :data:`SEMANTIC_CLASSES`.
        left_first: whether slice 0 lies on the patient's left.
        probabilities: see :class:`Segmentation`; the confidence is scaled by the footprint's mean probability.
    """
    _, footprint = lesion_split(classes)
    found = components(footprint)
    if not found:
        return _empty_detections()
    n_slices = classes.shape[0]
    levels = _foramen_levels(found, discs_bottom_up(classes), n_slices)
    rows = []
    largest = max(component.sum(axis=(1, 2)).max() for component in found)
    for component, level in zip(found, levels, strict=True):
        if level is None:
            continue
        areas = component.sum(axis=(1, 2))
        for slice_index in np.flatnonzero(areas):
            ys, xs = np.nonzero(component[slice_index])
            confidence = areas[slice_index] / largest
            confidence *= _mean_probability(probabilities, slice_index, (FORAMEN, LESION), ys, xs)
            target = provisional_target(SAG_T1, level, int(slice_index), n_slices, left_first)
            rows.append((target, int(slice_index), float(xs.mean()), float(ys.mean()), float(confidence)))
    return _typed(pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))) if rows else _empty_detections()


def _foramen_levels(found: list[np.ndarray], discs: list[np.ndarray], n_slices: int) -> list[int | None]:
    """The level index of each foramen component: that of the disc nearest in rows (None for a disc above the
    lowest five), or without discs its rank from the bottom among the components on its half of the slab."""
    rows = np.array([_centroid_row(component) for component in found])
    if discs:
        disc_rows = np.array([_centroid_row(disc) for disc in discs])
        nearest = np.argmin(np.abs(rows[:, None] - disc_rows[None, :]), axis=1)
        return [len(LEVELS) - 1 - int(k) if k < len(LEVELS) else None for k in nearest]
    halves = np.array([np.nonzero(component)[0].mean() > (n_slices - 1) / 2 for component in found])
    levels: list[int | None] = [None] * len(found)
    for half in (False, True):
        members = np.flatnonzero(halves == half)
        for rank, index in enumerate(members[np.argsort(-rows[members])]):
            levels[index] = len(LEVELS) - 1 - rank if rank < len(LEVELS) else None
    return levels


# -------------------------------------------------------------------------------------------------------- entry points


def detections_from_masks(
    semantic_volume: np.ndarray,
    description: str,
    left_first: bool = True,
    probabilities: np.ndarray | None = None,
    mm_per_pixel: np.ndarray | None = None,
) -> pd.DataFrame:
    """A localiser's raw detections from an anatomy segmentation of a cached sagittal series.

    Args:
        semantic_volume: ``(n_slices, H, W)`` classes of :data:`SEMANTIC_CLASSES` (or a label volume, mapped by
            :func:`as_semantic`).
        description: ``Sagittal T2/STIR`` (canal points) or ``Sagittal T1`` (foramen points).
        left_first: whether slice 0 lies on the patient's left (T1 only).
        probabilities: optional ``(n_slices, n_classes, H, W)``; scales the confidences.
        mm_per_pixel: ``(x, y)`` mm per cache pixel, for the discs' axes (T2 only); None = square pixels.

    Returns:
        :data:`~lumbar_ray.localize.levels.DETECTION_COLUMNS`, as
        :meth:`~lumbar_ray.localize.detector.SagittalDetector.detect` returns them.

    Raises:
        ValueError: for another series type or a volume of the wrong shape.
    """
    classes = as_semantic(_check_volume(semantic_volume, probabilities))
    if description == SAG_T2:
        return canal_detections(classes, probabilities, mm_per_pixel)
    if description == SAG_T1:
        return foramen_detections(classes, left_first, probabilities)
    raise ValueError(f"no sagittal targets are read on {description!r} series")


def detections_from_points(
    level_volume: np.ndarray, description: str, left_first: bool = True, probabilities: np.ndarray | None = None
) -> pd.DataFrame:
    """A localiser's raw detections from a points map (classes 1..5 = ``LEVELS``, 0 background).

    Per level and slice, the centroid of the level's largest blob (8-connectivity); its confidence is the blob's
    mean probability of the level when ``probabilities`` are given, else its area over the level's largest blob.
    On Sagittal T1 both foramina of a level share its class; their sides are provisional.

    Args:
        level_volume: ``(n_slices, H, W)`` level classes.
        description: ``Sagittal T2/STIR`` or ``Sagittal T1``.
        left_first: whether slice 0 lies on the patient's left (T1 only).
        probabilities: optional ``(n_slices, 6, H, W)``.
    """
    classes = _check_volume(level_volume, probabilities)
    detector_targets(description)  # refuses a series type without sagittal targets
    n_slices = classes.shape[0]
    rows = []
    for level in range(len(LEVELS)):
        blobs = []
        for slice_index in np.flatnonzero((classes == level + 1).any(axis=(1, 2))):
            labelled, _ = ndimage.label(classes[slice_index] == level + 1, np.ones((3, 3), dtype=bool))
            sizes = np.bincount(labelled.ravel())[1:]
            ys, xs = np.nonzero(labelled == 1 + int(np.argmax(sizes)))
            blobs.append((int(slice_index), ys, xs))
        largest = max((len(ys) for _, ys, _ in blobs), default=0)
        for slice_index, ys, xs in blobs:
            if probabilities is None:
                confidence = len(ys) / largest
            else:
                confidence = _mean_probability(probabilities, slice_index, (level + 1,), ys, xs)
            target = provisional_target(description, level, slice_index, n_slices, left_first)
            rows.append((target, slice_index, float(xs.mean()), float(ys.mean()), float(confidence)))
    return _typed(pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))) if rows else _empty_detections()


def locate_from_masks(
    semantic_volume: np.ndarray,
    description: str,
    left_first: bool = True,
    probabilities: np.ndarray | None = None,
    mm_per_pixel: np.ndarray | None = None,
) -> pd.DataFrame:
    """One point per target of ``description`` from an anatomy segmentation: :func:`detections_from_masks`
    resolved as :meth:`~lumbar_ray.localize.detector.SagittalDetector.locate` resolves a detector's boxes."""
    detections = detections_from_masks(semantic_volume, description, left_first, probabilities, mm_per_pixel)
    return resolve_targets(detections, description, np.shape(semantic_volume)[0])


TARGET_KINDS = ("anatomy", "points")


class MaskLocator:
    """A sagittal localiser over a segmenter: what :func:`~lumbar_ray.localize.study.localise_study` needs of a
    :class:`~lumbar_ray.localize.study.LevelDetector` (``detect``, ``resolve``, ``locate``), as the YOLO
    detector provides it.

    Args:
        description: the series type it localises on.
        segment: cached ``(n_slices, H, W)`` uint8 volume -> its :class:`Segmentation` (or a bare class volume).
        kind: ``anatomy`` (:data:`SEMANTIC_CLASSES`, :func:`detections_from_masks`) or ``points`` (level classes,
            :func:`detections_from_points`).
    """

    def __init__(
        self, description: str, segment: Callable[[np.ndarray], Segmentation | np.ndarray], kind: str = "anatomy"
    ) -> None:
        if kind not in TARGET_KINDS:
            raise ValueError(f"kind must be one of {TARGET_KINDS}, got {kind!r}")
        self.description = description
        self.targets = detector_targets(description)
        self.segment = segment
        self.kind = kind

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Every detection on a cached volume (see :func:`detections_from_masks`, :func:`detections_from_points`)."""
        output = self.segment(volume)
        segmentation = output if isinstance(output, Segmentation) else Segmentation(np.asarray(output))
        if segmentation.classes.shape[0] != len(volume):
            raise ValueError(f"the segmentation has {segmentation.classes.shape[0]} slices, the volume {len(volume)}")
        read = detections_from_masks if self.kind == "anatomy" else detections_from_points
        return read(segmentation.classes, self.description, left_first, segmentation.probabilities)

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        """One point per target from given detections (:func:`~lumbar_ray.localize.levels.resolve_targets`)."""
        return resolve_targets(detections, self.description, n_slices)

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Exactly one point per target of this series type, in TARGETS order."""
        return self.resolve(self.detect(volume, left_first), len(volume))


def volume_digest(volume: np.ndarray) -> str:
    """A digest of a cached volume's shape and bytes: finds a volume's known segmentation again."""
    volume = np.ascontiguousarray(volume)
    return hashlib.sha1(repr(volume.shape).encode() + volume.tobytes(), usedforsecurity=False).hexdigest()


def known_segmentations(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
    """A segmenter that returns the class volume known for each cached volume (ground-truth masks through the
    localiser's post-processing, without a network).

    Args:
        pairs: ``(cached uint8 volume, its class volume)``.

    Returns:
        volume -> its class volume; a volume not given raises ``KeyError``.
    """
    known = {volume_digest(volume): np.asarray(classes) for volume, classes in pairs}

    def segment(volume: np.ndarray) -> np.ndarray:
        return known[volume_digest(volume)]

    return segment
