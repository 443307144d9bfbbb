"""The segmentation U-Net's training samples, from the cache: pure numpy and cv2, no Ray.

A **series target** (:class:`SeriesTarget`) is one sagittal series on the cache grid: its cached volume
(uint8, ``n x S x S``) and a class volume of the same shape, whose classes depend on the source
(:func:`classes_for`):

- ``masks`` (and ``spider``): the :data:`~lumbar_ray.segment.labels.SEMANTIC_CLASSES` of an anatomy mask
  (background, vertebra, disc, canal, foramen, lesion), one model for both sagittal series types;
- ``points``: :data:`POINT_CLASSES`, maps drawn around the label points (the only targets RSNA's data has):
  0 background, 1..5 the spinal canal at L1/L2..L5/S1 on a Sagittal T2/STIR, 6..10 the foramina of those levels on
  a Sagittal T1 (both sides of a level share its class; :func:`offset_point_classes`), one model for both types.

A **sample** is one slice of a series target resized to the U-Net's input: the slice and its neighbours as
channels (:func:`slab`: ``in_slices`` slices centred on it, indices clamped at the volume's edges, each resized
with area averaging when shrinking, bilinear when growing, pixel-centre aligned as the cache itself is), and the
class map of the slice resized with nearest-neighbour (``cv2.INTER_NEAREST_EXACT``, pixel-centre aligned).
Training keeps every slice with foreground and a seeded ``empty_fraction`` of the others
(:func:`select_slices`); validation keeps every slice, so Dice is measured on whole series. Samples stay uint8
(``x / 255`` is the network's input, :func:`lumbar_ray.segment.unet.slab_inputs`), so a few thousand fit in
memory and in Ray's object store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lumbar_ray.config import SegmentConfig
from lumbar_ray.constants import CONDITION_SERIES, CONDITIONS, LEVELS, TARGETS
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.data.volume import intensity_window, resize_slice, to_uint8
from lumbar_ray.segment.labels import SEMANTIC_CLASSES, semantic
from lumbar_ray.segment.masks import dataset_masks, point_maps, resize_labels
from lumbar_ray.segment.spider import SpiderCase, read_spider

POINT_CLASSES: tuple[str, ...] = (
    "background",
    *(f"canal_{level}" for level in LEVELS),
    *(f"foramen_{level}" for level in LEVELS),
)
"""The classes of ``source=points``: background, the canal per level (Sagittal T2/STIR), the foramina per level
(Sagittal T1)."""

POINT_CLASS_OFFSET: dict[str, int] = {"Sagittal T2/STIR": 0, "Sagittal T1": len(LEVELS)}
"""What a series type's level maps (1..5 = :data:`LEVELS` order) are shifted by in :data:`POINT_CLASSES`."""


def classes_for(source: str) -> tuple[str, ...]:
    """The class names (in class-id order) a U-Net trained on ``source`` predicts.

    Raises:
        ValueError: on an unknown source.
    """
    if source in ("masks", "spider"):
        return SEMANTIC_CLASSES
    if source == "points":
        return POINT_CLASSES
    raise ValueError(f"unknown segmentation source {source!r}; expected masks, points or spider")


def offset_point_classes(level_map: np.ndarray, description: str) -> np.ndarray:
    """A series' level map (0 background, 1..5 levels) in :data:`POINT_CLASSES` (a Sagittal T1's shifted by 5).

    Raises:
        KeyError: for a series type that has no level maps (axial).
    """
    level_map = np.asarray(level_map, dtype=np.uint8)
    return np.where(level_map > 0, level_map + POINT_CLASS_OFFSET[description], 0).astype(np.uint8)


def level_classes(point_classes: np.ndarray, description: str) -> np.ndarray:
    """The inverse of :func:`offset_point_classes` for one series type: a :data:`POINT_CLASSES` map (a U-Net's
    argmax) as that type's level map (0 background, 1..5 levels), the other type's classes made background; what
    :func:`lumbar_ray.segment.post.detections_from_points` reads."""
    offset = POINT_CLASS_OFFSET[description]
    point_classes = np.asarray(point_classes)
    own = (point_classes > offset) & (point_classes <= offset + len(LEVELS))
    return np.where(own, point_classes - offset, 0).astype(np.uint8)


@dataclass
class SeriesTarget:
    """One sagittal series on the cache grid: its volume and its class volume (both ``n x S x S`` uint8)."""

    study_id: int
    series_id: int
    description: str
    volume: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        if self.volume.shape != self.target.shape:
            raise ValueError(f"series {self.series_id}: volume {self.volume.shape} and target "
                             f"{self.target.shape} differ")  # fmt: skip


@dataclass
class SegmentSamples:
    """2.5D samples of some series targets at the U-Net's input size.

    Attributes:
        inputs: ``(N, in_slices, size, size)`` uint8: each sample's slab (:func:`slab`).
        targets: ``(N, size, size)`` uint8: its class map.
        series: ``(N,)`` int: the index of its series in ``keys``.
        slices: ``(N,)`` int: its slice in that series' volume.
        keys: ``(study_id, series_id)`` of each series, in the order of the targets given.
    """

    inputs: np.ndarray
    targets: np.ndarray
    series: np.ndarray
    slices: np.ndarray
    keys: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.targets)

    def class_counts(self, n_classes: int) -> np.ndarray:
        """Pixels per class over every sample."""
        return np.bincount(self.targets.ravel(), minlength=n_classes)


