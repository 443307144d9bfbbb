"""Measurements a radiologist reads, in millimetres per level, from a segmentation of a cached sagittal series.

Per level (:data:`~lumbar_ray.constants.LEVELS`), at the study's points (located or labelled) on the series:

- ``canal_ap_mm``: the antero-posterior diameter of the canal's lumen (the canal class alone: what a disc bulge
  leaves of it) along the disc's own long axis through the canal, on the slice of the level's spinal canal point
  (Sagittal T2/STIR: the mid-line). The line is the localiser's (:func:`~lumbar_ray.segment.post.canal_run`, from
  the disc's centroid through the canal and the lesions inside it); the lumen is the part of it on canal pixels;
- ``disc_height_mm``: the disc's mean height on that slice, its area over its length along its long axis (for a
  disc of even height its extent along its short axis, without the pixel-quantisation of an extent);
- ``foramen_left_mm2``, ``foramen_right_mm2``: the area of a foramen's fat (the foramen class alone: what the lesion
  narrowing it leaves) on the slice where the foramen, lesion included, is largest (Sagittal T1; the foramen is
  the component at the level's foramen point, or a slice beside it).

A measurement the series cannot give (no point of its level, nothing segmented there) is NaN: a Sagittal T2 gives
the canal and the discs, a Sagittal T1 the foramina (:func:`measure_study` takes each from its series).
Millimetres through each slice's own pixel size (:meth:`~lumbar_ray.data.cache.CachedSeries.mm_per_pixel`). Pure
numpy/scipy/pandas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy import ndimage

from lumbar_ray.constants import LEVELS, target_index
from lumbar_ray.data.cache import CachedSeries
from lumbar_ray.localize.geometry import best_sagittal
from lumbar_ray.localize.study import StudyPoints
from lumbar_ray.segment.post import (
    CANAL,
    DISC,
    FORAMEN,
    SAG_T1,
    SAG_T2,
    STEP,
    as_semantic,
    canal_run,
    disc_axis,
    lesion_split,
)

MEASURE_COLUMNS = ("level", "canal_ap_mm", "disc_height_mm", "foramen_left_mm2", "foramen_right_mm2")
SIDES = ("left", "right")
_IN_SLICE = np.ones((3, 3), dtype=bool)
_CONNECTED = np.ones((3, 3, 3), dtype=bool)
MAX_POINT_DISTANCE_PX = 3.0
"""A foramen component counts as the point's when it lies this close to the point on the point's slice."""


def _point(points: pd.DataFrame, target: int) -> tuple[int, float, float] | None:
    rows = points[points["target"] == target]
    if rows.empty or not np.isfinite(rows[["slice", "x", "y"]].to_numpy(dtype=np.float64)).all():
        return None
    row = rows.iloc[0]
    return int(row["slice"]), float(row["x"]), float(row["y"])


def level_disc(classes: np.ndarray, slice_index: int, y: float) -> np.ndarray | None:
    """The disc of the level whose canal point lies at row ``y`` on a slice: of the slice's discs (8-connected
    pieces), the one whose centroid row is nearest (adjacent discs lie a whole level apart in rows)."""
    labelled, count = ndimage.label(classes[slice_index] == DISC, _IN_SLICE)
    if not count:
        return None
    rows = ndimage.mean(np.indices(labelled.shape)[0], labelled, range(1, count + 1))
    return labelled == 1 + int(np.argmin(np.abs(np.asarray(rows) - y)))


def canal_and_disc(classes: np.ndarray, entry: CachedSeries, slice_index: int, y: float) -> tuple[float, float]:
    """``(canal AP diameter, disc height)`` in mm at one level (see the module docstring); NaN where unmeasurable.

    Args:
        classes: ``(n_slices, H, W)`` :data:`SEMANTIC_CLASSES`.
        entry: the cached series (pixel sizes).
        slice_index: the slice of the level's spinal canal point.
        y: the point's row.
    """
    disc = level_disc(classes, slice_index, y)
    if disc is None or disc.sum() < 3:
        return np.nan, np.nan
    scale = entry.mm_per_pixel(slice_index)
    height = disc_height(disc, scale)
    footprint, _ = lesion_split(classes[slice_index][None])
    run = canal_run(footprint[0], disc, scale)
    if run is None:
        return np.nan, height
    start, end = np.asarray(run.start), np.asarray(run.end)
    samples = int(np.rint(np.linalg.norm(end - start) / STEP)) + 1
    along = start + np.linspace(0.0, 1.0, samples)[:, None] * (end - start)
    ix, iy = np.rint(along).astype(int).T
    lumen = classes[slice_index][iy, ix] == CANAL
    return float(run.length_mm * lumen.mean()), height


def disc_height(disc: np.ndarray, scale: np.ndarray) -> float:
    """Mean height (mm) of a disc's section: its area over its length along its long axis.

    Args:
        disc: ``(H, W)`` boolean, the disc's pixels.
        scale: mm per pixel ``(x, y)``.
    """
    rows, cols = np.nonzero(disc)
    scale = np.asarray(scale, dtype=np.float64)
    _, major, _ = disc_axis(rows, cols, scale)
    unit = major * scale / np.linalg.norm(major * scale)  # the long axis in mm
    along = (np.stack([cols, rows], axis=1) * scale) @ unit
    length = np.ptp(along) + abs(unit[0]) * scale[0] + abs(unit[1]) * scale[1]  # a pixel's own width along it
    return float(len(rows) * scale[0] * scale[1] / length)


def foramen_area(classes: np.ndarray, entry: CachedSeries, point: tuple[int, float, float]) -> float:
    """Area (mm²) of a foramen's fat on the slice where the foramen (lesion included) is largest; NaN when no
    foramen lies at the point (on its slice, else on a neighbouring one: annotators sometimes mark a foramen a slice
    off).

    Args:
        classes: ``(n_slices, H, W)`` :data:`SEMANTIC_CLASSES`.
        entry: the cached series (pixel sizes).
        point: ``(slice, x, y)`` of the level's foramen point.
    """
    slice_index, x, y = point
    _, footprint = lesion_split(classes)
    labelled, _ = ndimage.label(footprint, _CONNECTED)
    component = None
    for index in (slice_index, slice_index - 1, slice_index + 1):  # a point marked a slice off its foramen
        if not 0 <= index < len(classes):
            continue
        rows, cols = np.nonzero(labelled[index])
        if len(rows) and np.hypot(cols - x, rows - y).min() <= MAX_POINT_DISTANCE_PX:
            nearest = int(np.argmin(np.hypot(cols - x, rows - y)))
            component = labelled == labelled[index, rows[nearest], cols[nearest]]
            break
    if component is None:
        return np.nan
    largest = int(np.argmax(component.sum(axis=(1, 2))))
    mm_x, mm_y = entry.mm_per_pixel(largest)
    return float((component[largest] & (classes[largest] == FORAMEN)).sum() * mm_x * mm_y)


def measure_levels(volume: np.ndarray, entry: CachedSeries, points: pd.DataFrame) -> pd.DataFrame:
    """The measurements of one sagittal series at the study's points, one row per level in LEVELS order.

    Args:
        volume: ``(n_slices, H, W)`` on the cache grid of ``entry``: a label volume or :data:`SEMANTIC_CLASSES`.
        entry: the cached series.
        points: the study's points (``target``, ``slice``, ``x``, ``y``, and ``series_id`` when they span several
            series: only this series' are used).

    Returns:
        :data:`MEASURE_COLUMNS`; NaN where this series gives no measurement.
    """
    classes = as_semantic(volume)
    if classes.shape != tuple(entry.volume.shape) and entry.volume.size:
        raise ValueError(f"the volume is {classes.shape}, the cached series {entry.volume.shape}")
    if "series_id" in points:
        points = points[points["series_id"] == int(entry.meta.series_id)]
    rows = []
    for level in LEVELS:
        canal_ap, height = np.nan, np.nan
        spinal = _point(points, target_index("spinal_canal_stenosis", level))
        if spinal is not None:
            canal_ap, height = canal_and_disc(classes, entry, spinal[0], spinal[2])
        areas = {}
        for side in SIDES:
            foramen = _point(points, target_index(f"{side}_neural_foraminal_narrowing", level))
            areas[side] = np.nan if foramen is None else foramen_area(classes, entry, foramen)
        rows.append((level, canal_ap, height, areas["left"], areas["right"]))
    return pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))


def measure_study(series: Iterable[tuple[np.ndarray, CachedSeries]], points: pd.DataFrame) -> pd.DataFrame:
    """A study's measurements from its segmented sagittal series: per level and column, the first series (in the
    order given: Sagittal T2/STIR first) that measures it.

    Args:
        series: ``(volume, cached series)`` pairs (see :func:`measure_levels`).
        points: the study's points over all its series.
    """
    out = pd.DataFrame({"level": list(LEVELS)}).assign(**{column: np.nan for column in MEASURE_COLUMNS[1:]})
    for volume, entry in series:
        out = out.fillna(measure_levels(volume, entry, points))
    return out


def with_measurements(located: StudyPoints, series: dict[str, list[CachedSeries]], detectors: dict) -> StudyPoints:
    """A localised study with the measurements of the localisers that segment the anatomy (a
    :class:`~lumbar_ray.segment.post.MaskLocator` of kind ``anatomy``), on the sagittal series they localised on
    (:func:`~lumbar_ray.localize.geometry.best_sagittal`); the study unchanged when none segments.

    Args:
        located: :func:`~lumbar_ray.localize.study.localise_study`'s result.
        series: the series it was given (loaded sagittal volumes).
        detectors: the localisers it was given.
    """
    pairs = []
    for description in (SAG_T2, SAG_T1):
        detector, entries = detectors.get(description), series.get(description)
        if not entries or not hasattr(detector, "segmentation_of") or getattr(detector, "kind", "") != "anatomy":
            continue  # a points U-Net's blobs mark levels, not anatomy: nothing to measure
        entry = best_sagittal(entries)
        pairs.append((detector.segmentation_of(entry.volume).classes, entry))
    if not pairs:
        return located
    return replace(located, measurements=measure_study(pairs, located.points))


def measurements_table(reports: Iterable[dict]) -> pd.DataFrame:
    """One row per study and level (``study_id``, :data:`MEASURE_COLUMNS`) of per-study reports
    (:meth:`~lumbar_ray.localize.study.StudyPoints.to_json`) that carry measurements; empty when none does."""
    rows = [{"study_id": report["study_id"], "level": level, **values}
            for report in reports for level, values in (report.get("measurements") or {}).items()]  # fmt: skip
    return pd.DataFrame(rows, columns=["study_id", *MEASURE_COLUMNS]).astype({c: float for c in MEASURE_COLUMNS[1:]})
