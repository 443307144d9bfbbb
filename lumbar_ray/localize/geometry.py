"""Patient-space geometry between series of one study, from the DICOM tags kept in the cache.

A point on a sagittal slice (cache pixels) is mapped to patient coordinates (mm) with that slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; each level's Axial T2 slice is then the one,
across every axial series and stack of the study, whose plane lies nearest to the point (that lies inside its
field of view), and the point's projection gives its in-plane position there. Pure numpy: no Ray, no DICOM.

DICOM convention: ImageOrientationPatient holds the row direction X (towards increasing column index) then the
column direction Y (towards increasing row index); PixelSpacing is (row spacing, column spacing); the centre of
pixel (row r, column c) is at ``IPP + c * spacing_col * X + r * spacing_row * Y``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumbar_ray.data.cache import CachedSeries


def _slice_frame(series: CachedSeries, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    slices = series.meta["slices"]
    position = np.asarray(slices["position"][index], dtype=np.float64)
    orientation = np.asarray(slices["orientation"][index], dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in slices["pixel_spacing"][index])
    return position, orientation[:3], orientation[3:], row_spacing, col_spacing


def cache_point_to_patient(series: CachedSeries, index: int, x: float, y: float) -> np.ndarray:
    """Patient coordinates (mm) of the cache point ``(x, y)`` on slice ``index`` of ``series``."""
    _, column, row = series.cache_to_original(index, x, y)
    position, x_dir, y_dir, row_spacing, col_spacing = _slice_frame(series, index)
    return position + column * col_spacing * x_dir + row * row_spacing * y_dir


def plane_distance(series: CachedSeries, index: int, point: np.ndarray) -> float:
    """Distance (mm) from a patient-space ``point`` to the plane of slice ``index`` of ``series``."""
    position, x_dir, y_dir, _, _ = _slice_frame(series, index)
    return abs(float(np.dot(np.cross(x_dir, y_dir), np.asarray(point, dtype=np.float64) - position)))


def mm_per_cache_pixel(series: CachedSeries, index: int) -> np.ndarray:
    """``(x, y)`` millimetres per cache pixel on slice ``index``: its PixelSpacing over the cache's resize."""
    _, _, _, row_spacing, col_spacing = _slice_frame(series, index)
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
        shapes = series.meta["slices"]["original_shape"]
        for index in range(len(series.instance_numbers)):
            position, x_dir, y_dir, row_spacing, col_spacing = _slice_frame(series, index)
            offset = np.asarray(point, dtype=np.float64) - position
            distance = plane_distance(series, index, point)
            column = float(np.dot(offset, x_dir)) / col_spacing
            row = float(np.dot(offset, y_dir)) / row_spacing
            rows, columns = shapes[index]
            inside = -0.5 <= column <= columns - 0.5 and -0.5 <= row <= rows - 0.5
            instance = int(series.instance_numbers[index])
            scale_y, scale_x = series.scale[index]  # by index: instance numbers may repeat across stacks
            x, y = (column + 0.5) * scale_x - 0.5, (row + 0.5) * scale_y - 0.5
            hit = AxialHit(position_in_list, index, instance, distance, x, y, inside)
            rank = (not inside, distance)
            if best is None or rank < best[0]:
                best = (rank, hit)
    return best[1]
