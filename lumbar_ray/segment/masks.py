"""Segmentation targets on the cache grid: label volumes read from a dataset, and maps drawn from label points.

A dataset with masks (the synthetic one with ``synth.masks``) holds one label volume per sagittal series on the
series' own DICOM grid (:func:`~lumbar_ray.segment.labels.mask_file`). :func:`cache_masks` puts it on the grid of
the series' cache entry: slices matched by InstanceNumber (the cache orders slices along their normal, the file in
its own order) and each resized with ``cv2.INTER_NEAREST_EXACT``, whose pixel-centre rule is the cache's own,
``x_cache = (x + 0.5) * scale - 0.5``, so a mask pixel lands where the image pixel under it landed.

Data without masks (the real RSNA set) gets :func:`point_maps` instead: a disc around each labelled point on its
slice, its class the level's (1 = L1/L2 ... 5 = L5/S1, in :data:`~lumbar_ray.constants.LEVELS` order + 1).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from lumbar_ray.constants import LEVEL_TITLES, LEVELS
from lumbar_ray.data.cache import CachedSeries
from lumbar_ray.segment.labels import mask_file

POINT_MAP_CLASSES: tuple[str, ...] = ("background", *LEVELS)
"""The classes of :func:`point_maps`: 0 background, then the five levels in :data:`LEVELS` order."""


def read_series_labels(root: str | Path, split: str, study_id: int, series_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One series' label volume as the dataset stores it.

    Args:
        root: the RSNA-format folder (its ``segmentation/`` holds the masks).
        split: ``train`` or ``test``.
        study_id: the study.
        series_id: the (sagittal) series.

    Returns:
        ``(labels, instance_number)``: int16 ``(n_slices, rows, cols)`` on the DICOM grid, and the InstanceNumber
        of each of its slices, int64 ``(n_slices,)``.

    Raises:
        FileNotFoundError: if the series has no mask file (the dataset was written without masks, or the series is
            not sagittal).
        ValueError: if the file lacks an array or its arrays disagree.
    """
    path = mask_file(root, split, study_id, series_id)
    if not path.is_file():
        raise FileNotFoundError(f"no label volume for study {study_id} series {series_id}: {path} does not exist")
    with np.load(path) as npz:
        missing = {"labels", "instance_number"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: lacks {sorted(missing)}")
        labels, numbers = npz["labels"].astype(np.int16, copy=False), npz["instance_number"].astype(np.int64)
    if labels.ndim != 3 or numbers.shape != (labels.shape[0],):
        raise ValueError(f"{path}: labels {labels.shape} and instance_number {numbers.shape} disagree")
    return labels, numbers


def cache_masks(labels: np.ndarray, instance_number: np.ndarray, entry: CachedSeries) -> np.ndarray:
    """A series' label volume on its cache entry's grid, int16 ``(n_slices, size, size)`` in the cache's slice order.

    Args:
        labels: ``(n, rows, cols)`` on the DICOM grid (:func:`read_series_labels`).
        instance_number: the InstanceNumber of each slice of ``labels``.
        entry: the series' cache entry.

    Raises:
        ValueError: if a cached slice has no mask (or several), or a mask's shape is not its instance's.
    """
    where = _slice_of_number(np.asarray(instance_number), entry)
    size = entry.meta.size
    out = np.empty((len(entry.instance_numbers), size, size), dtype=np.int16)
    for index, number in enumerate(entry.instance_numbers):
        if number not in where:
            raise ValueError(f"{_name(entry)}: instance {number} (cache slice {index}) has no mask")
        mask = labels[where[number]]
        if tuple(mask.shape) != tuple(entry.meta.slices.original_shape[index]):
            raise ValueError(
                f"{_name(entry)}: the mask of instance {number} is {mask.shape}, "
                f"the image {tuple(entry.meta.slices.original_shape[index])}"
            )
        out[index] = resize_labels(mask, size)
    return out


def resize_labels(mask: np.ndarray, size: int) -> np.ndarray:
    """One label slice resized to ``size x size``, nearest pixel centre (no value is ever made up)."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def _slice_of_number(numbers: np.ndarray, entry: CachedSeries) -> dict[int, int]:
    """InstanceNumber -> index in the mask file (a repeated number cannot be matched)."""
    values, counts = np.unique(numbers, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{_name(entry)}: instance numbers {values[counts > 1].tolist()} repeat in the mask file")
    return {int(number): index for index, number in enumerate(numbers)}


def _name(entry: CachedSeries) -> str:
    return f"study {entry.meta.study_id} series {entry.meta.series_id}"


def dataset_masks(root: str | Path, entry: CachedSeries) -> np.ndarray:
    """The label volume of a cache entry's series on the cache grid (its ids and split name the file)."""
    meta = entry.meta
    labels, numbers = read_series_labels(root, meta.split, meta.study_id, meta.series_id)
    return cache_masks(labels, numbers, entry)


def point_maps(points: np.ndarray, n_slices: int, size: int, radius_px: float) -> np.ndarray:
    """Maps of labelled points: a disc of class ``level + 1`` around each point on its slice, uint8.

    Args:
        points: ``(n, 4)`` rows of ``slice, x, y, level`` with x, y in cache pixels (pixel centres) and ``level``
            the index in :data:`LEVELS` (0 = L1/L2); a later row paints over an earlier one where discs overlap.
        n_slices: slices of the volume.
        size: its in-plane size.
        radius_px: the discs' radius in cache pixels.

    Returns:
        ``(n_slices, size, size)`` of :data:`POINT_MAP_CLASSES` ids.

    Raises:
        ValueError: on a slice outside the volume or an unknown level.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((n_slices, size, size), dtype=np.uint8)
    grid_y, grid_x = np.mgrid[0:size, 0:size]
    for slice_index, x, y, level in points:
        if not (0 <= slice_index < n_slices and slice_index == int(slice_index)):
            raise ValueError(f"point on slice {slice_index}: the volume has slices 0..{n_slices - 1}")
        if not 0 <= level < len(LEVELS) or level != int(level):
            raise ValueError(f"point of level {level}: levels are 0..{len(LEVELS) - 1} ({LEVELS})")
        disc = (grid_x - x) ** 2 + (grid_y - y) ** 2 <= radius_px**2
        out[int(slice_index)][disc] = int(level) + 1
    return out


def series_points(coordinates: pd.DataFrame, entry: CachedSeries) -> np.ndarray:
    """Rows of ``train_label_coordinates.csv`` of one series as :func:`point_maps`' points on its cache grid.

    Args:
        coordinates: rows with ``instance_number``, ``x``, ``y`` (original pixels) and ``level`` (``L1/L2`` as in
            the file, or ``l1_l2``), all of the series of ``entry``.
        entry: the series' cache entry.

    Raises:
        KeyError: on an instance the series lacks, or an unknown level.
    """
    by_title = {title: index for index, title in enumerate(LEVEL_TITLES[level] for level in LEVELS)}
    by_name = {level: index for index, level in enumerate(LEVELS)}
    rows = []
    for row in coordinates.itertuples():
        level = by_title.get(row.level, by_name.get(row.level))
        if level is None:
            raise KeyError(f"unknown level {row.level!r}; expected one of {list(by_title)}")
        index, x, y = entry.original_to_cache(int(row.instance_number), float(row.x), float(row.y))
        rows.append((index, x, y, level))
    return np.array(rows, dtype=np.float64).reshape(-1, 4)
