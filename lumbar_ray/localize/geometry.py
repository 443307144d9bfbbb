"""Patient-space geometry between series of one study, from the DICOM tags kept in the cache.

A point on a sagittal slice (cache pixels) is mapped to patient coordinates (mm) with that slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; each level's Axial T2 slice is then the one,
across every axial series and stack of the study, whose plane lies nearest to the point (that lies inside its
field of view), and the point's projection gives its in-plane position there. A point that no axial stack
reaches (beyond :data:`AXIAL_REACH_SLICES` slice spacings of every slice, or outside every field of view) gets no
axial slice: a level the study did not image axially is missing, not moved onto another level's slice. Of two
sagittal series of one type the study's better one is used (:func:`best_sagittal`). Pure numpy: no Ray, no file
read.

The DICOM pixel <-> patient rule itself lives in :func:`lumbar_ray.data.dicom.pixel_to_patient` and its inverse
:func:`lumbar_ray.data.dicom.patient_to_pixel`; the cache <-> original pixel rule in
:class:`lumbar_ray.data.cache.CachedSeries`. This module only applies them to the slices of cached series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumbar_ray.data.cache import CachedSeries, SeriesMeta
from lumbar_ray.data.dicom import patient_to_pixel, pixel_to_patient

# How far (in the stack's own slice spacings) a point may lie from its nearest axial slice and still be imaged by
# that stack. Inside a stack the nearest plane is at most half a spacing away; the sagittal level points are off
# by a few mm along the spine (about one axial spacing, ~4 mm), which must not lose a level its block does cover;
# a level the study did not image axially lies a disc-to-disc distance (~30-40 mm, 7+ spacings) from the nearest
# block. Two spacings sits between the two, with room on both sides.
AXIAL_REACH_SLICES = 2.0
# The slice spacing assumed for a stack that records none (a single slice without SpacingBetweenSlices or
# SliceThickness): the usual lumbar Axial T2 slice spacing.
DEFAULT_SLICE_SPACING_MM = 4.0
# A sagittal slab this wide (left-right) holds the canal and both foramina (~16 mm either side) with two ~4 mm
# slices to spare on each side; a wider slab images nothing more that is used, so it wins no further.
SAGITTAL_COVERAGE_MM = 50.0
# Head-to-foot field of view beyond which a taller sagittal series is no better: T12 to S1 and some margin.
SAGITTAL_HEIGHT_MM = 220.0


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
        reach_mm: the farthest a point may lie from this slice's plane and count as imaged by its stack
            (:func:`axial_reach_mm`).
    """

    series_position: int
    slice_index: int
    instance_number: int
    distance_mm: float
    x: float
    y: float
    inside: bool
    reach_mm: float

    @property
    def covered(self) -> bool:
        """Whether the slice's stack images the point: inside the field of view and within reach of the plane."""
        return self.inside and self.distance_mm <= self.reach_mm


def axial_reach_mm(meta: SeriesMeta, index: int, reach_slices: float = AXIAL_REACH_SLICES) -> float:
    """``reach_slices`` slice spacings of the stack holding slice ``index`` (:meth:`SeriesMeta.stack_spacing`,
    else :data:`DEFAULT_SLICE_SPACING_MM`), in mm: see :data:`AXIAL_REACH_SLICES`."""
    spacing = meta.stack_spacing(index)
    return reach_slices * (DEFAULT_SLICE_SPACING_MM if spacing is None else spacing)