def slab_indices(n_slices: int, index: int, in_slices: int) -> np.ndarray:
    """The ``in_slices`` slice indices centred on ``index``, clamped to ``0..n_slices-1`` (an edge slice repeats)."""
    half = in_slices // 2
    return np.clip(np.arange(index - half, index + half + 1), 0, n_slices - 1)


def slab(volume: np.ndarray, index: int, in_slices: int, size: int) -> np.ndarray:
    """``(in_slices, size, size)`` uint8: slice ``index`` of ``volume`` and its neighbours, each resized."""
    return np.stack([resize_slice(np.asarray(volume[i]), size) for i in slab_indices(len(volume), index, in_slices)])


def select_slices(target: np.ndarray, empty_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The slices of a class volume a training set keeps: every slice with foreground, and ``empty_fraction`` of
    the others (rounded; drawn with ``rng``), in slice order."""
    has_foreground = target.reshape(len(target), -1).any(axis=1)
    empty = np.flatnonzero(~has_foreground)
    kept_empty = rng.choice(empty, size=round(empty_fraction * len(empty)), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(has_foreground), kept_empty])).astype(np.int64)


def series_rng(seed: int, study_id: int, series_id: int) -> np.random.Generator:
    """A generator of one series' own (the same whatever other series are sampled with it, in whatever order)."""
    return np.random.default_rng([int(seed), int(study_id), int(series_id)])


def build_samples(targets: Sequence[SeriesTarget], cfg: SegmentConfig, every_slice: bool = False) -> SegmentSamples:
    """The 2.5D samples of ``targets`` at ``cfg.image_size``.

    Args:
        targets: series targets on the cache grid.
        cfg: ``image_size``, ``in_slices``, ``empty_fraction`` and ``seed``.
        every_slice: keep every slice (validation) instead of :func:`select_slices` (training).
    """
    size, inputs, maps, series, slices = cfg.image_size, [], [], [], []
    for position, item in enumerate(targets):
        if every_slice:
            chosen = np.arange(len(item.target))
        else:
            chosen = select_slices(item.target, cfg.empty_fraction, series_rng(cfg.seed, item.study_id,
                                                                               item.series_id))  # fmt: skip
        for index in chosen:
            inputs.append(slab(item.volume, int(index), cfg.in_slices, size))
            maps.append(resize_labels(item.target[index], size))
        series += [position] * len(chosen)
        slices += [int(i) for i in chosen]
    return SegmentSamples(
        inputs=np.stack(inputs) if inputs else np.zeros((0, cfg.in_slices, size, size), np.uint8),
        targets=np.stack(maps) if maps else np.zeros((0, size, size), np.uint8),
        series=np.asarray(series, dtype=np.int64),
        slices=np.asarray(slices, dtype=np.int64),
        keys=[(int(t.study_id), int(t.series_id)) for t in targets],
    )


SAGITTAL_TYPES: tuple[str, ...] = ("Sagittal T2/STIR", "Sagittal T1")
"""The series types a U-Net segments (one model for both)."""


def sagittal_series(series: pd.DataFrame, study_ids: Iterable[int], cached: set[tuple[int, int]]) -> pd.DataFrame:
    """The cached sagittal series of ``study_ids`` (``study_id``, ``series_id``, ``series_description``), sorted."""
    wanted = {int(s) for s in study_ids}
    frame = series[series["series_description"].isin(SAGITTAL_TYPES)
                   & series["study_id"].astype(int).isin(wanted)]  # fmt: skip
    keep = [(int(a), int(b)) in cached for a, b in zip(frame["study_id"], frame["series_id"], strict=True)]
    frame = frame[keep].astype({"study_id": "int64", "series_id": "int64"})
    return frame.sort_values(["study_id", "series_id"]).reset_index(drop=True)[
        ["study_id", "series_id", "series_description"]
    ]


def point_target(points: pd.DataFrame, description: str, n_slices: int, size: int, radius_px: float) -> np.ndarray:
    """A series' :data:`POINT_CLASSES` volume from its POINTS rows (cache pixels): a disc of ``radius_px`` around
    each point of a condition read on ``description`` (the canal on a Sagittal T2/STIR, both foramina on a
    Sagittal T1), its class the level's, shifted for the series type (:func:`offset_point_classes`)."""
    conditions = [c for c in CONDITIONS if CONDITION_SERIES[c] == description]
    targets = [TARGETS.index(f"{condition}_{level}") for condition in conditions for level in LEVELS]
    rows = points[points["target"].isin(targets)]
    levels = rows["target"].to_numpy() % len(LEVELS)
    table = np.column_stack([rows["slice"].to_numpy(), rows["x"].to_numpy(), rows["y"].to_numpy(), levels])
    return offset_point_classes(point_maps(table, n_slices, size, radius_px), description)


def series_targets(cache: SeriesCache, series: pd.DataFrame, cfg: SegmentConfig, data_root: str | Path | None = None,
                   points: pd.DataFrame | None = None) -> list[SeriesTarget]:  # fmt: skip
    """The series targets of ``series`` (rows of :func:`sagittal_series`) on the cache grid.

    Args:
        cache: the cache the volumes are read from.
        series: the series to read.
        cfg: ``source`` and ``radius_px``.
        data_root: the RSNA-format folder holding the masks (``source=masks``).
        points: the label points in cache pixels, a POINTS frame (``source=points``); a series without a point of
            its type is left out (an empty map would teach the U-Net that its structures are background).

    Raises:
        FileNotFoundError: ``source=masks`` and a series has no mask file.
        ValueError: ``source`` is neither masks nor points (SPIDER has its own reader).
    """
    if cfg.source not in ("masks", "points"):
        raise ValueError(f"series targets are read from the cache for source masks or points, not {cfg.source!r}")
    out = []
    for row in series.itertuples(index=False):
        entry = cache.read(int(row.study_id), int(row.series_id))
        if cfg.source == "masks":
            target = semantic(dataset_masks(data_root, entry))
        else:
            own = points[(points["study_id"] == row.study_id) & (points["series_id"] == row.series_id)]
            n_slices, size = entry.volume.shape[:2]
            target = point_target(own, row.series_description, n_slices, size, cfg.radius_px)
            if not target.any():
                continue
        out.append(SeriesTarget(int(row.study_id), int(row.series_id), str(row.series_description),
                                np.asarray(entry.volume), target))  # fmt: skip
    return out


SPIDER_TYPES: dict[str, str] = {"t1": "Sagittal T1", "t2": "Sagittal T2/STIR"}
"""A SPIDER sequence (the name's suffix; ``t2_SPACE`` is a T2) -> the series type it stands for."""


@dataclass(frozen=True)
class SpiderFile:
    """One SPIDER image with its mask: ``images/<patient>_<sequence>.mha`` and ``masks/<same name>``."""

    name: str
    patient: str
    description: str
    image: Path
    mask: Path


def spider_files(folder: str | Path) -> list[SpiderFile]:
    """The images of a SPIDER folder that have a mask, of a sagittal T1 or T2 sequence, sorted by name.

    Raises:
        FileNotFoundError: if the folder lacks ``images/`` or ``masks/``.
    """
    folder = Path(folder)
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise FileNotFoundError(f"{folder} is not a SPIDER folder: it needs images/ and masks/")
    found = []
    for image in sorted((folder / "images").glob("*.mha")):
        name = image.name.removesuffix(".mha")
        patient, _, sequence = name.partition("_")
        description = SPIDER_TYPES.get(sequence.lower()[:2])
        mask = folder / "masks" / image.name
        if description is not None and mask.is_file():
            found.append(SpiderFile(name, patient, description, image, mask))
    return found


def spider_held_out(patients: Iterable[str], n_folds: int, seed: int, val_fold: int) -> set[str]:
    """The patients of fold ``val_fold`` when SPIDER's patients are dealt into ``n_folds`` seeded folds (SPIDER has
    no labels to stratify on): every scan of a patient on the same side."""
    ordered = sorted(set(patients))
    dealt = np.random.default_rng(seed).permutation(len(ordered)) % n_folds
    return {patient for patient, fold in zip(ordered, dealt, strict=True) if fold == val_fold}


def spider_target(case: SpiderCase, number: int, description: str, size: int,
                  clip_percentiles: tuple[float, float]) -> SeriesTarget:  # fmt: skip
    """A SPIDER case as a series target on a cache-like grid: each slice resized to ``size x size`` and windowed to
    uint8 as the cache does (the case's ``clip_percentiles``), its mask's :func:`semantic` classes resized nearest.

    Args:
        case: read by :func:`~lumbar_ray.segment.spider.read_spider` (the sagittal layout), with its mask.
        number: the target's id (``study_id`` and ``series_id``): SPIDER has none of the RSNA kind.
        description: its series type.
        size: the cache's in-plane size.
        clip_percentiles: the cache's intensity window.
    """
    low, high = intensity_window(case.image, clip_percentiles)
    volume = to_uint8(np.stack([resize_slice(image, size) for image in case.image]), low, high)
    target = np.stack([resize_labels(classes, size) for classes in semantic(case.labels)])
    return SeriesTarget(number, number, description, volume, target)


def spider_targets(files: Sequence[SpiderFile], size: int, clip_percentiles: tuple[float, float],
                   numbers: Sequence[int]) -> list[SeriesTarget]:  # fmt: skip
    """The series targets of SPIDER files (:func:`spider_target`), each numbered by ``numbers``."""
    return [spider_target(read_spider(f.image, f.mask), int(n), f.description, size, clip_percentiles)
            for f, n in zip(files, numbers, strict=True)]  # fmt: skip
