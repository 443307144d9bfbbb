"""The phantom renderer of the synthetic data: tissue regions in patient space, sampled on DICOM slice planes.

A phantom is a list of :class:`Primitive` regions (ellipsoids and elliptic cylinders, axis-aligned or rotated),
painted in order. A slice is rendered by sampling them on its plane (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing), so every series of a study agrees with the others in patient space exactly, as real series of one
frame of reference do. Both presets of :mod:`lumbar_ray.data.synthetic` render through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lumbar_ray.constants import CONDITION_TITLES, CONDITIONS, LEVEL_TITLES, LEVELS
from lumbar_ray.segment.labels import LESION_OFFSET

# Tissue classes of the phantom and their signal (0..1) on each sequence: CSF bright on T2 and dark on T1,
# foraminal fat bright on T1, lesion tissue dark on both (like disc bulge or ligament).
AIR, SOFT, BONE, DISC, POSTERIOR, CSF, FAT, LESION = range(8)
TISSUE_SIGNAL = {
    "T1": np.array([0.0, 0.35, 0.55, 0.30, 0.45, 0.12, 0.85, 0.15], dtype=np.float32),
    "T2": np.array([0.0, 0.25, 0.35, 0.60, 0.30, 0.90, 0.55, 0.12], dtype=np.float32),
}
SERIES_SEQUENCE = {"Sagittal T1": "T1", "Sagittal T2/STIR": "T2", "Axial T2": "T2"}


@dataclass(frozen=True)
class Primitive:
    """A region of the phantom: an ellipsoid, or an elliptic cylinder along z when ``half_height`` is set.

    ``replaces`` restricts painting to pixels currently of those tissues (lesions only narrow CSF or fat).
    ``axes`` rotates the region: its rows are the region's own x, y, z axes in patient space (row-major, 9 values);
    None keeps it aligned with the patient axes. ``label`` is the structure it is in a label map
    (:mod:`lumbar_ray.segment.labels`; 0 = none, e.g. soft tissue); a primitive with ``replaces`` ignores it and
    marks the structure it narrows as a lesion instead (:func:`render_labels`).
    """

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    tissue: int
    half_height: float | None = None
    replaces: tuple[int, ...] = ()
    axes: tuple[float, ...] | None = None
    label: int = 0

    @property
    def bounding_radius(self) -> float:
        rx, ry, rz = self.radii
        extent_z = rz if self.half_height is None else self.half_height
        return float(np.sqrt(rx * rx + ry * ry + extent_z * extent_z))


@dataclass
class SliceSpec:
    """One slice to render: its DICOM geometry and instance number."""

    position: np.ndarray
    orientation: tuple[float, ...]
    instance_number: int


@dataclass(frozen=True)
class SeriesLook:
    """How one series renders: its tissue signal table, noise level, gain and bias field."""

    signal: np.ndarray
    noise: float
    gain: float
    bias: tuple[float, float, float]  # linear in rows, linear in columns, radial (image-centred, unit half-size)

    def pixels(self, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """12-bit MR-like pixels of one tissue map."""
        rows, cols = tissue.shape
        r = np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
        c = np.linspace(-1, 1, cols, dtype=np.float32)[None, :]
        field = 1.0 + self.bias[0] * r + self.bias[1] * c + self.bias[2] * (r * r + c * c)
        signal = self.signal[tissue] * field
        noisy = np.abs(signal + self.noise * rng.standard_normal((rows, cols), dtype=np.float32))
        return np.clip(noisy * self.gain, 0, 4095).astype(np.uint16)


def sample_look(rng: np.random.Generator, description: str, base_noise: float) -> SeriesLook:
    """Per-series contrast (each tissue's signal +-15 %), noise (0.7-1.7x the base), gain and bias field."""
    sequence = SERIES_SEQUENCE[description]
    signal = (TISSUE_SIGNAL[sequence] * rng.uniform(0.85, 1.15, size=len(TISSUE_SIGNAL[sequence]))).astype(np.float32)
    signal[0] = 0.0  # air stays dark
    bias = (float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.2, 0.1)))
    return SeriesLook(signal, base_noise * float(rng.uniform(0.7, 1.7)), float(rng.uniform(1800.0, 3600.0)), bias)


@dataclass
class SeriesSpec:
    """One series of a study: its description, pixel grid and slices."""

    series_id: int
    description: str
    rows: int
    cols: int
    spacing: tuple[float, float]
    thickness: float
    slices: list[SliceSpec] = field(default_factory=list)
    look: SeriesLook | None = None  # None: the easy preset's fixed contrast (see tissue_to_pixels)