def nearest_axial_slice(
    point: np.ndarray, axial_series: list[CachedSeries], reach_slices: float = AXIAL_REACH_SLICES
) -> AxialHit:
    """The axial slice (over every series and stack given) whose plane is nearest to ``point``.

    Slices whose stack images the point (:attr:`AxialHit.covered`) win over those that do not; then slices whose
    field of view contains the projected point (a tilted block for another level can pass close to the point far
    outside its own image); among those, the nearest plane. The caller decides what an uncovered best hit means
    (:func:`lumbar_ray.localize.study.axial_rows`: no axial point).

    Args:
        point: patient-space point (mm).
        axial_series: the series searched (metadata suffices).
        reach_slices: see :data:`AXIAL_REACH_SLICES`.

    Raises:
        ValueError: if ``axial_series`` is empty.
    """
    if not axial_series:
        raise ValueError("no axial series to assign the point to")
    best: tuple[tuple[bool, bool, float], AxialHit] | None = None
    for position_in_list, series in enumerate(axial_series):
        reach_of_stack: dict[int, float] = {}  # one spacing per stack, not one per slice
        for index in range(len(series.meta.slices)):
            stack = series.meta.slices.stack[index]
            if stack not in reach_of_stack:
                reach_of_stack[stack] = axial_reach_mm(series.meta, index, reach_slices)
            hit = _axial_hit(point, series, position_in_list, index, reach_of_stack[stack])
            rank = (not hit.covered, not hit.inside, hit.distance_mm)
            if best is None or rank < best[0]:
                best = (rank, hit)
    return best[1]


def _axial_hit(point: np.ndarray, series: CachedSeries, position_in_list: int, index: int, reach: float) -> AxialHit:
    """Where ``point`` projects onto slice ``index`` of ``series`` (see :class:`AxialHit`)."""
    column, row, signed_distance = patient_to_pixel(*_slice_frame(series, index), point)
    rows, columns = series.meta.slices.original_shape[index]
    inside = -0.5 <= column <= columns - 0.5 and -0.5 <= row <= rows - 0.5
    instance = int(series.instance_numbers[index])
    x, y = series.original_to_cache_at(index, column, row)
    return AxialHit(position_in_list, index, instance, abs(signed_distance), x, y, inside, reach)


def sagittal_rank(meta: SeriesMeta) -> tuple[bool, int, int, float, int]:
    """How good a sagittal series is for localisation, from its cached geometry alone (larger is better).

    In order of importance:

    1. a complete stack: one orientation and every slice with position, orientation and pixel spacing (the
       points of any other can not all be taken to patient space, which the foramen sides, the re-levelling
       and the axial assignment need);
    2. left-right coverage: slices x slice spacing, capped at :data:`SAGITTAL_COVERAGE_MM` and in whole mm (a
       partial repeat over a few slices may miss the canal or a foramen; beyond the cap, wider is no better);
    3. head-to-foot coverage: the field of view along the columns (rows x row spacing), capped at
       :data:`SAGITTAL_HEIGHT_MM` and in whole cm (a zoomed repeat may cut off the upper levels);
    4. finer in-plane pixel spacing (median over slices, to 0.01 mm): more detail of the same anatomy;
    5. the lower series id (the earlier acquisition; it keeps the choice deterministic).
    """
    slices = meta.slices
    complete = len(meta.stacks) <= 1 and all(
        value is not None for column in (slices.position, slices.orientation, slices.pixel_spacing) for value in column
    )
    n = len(slices)
    spacing = (meta.stack_spacing(0) if n else None) or DEFAULT_SLICE_SPACING_MM
    coverage = round(min(n * spacing, SAGITTAL_COVERAGE_MM))
    pixel_sizes = [float(np.mean(value)) for value in slices.pixel_spacing if value is not None]
    pixel_mm = round(float(np.median(pixel_sizes)), 2) if pixel_sizes else math.inf
    heights = [shape[0] * spacing[0] for shape, spacing in zip(slices.original_shape, slices.pixel_spacing,
                                                                strict=True) if shape and spacing]  # fmt: skip
    height = int(min(float(np.median(heights)), SAGITTAL_HEIGHT_MM) // 10) if heights else 0
    series_id = meta.series_id if meta.series_id is not None else 0
    return complete, coverage, height, -pixel_mm, -int(series_id)


def best_sagittal(entries: Sequence[CachedSeries]) -> CachedSeries:
    """The series of one sagittal type a study's points are placed on: the best by :func:`sagittal_rank`.

    Raises:
        ValueError: if ``entries`` is empty.
    """
    if not entries:
        raise ValueError("no sagittal series to choose from")
    return max(entries, key=lambda entry: sagittal_rank(entry.meta))
