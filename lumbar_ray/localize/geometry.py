"""Patient-space geometry between series of one study, from the DICOM tags kept in the cache.

A point on a sagittal slice (cache pixels) is mapped to patient coordinates (mm) with that slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; each level's Axial T2 slice is then the one,
across every axial series and stack of the study, whose plane lies nearest to the point (that lies inside its
field of view), and the point's projection gives its in-plane position there. Pure numpy: no Ray, no file read.

The DICOM pixel <-> patient rule itself lives in :func:`lumbar_ray.data.dicom.pixel_to_patient` and its inverse
:func:`lumbar_ray.data.dicom.patient_to_pixel`; the cache <-> original pixel rule in
:class:`lumbar_ray.data.cache.CachedSeries`. This module only applies them to the slices of cached series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumbar_ray.data.cache import CachedSeries, SeriesMeta
from lumbar_ray.data.dicom import patient_to_pixel, pixel_to_patient


def _slice_frame(series: CachedSeries, index: int) -> tuple[Sequence[float], Sequence[float], Sequence[float]]:
    """ImagePositionPatient, ImageOrientationPatient and PixelSpacing of slice ``index``, as cached."""
    slices = series.meta.slices
    return slices.position[index], slices.orientation[index], slices.pixel_spacing[index]


def left_first(meta: SeriesMeta) -> bool:
    """Whether slice 0 of a cached sagittal series lies on the patient's left (True when unknown).

    The cache orders slices along the normal ``row x column`` of the stack; patient left is +x in DICOM's LPS
    frame, so a normal pointing to -x (the usual sagittal orientation) starts on the left.
    """
    normal = meta.stacks[0].normal if meta.stacks else None
    return True if normal is None else bool(normal[0] <= 0)


def cache_point_to_patient(series: CachedSeries, index: int, x: float, y: float) -> np.ndarray:
    """Patient coordinates (mm) of the cache point ``(x, y)`` on slice ``index`` of ``series``."""
    _, column, row = series.cache_to_original(index, x, y)
    return pixel_to_patient(*_slice_frame(series, index), column, row)


def plane_distance(series: CachedSeries, index: int, point: np.ndarray) -> float:
    """Distance (mm) from a patient-space ``point`` to the plane of slice ``index`` of ``series``."""
    return abs(patient_to_pixel(*_slice_frame(series, index), point)[2])


def mm_per_cache_pixel(series: CachedSeries, index: int) -> np.ndarray:
    """``(x, y)`` millimetres per cache pixel on slice ``index``: its PixelSpacing over the cache's resize."""
    row_spacing, col_spacing = (float(v) for v in series.meta.slices.pixel_spacing[index])
    scale_y, scale_x = series.scale[index]
    return np.array([col_spacing / scale_x, row_spacing / scale_y])


@dataclass(frozen=True)
class AxialHit:
    """Where a patient-space point falls among a study's axial slices.

    Attributes:
        series_position: index of the series in the list searched.
        slice_index: slice of that series (cache order).
        instance_number: its InstanceNumber.
        distance_mm: distance from the point to the slice's plane.
        x: in-plane column of the projected point, cache pixels.
        y: in-plane row, cache pixels.
        inside: whether the projection lies inside the slice's field of view.
    """

    series_position: int
    slice_index: int
    instance_number: int
    distance_mm: float
    x: float
    y: float
    inside: bool


def nearest_axial_slice(point: np.ndarray, axial_series: list[CachedSeries]) -> AxialHit:
    """The axial slice (over every series and stack given) whose plane is nearest to ``point``.

    Slices whose field of view contains the projected point win over those that do not (a tilted block for another
    level can pass close to the point far outside its own image); among those, the nearest plane.

    Raises:
        ValueError: if ``axial_series`` is empty.
    """
    if not axial_series:
        raise ValueError("no axial series to assign the point to")
    best: tuple[tuple[bool, float], AxialHit] | None = None
    for position_in_list, series in enumerate(axial_series):
        for index in range(len(series.meta.slices)):
            hit = _axial_hit(point, series, position_in_list, index)
            rank = (not hit.inside, hit.distance_mm)
            if best is None or rank < best[0]:
                best = (rank, hit)
    return best[1]


def _axial_hit(point: np.ndarray, series: CachedSeries, position_in_list: int, index: int) -> AxialHit:
    """Where ``point`` projects onto slice ``index`` of ``series`` (see :class:`AxialHit`)."""
    column, row, signed_distance = patient_to_pixel(*_slice_frame(series, index), point)
    rows, columns = series.meta.slices.original_shape[index]
    inside = -0.5 <= column <= columns - 0.5 and -0.5 <= row <= rows - 0.5
    instance = int(series.instance_numbers[index])
    x, y = series.original_to_cache_at(index, column, row)
    return AxialHit(position_in_list, index, instance, abs(signed_distance), x, y, inside)