def render_slice(primitives: list[Primitive], spec: SliceSpec, series: SeriesSpec) -> np.ndarray:
    """Sample the phantom's tissue classes on one slice plane, shape (rows, cols), uint8.

    Pixel (r, c) lies at ``position + c * col_spacing * row_dir + r * row_spacing * col_dir`` (DICOM's
    convention: the first three IOP cosines run along a row). Each primitive is evaluated only on the pixel
    box its bounding sphere covers, which keeps rendering cheap.
    """
    tissue = np.zeros((series.rows, series.cols), dtype=np.uint8)
    for _ in _paint(primitives, spec, series, tissue):
        pass
    return tissue


def render_labels(primitives: list[Primitive], spec: SliceSpec, series: SeriesSpec) -> np.ndarray:
    """The structure labels (:mod:`lumbar_ray.segment.labels`) of one slice plane, shape (rows, cols), int16.

    Painted in the same order and with the same geometry as :func:`render_slice`: each primitive paints its
    ``label`` where it paints its tissue, so the labels agree with the tissue map pixel for pixel. A primitive
    with ``replaces`` (a lesion) keeps the structure it narrows and adds ``LESION_OFFSET`` (a narrowed canal pixel
    is 1100), where that pixel holds a structure. Draws no random numbers.
    """
    return render_tissue_and_labels(primitives, spec, series)[1]


def render_tissue_and_labels(
    primitives: list[Primitive], spec: SliceSpec, series: SeriesSpec
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_slice` and :func:`render_labels` of one slice in a single pass: (tissue uint8, labels int16)."""
    tissue = np.zeros((series.rows, series.cols), dtype=np.uint8)
    labels = np.zeros((series.rows, series.cols), dtype=np.int16)
    for part, window, inside in _paint(primitives, spec, series, tissue):
        painted = labels[window]
        if part.replaces:
            below = painted[inside]
            structure = (below > 0) & (below < LESION_OFFSET)
            painted[inside] = np.where(structure, below + LESION_OFFSET, below)
        else:
            painted[inside] = part.label
    return tissue, labels


def _paint(
    primitives: list[Primitive], spec: SliceSpec, series: SeriesSpec, tissue: np.ndarray
) -> Iterator[tuple[Primitive, tuple[slice, slice], np.ndarray]]:
    """Paint each primitive's tissue into ``tissue`` in list order; yield ``(part, window, inside)`` after each.

    ``window`` is the (rows, cols) slice of the pixel box the primitive was evaluated on, ``inside`` the mask of
    that box it painted (the ``replaces`` test already applied), so a label map can follow the tissue map exactly.
    """
    row_dir = np.asarray(spec.orientation[:3])
    col_dir = np.asarray(spec.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    for part in primitives:
        offset = spec.position - np.asarray(part.center)
        box = pixel_box(part, offset, row_dir, col_dir, normal, series)
        if box is None:
            continue
        r0, r1, c0, c1 = box
        window = (slice(r0, r1), slice(c0, c1))
        inside = _inside(part, offset, row_dir, col_dir, box, series.spacing)
        if part.replaces:
            inside &= np.isin(tissue[window], part.replaces)
        tissue[window][inside] = part.tissue
        yield part, window, inside


def _inside(part: Primitive, offset, row_dir, col_dir, box, spacing) -> np.ndarray:
    """The pixels of ``box`` (r0, r1, c0, c1) inside one primitive, bool (r1 - r0, c1 - c0)."""
    r0, r1, c0, c1 = box
    if part.axes is not None:  # into the region's own frame: only the three vectors need rotating
        offset, row_vec, col_vec = (np.asarray(part.axes).reshape(3, 3) @ v for v in (offset, row_dir, col_dir))
    else:
        row_vec, col_vec = row_dir, col_dir
    row_spacing, col_spacing = spacing
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] * row_spacing
    cc = np.arange(c0, c1, dtype=np.float32)[None, :] * col_spacing
    d = [offset[i] + cc * row_vec[i] + rr * col_vec[i] for i in range(3)]
    inside = (d[0] / part.radii[0]) ** 2 + (d[1] / part.radii[1]) ** 2
    if part.half_height is None:
        return inside + (d[2] / part.radii[2]) ** 2 <= 1.0
    return (inside <= 1.0) & (np.abs(d[2]) <= part.half_height)


def pixel_box(part, offset, row_dir, col_dir, normal, series) -> tuple[int, int, int, int] | None:
    """Pixel rows/cols that the primitive can cover on this plane, or None if it misses the plane."""
    if part.half_height is not None and part.half_height > 1e6:
        return 0, series.rows, 0, series.cols
    radius = part.bounding_radius
    if abs(float(offset @ normal)) > radius:
        return None
    row_spacing, col_spacing = series.spacing
    centre_c = -float(offset @ row_dir) / col_spacing
    centre_r = -float(offset @ col_dir) / row_spacing
    r0 = max(int(np.floor(centre_r - radius / row_spacing)), 0)
    r1 = min(int(np.ceil(centre_r + radius / row_spacing)) + 1, series.rows)
    c0 = max(int(np.floor(centre_c - radius / col_spacing)), 0)
    c1 = min(int(np.ceil(centre_c + radius / col_spacing)) + 1, series.cols)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def tissue_to_pixels(
    tissue: np.ndarray, sequence: str, rng: np.random.Generator, noise: float, gain: float
) -> np.ndarray:
    """Turn a tissue map into 12-bit MR-like pixels: signal table, smooth bias field, Rician-like noise."""
    signal = TISSUE_SIGNAL[sequence][tissue]
    rows, cols = tissue.shape
    bias = 1.0 + 0.08 * np.linspace(-1, 1, rows, dtype=np.float32)[:, None] * rng.uniform(-1, 1)
    noisy = np.abs(signal * bias + noise * rng.standard_normal((rows, cols), dtype=np.float32))
    return np.clip(noisy * gain, 0, 4095).astype(np.uint16)


def pixel_of(point: np.ndarray, series: SeriesSpec, spec: SliceSpec) -> tuple[float, float]:
    """(x=column, y=row) of a patient-space point projected onto one slice."""
    offset = point - spec.position
    x = float(offset @ np.asarray(spec.orientation[:3])) / series.spacing[1]
    y = float(offset @ np.asarray(spec.orientation[3:])) / series.spacing[0]
    return x, y


def plane_distance(point: np.ndarray, spec: SliceSpec) -> float:
    """Distance (mm) of a patient-space point from a slice's plane."""
    normal = np.cross(spec.orientation[:3], spec.orientation[3:])
    return abs(float((point - spec.position) @ normal))


def nearest_slice(point: np.ndarray, series: SeriesSpec) -> SliceSpec:
    """The slice of ``series`` whose plane is nearest to ``point``."""
    return min(series.slices, key=lambda spec: plane_distance(point, spec))


def exact_place(point: np.ndarray, series: SeriesSpec) -> tuple[np.ndarray, SliceSpec]:
    """An annotator without error: the point itself, on the slice nearest to it."""
    return point, nearest_slice(point, series)


def label_coordinates(
    study_id: int,
    labels: np.ndarray,
    anatomy: Any,
    series: list[SeriesSpec],
    place: Callable[[np.ndarray, SeriesSpec], tuple[np.ndarray, SliceSpec] | None] = exact_place,
) -> list[dict]:
    """Rows of train_label_coordinates.csv: each labelled target's point as ``place`` marks it.

    Args:
        study_id: the study.
        labels: ``(25,)`` class ids, negative for an empty cell (no point).
        anatomy: where the label points are: ``spinal_point``, ``foramen_point(side)``, ``subarticular_point(side)``
            in patient millimetres (+1 = patient left), shape (5, 3) each.
        series: the study's series; the first of each type carries the labels.
        place: the annotator: patient point and series -> the point it marks and the slice it marks it on, or
            None for no mark.
    """
    by_type: dict[str, SeriesSpec] = {}
    for spec in series:
        by_type.setdefault(spec.description, spec)
    points = {
        "spinal_canal_stenosis": ("Sagittal T2/STIR", anatomy.spinal_point),
        "left_neural_foraminal_narrowing": ("Sagittal T1", anatomy.foramen_point(1)),
        "right_neural_foraminal_narrowing": ("Sagittal T1", anatomy.foramen_point(-1)),
        "left_subarticular_stenosis": ("Axial T2", anatomy.subarticular_point(1)),
        "right_subarticular_stenosis": ("Axial T2", anatomy.subarticular_point(-1)),
    }
    rows = []
    for c_index, condition in enumerate(CONDITIONS):
        description, level_points = points[condition]
        target_series = by_type.get(description)
        for k, level in enumerate(LEVELS):
            if target_series is None or labels[c_index * len(LEVELS) + k] < 0:
                continue
            placed = place(level_points[k], target_series)
            if placed is None:
                continue
            point, spec = placed
            x, y = pixel_of(point, target_series, spec)
            rows.append(
                {
                    "study_id": study_id,
                    "series_id": target_series.series_id,
                    "instance_number": spec.instance_number,
                    "condition": CONDITION_TITLES[condition],
                    "level": LEVEL_TITLES[level],
                    "x": round(x, 3),
                    "y": round(y, 3),
                }
            )
    return rows
