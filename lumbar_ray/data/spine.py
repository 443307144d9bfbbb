"""The hard preset's studies: a curved, varied spine, read by noisy readers, scanned the way scanners do it.

Where the easy preset plants each severity far from the others on a straight spine, this one models what makes the
real task hard (see :mod:`lumbar_ray.data.grading` for the labels):

- *anatomy*: lumbar lordosis and, in some studies, a scoliosis (the spine is a curve, every vertebra, disc, canal
  segment and foramen follows its local frame); level heights that vary; thoracic levels above L1 and a sacrum
  below; a small rate of transitional anatomy (a sacralised L5 whose L5/S1 disc is barely visible, so counting
  from the sacrum goes wrong);
- *acquisition*: field-of-view sizes and offsets, slice thickness and gaps, sagittal slices numbered from either
  side, axial blocks angled along each disc (with a small error) or one straight contiguous stack, per-series
  contrast, noise level and bias field;
- *evidence in more than one view*: the lesions live in the 3D phantom, so spinal stenosis shows on Sagittal T2
  and on the axial slices of its level, foraminal narrowing on Sagittal T1 and, small, on the axial slices; each
  series has its own noise. Lesions span a few slices, so picking the slice matters;
- *annotation like people make it*: label points off by a millimetre or two, sometimes on the neighbouring slice.

Each lesion's size is a smooth function of the target's latent severity, so the image carries the latent and the
Bayes floor of :func:`lumbar_ray.data.grading.bayes_floor` is what a perfect reader of these images could reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumbar_ray.constants import CONDITIONS, LEVELS
from lumbar_ray.data.grading import HARD_READERS, read_labels, sample_latents, severity_units
from lumbar_ray.data.phantom import (
    BONE,
    CSF,
    DISC,
    FAT,
    LESION,
    POSTERIOR,
    SOFT,
    Primitive,
    SeriesSpec,
    SliceSpec,
    label_coordinates,
    nearest_slice,
    plane_distance,
    sample_look,
)
from lumbar_ray.segment.labels import CANAL, SACRUM, disc_value, foramen_value, vertebra_value

SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
TRANSITIONAL_RATE = 0.03  # sacralised L5 (about 3-4 % of people have a lumbosacral transitional vertebra)
SCOLIOSIS_RATE = 0.15
CONTIGUOUS_AXIAL_RATE = 0.3  # one straight axial stack over all levels instead of angled per-level blocks
POINT_SD_MM = 1.2  # annotators' in-plane scatter
WRONG_SLICE_RATE = 0.04  # label point on the neighbouring slice
MAX_LABEL_DISTANCE_MM = 10.0  # farther from every slice of the series, a point is not marked
THORACIC_DISCS = 2  # T11/T12 and T12/L1 above the labelled levels


def lesion_fraction(severity: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Share of the structure a lesion fills, smooth and increasing in the severity (severity units).

    About 0.28 at the moderate boundary (0) and 0.75 at the severe one (1); never quite 0 or 1, so the image keeps
    telling severities apart on both sides of each boundary.
    """
    return strength * 0.95 / (1.0 + np.exp(-2.2 * (severity - 0.4)))


@dataclass
class SpineCurve:
    """One study's spine: a curve in patient millimetres (LPS) with a local frame at every height.

    The anterior column passes through ``(x0 + scoliosis * sin(pi * t / 160), y0 + lordosis * (t / 100) ** 2, z)``
    with ``t = z - z_apex``: the lumbar apex is the most anterior point (lordosis) and a scoliosis bends it sideways.
    """

    x0: float
    y0: float
    z_apex: float
    lordosis: float
    scoliosis: float
    disc_z: np.ndarray  # every disc from the top (thoracic ones first), then the five labelled ones
    disc_height: np.ndarray
    canal_radii: tuple[float, float]
    foramen_offset: float
    transitional: bool

    def point(self, z: float) -> np.ndarray:
        t = z - self.z_apex
        return np.array(
            [self.x0 + self.scoliosis * np.sin(np.pi * t / 160.0), self.y0 + self.lordosis * (t / 100) ** 2, z]
        )

    def frame(self, z: float) -> np.ndarray:
        """Rows: the local left (l), posterior (n) and superior (u) unit vectors at height ``z``."""
        t = z - self.z_apex
        up = np.array([self.scoliosis * np.pi / 160.0 * np.cos(np.pi * t / 160.0), 2 * self.lordosis * t / 1e4, 1.0])
        up /= np.linalg.norm(up)
        posterior = np.array([0.0, 1.0, 0.0]) - up[1] * up
        posterior /= np.linalg.norm(posterior)
        return np.stack([np.cross(posterior, up), posterior, up])

    @property
    def labelled_z(self) -> np.ndarray:
        """Heights of the five labelled discs, L1/L2 to L5/S1."""
        return self.disc_z[THORACIC_DISCS:]

    def canal_centre(self, z: float) -> np.ndarray:
        return self.point(z) + self.frame(z)[1] * (16.0 + self.canal_radii[1] + 1.0)

    @property
    def spinal_point(self) -> np.ndarray:
        """Label points of spinal canal stenosis (canal centre at each labelled disc), shape (5, 3)."""
        return np.stack([self.canal_centre(z) for z in self.labelled_z])

    def foramen_point(self, side: int) -> np.ndarray:
        """Label points of the foramina of one side (+1 = patient left), shape (5, 3)."""
        return np.stack(
            [
                self.point(z) + self.frame(z).T @ np.array([side * self.foramen_offset, 19.0, 0.0])
                for z in self.labelled_z
            ]
        )

    def subarticular_point(self, side: int) -> np.ndarray:
        """Label points of the lateral recesses of one side (+1 = patient left), shape (5, 3)."""
        rx, ry = self.canal_radii
        return np.stack(
            [
                self.canal_centre(z) + self.frame(z).T @ np.array([side * 0.65 * rx, -0.45 * ry, 0.0])
                for z in self.labelled_z
            ]
        )


def sample_spine(rng: np.random.Generator) -> SpineCurve:
    """Draw one spine: position, curvature, level heights, canal size, transitional anatomy."""
    pitch = rng.uniform(30.0, 38.0)
    heights = pitch * rng.uniform(0.9, 1.1, size=len(LEVELS) + THORACIC_DISCS)
    z_l3 = rng.uniform(-20.0, 20.0)
    # Disc heights from the top: the labelled L3/L4 disc (index THORACIC_DISCS + 2) sits at z_l3.
    offsets = np.concatenate([[0.0], -np.cumsum(heights[:-1])])
    disc_z = z_l3 + offsets - offsets[THORACIC_DISCS + 2]
    transitional = bool(rng.random() < TRANSITIONAL_RATE)
    disc_height = 0.26 * heights * rng.uniform(0.85, 1.15, size=len(heights))
    if transitional:  # a sacralised L5: the L5/S1 disc is a thin remnant
        disc_height[-1] *= 0.3
    return SpineCurve(
        x0=rng.uniform(-8.0, 8.0),
        y0=rng.uniform(-15.0, 15.0),
        z_apex=z_l3 + rng.uniform(-10.0, 10.0),
        lordosis=rng.uniform(8.0, 28.0),
        scoliosis=float(rng.choice([-1, 1]) * rng.uniform(4.0, 12.0)) if rng.random() < SCOLIOSIS_RATE else 0.0,
        disc_z=disc_z,
        disc_height=disc_height,
        canal_radii=(rng.uniform(8.5, 11.5), rng.uniform(5.5, 8.0)),
        foramen_offset=rng.uniform(14.5, 17.5),
        transitional=transitional,
    )


def _oriented(centre: np.ndarray, radii, tissue: int, frame: np.ndarray, **kwargs) -> Primitive:
    return Primitive(
        tuple(float(v) for v in centre), tuple(radii), tissue, axes=tuple(frame.ravel().tolist()), **kwargs
    )


def _column(spine: SpineCurve) -> list[Primitive]:
    """Bodies, discs, posterior elements, canal and foraminal fat, along the curve (painted in this order)."""
    z_all = spine.disc_z
    body_z = np.concatenate([[z_all[0] + 0.5 * (z_all[0] - z_all[1])], 0.5 * (z_all[:-1] + z_all[1:])])
    parts = []
    for z in (*body_z, z_all[-1]):  # posterior elements behind every body and the lowest disc
        frame = spine.frame(z)
        centre = spine.canal_centre(z) + frame[1] * 11.0
        parts.append(_oriented(centre, (15.0, 12.0, 0.0), POSTERIOR, frame, half_height=0.6 * (z_all[0] - z_all[1])))
    lowest = len(z_all) - 1  # body k and disc k from the top are the (lowest - k)-th from the bottom: L5, L5/S1
    for k, z in enumerate(body_z):  # each body fills its segment; the discs are painted over its ends
        half = 0.5 * ((z_all[k - 1] - z_all[k]) if k > 0 else (z_all[0] - z_all[1]))
        label = vertebra_value(lowest - k)
        parts.append(_oriented(spine.point(z), (21.0, 15.0, 0.0), BONE, spine.frame(z), half_height=half, label=label))
    parts.append(_sacrum(spine))
    for k, (z, height) in enumerate(zip(z_all, spine.disc_height, strict=True)):
        half, label = height / 2, disc_value(lowest - k)
        parts.append(_oriented(spine.point(z), (21.0, 15.0, 0.0), DISC, spine.frame(z), half_height=half, label=label))
    pitch = z_all[0] - z_all[1]
    sac = (z_all[-1] - 0.5 * pitch, z_all[-1] - pitch)  # the thecal sac goes on into the sacrum
    for z in (*body_z, *z_all, *sac):  # overlapping canal segments make one continuous canal
        half = 0.55 * pitch
        frame = spine.frame(z)
        parts.append(
            _oriented(spine.canal_centre(z), (*spine.canal_radii, 0.0), CSF, frame, half_height=half, label=CANAL)
        )
    for side in (1, -1):
        for k, (z, point) in enumerate(zip(spine.labelled_z, spine.foramen_point(side), strict=True)):
            label = foramen_value(len(LEVELS) - 1 - k, side)
            parts.append(_oriented(point, (5.0, 5.5, 6.5), FAT, spine.frame(z), label=label))
    return parts


def _sacrum(spine: SpineCurve) -> Primitive:
    """A large bone block below L5/S1, tilted forward by the sacral slope: the landmark levels are counted from."""
    z = spine.disc_z[-1] - 0.5 * (spine.disc_z[-2] - spine.disc_z[-1]) - 6.0
    frame = spine.frame(z)
    # Rotate about the local left axis so that the top plate faces forwards and up (the sacral slope):
    # up' = cos * up - sin * posterior leans the block's axis towards anterior.
    slope = -np.deg2rad(25.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(slope), -np.sin(slope)], [0, np.sin(slope), np.cos(slope)]])
    tilted = rotation @ frame
    centre = spine.point(z) + frame[1] * 6.0
    top = spine.disc_z[-1] - spine.disc_height[-1] / 2
    return _oriented(centre, (26.0, 19.0, 0.0), BONE, tilted, half_height=max(top - z, 8.0) + 6.0, label=SACRUM)


def _lesions(spine: SpineCurve, severity: np.ndarray, strength: float) -> list[Primitive]:
    """One lesion per target, its size :func:`lesion_fraction` of the severity (TARGETS order)."""
    fraction = lesion_fraction(severity, strength)
    rx, ry = spine.canal_radii
    parts = []
    for k, z in enumerate(spine.labelled_z):  # disc bulge filling the front of the canal
        frame = spine.frame(z)
        front = spine.canal_centre(z) - frame[1] * ry
        grade = fraction[k]
        parts.append(_oriented(front, (0.5 * rx, 2 * grade * ry, 6.0), LESION, frame, replaces=(CSF,)))
    for side, condition in ((1, "left_neural_foraminal_narrowing"), (-1, "right_neural_foraminal_narrowing")):
        offset = CONDITIONS.index(condition) * len(LEVELS)
        for k, (z, point) in enumerate(zip(spine.labelled_z, spine.foramen_point(side), strict=True)):
            grade = fraction[offset + k]
            radii = (6.0 * grade, 6.0 * grade, 7.0 * grade)
            parts.append(_oriented(point, radii, LESION, spine.frame(z), replaces=(FAT,)))
    for side, condition in ((1, "left_subarticular_stenosis"), (-1, "right_subarticular_stenosis")):
        offset = CONDITIONS.index(condition) * len(LEVELS)
        for k, (z, point) in enumerate(zip(spine.labelled_z, spine.subarticular_point(side), strict=True)):
            radius = 0.5 * rx * fraction[offset + k]
            parts.append(_oriented(point, (radius, radius, 5.0), LESION, spine.frame(z), replaces=(CSF,)))
    return parts


def build_phantom(spine: SpineCurve, severity: np.ndarray, strength: float) -> list[Primitive]:
    """The phantom of one hard study: soft tissue, the spinal column, then the lesions."""
    soft = Primitive((spine.x0, spine.y0 - 40.0, 0.0), (160.0, 130.0, 0.0), SOFT, half_height=1e9)  # the trunk
    return [soft, *_column(spine), *_lesions(spine, severity, strength)]


def _offset_within(rng: np.random.Generator, low: float, high: float, half_extent: float, most: float) -> float:
    """A centre up to ``most`` mm off ``[low, high]``'s middle for a window of ``half_extent`` that still covers it."""
    slack = min(max(half_extent - 0.5 * (high - low), 0.0), most)
    return 0.5 * (low + high) + rng.uniform(-slack, slack)


def sagittal_series(rng, spine: SpineCurve, series_id: int, description: str, size: int) -> SeriesSpec:
    """A sagittal stack: field of view, thickness and gap, an off-centre slab, numbered from either side.

    The offsets are random, but the slab and the field of view keep every labelled point in view with a margin,
    as a technologist would plan them.
    """
    thickness = rng.uniform(3.0, 4.5)
    spacing_x = thickness + rng.uniform(0.0, 1.0)
    fov = rng.uniform(180.0, 280.0)
    rows = size
    cols = size if rng.random() > 0.2 else int(size * 0.875)
    series = SeriesSpec(series_id, description, rows, cols, (fov / rows, fov / rows), thickness)
    points = np.concatenate([spine.spinal_point, spine.foramen_point(1), spine.foramen_point(-1)])
    low, high = points.min(axis=0), points.max(axis=0)
    margin = 6.0  # mm beyond the outermost labelled point
    n_slices = max(int(rng.integers(13, 22)), int(np.ceil((high[0] - low[0] + 2 * margin) / spacing_x)) + 1)
    row_spacing, col_spacing = series.spacing
    half_rows, half_cols = 0.5 * (rows - 1) * row_spacing - margin, 0.5 * (cols - 1) * col_spacing - margin
    centre = np.array(
        [
            _offset_within(rng, low[0], high[0], 0.5 * (n_slices - 1) * spacing_x - margin, most=8.0),
            _offset_within(rng, low[1], high[1], half_cols, most=20.0) - 10.0,  # the body, in front, is framed too
            _offset_within(rng, low[2], high[2], half_rows, most=30.0),
        ]
    )
    top_left = centre + np.array([0.0, -(cols - 1) / 2 * col_spacing, (rows - 1) / 2 * row_spacing])
    xs = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing_x
    order = xs[::-1] if rng.random() < 0.7 else xs  # instance 1 on the patient's left on most scanners
    for index, x in enumerate(order):
        series.slices.append(SliceSpec(top_left + np.array([x, 0.0, 0.0]), SAGITTAL_ORIENTATION, index + 1))
    return series


def _axial_orientation(up: np.ndarray) -> tuple[float, ...]:
    """Row along the patient's left, column posterior, for a plane whose normal is ``up``."""
    row = np.array([1.0, 0.0, 0.0]) - up[0] * up
    row /= np.linalg.norm(row)
    col = np.cross(up, row)
    return tuple(float(v) for v in (*row, *col))


def _tilt(up: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """``up`` turned by a small random angle (the technologist's imperfect block angle)."""
    tilted = up + np.deg2rad(degrees) * rng.standard_normal(3)
    return tilted / np.linalg.norm(tilted)


def axial_series(rng, spine: SpineCurve, series_id: int, size: int, levels: range) -> SeriesSpec:
    """Axial T2: angled blocks through the discs of ``levels``, or one straight contiguous stack over them."""
    fov = rng.uniform(140.0, 200.0)
    thickness = rng.uniform(3.5, 5.0)
    spacing = thickness + rng.uniform(0.0, 1.0)
    series = SeriesSpec(series_id, "Axial T2", size, size, (fov / size, fov / size), thickness)
    shift = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), 0.0])
    if rng.random() < CONTIGUOUS_AXIAL_RATE:
        z_top = spine.labelled_z[levels[0]] + 10.0
        z_bottom = spine.labelled_z[levels[-1]] - 10.0
        heights = np.arange(z_top, z_bottom - 1e-6, -spacing)
        centres = [np.array([spine.x0, spine.canal_centre(z)[1], z]) for z in heights]
        blocks = [(np.array([0.0, 0.0, 1.0]), centres)]
    else:
        blocks = []
        for k in levels:
            z = spine.labelled_z[k]
            up = _tilt(spine.frame(z)[2], rng, 3.0)
            per_level = int(rng.integers(3, 7))
            offsets = (np.arange(per_level) - (per_level - 1) // 2)[::-1] * spacing  # cranial slice first
            centre = spine.canal_centre(z)
            blocks.append((up, [centre + offset * up for offset in offsets]))
    instance = 1
    for up, centres in blocks:
        orientation = _axial_orientation(up)
        row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        for centre in centres:
            middle = centre + shift - (shift @ up) * up  # the field-of-view shift stays in the slice plane
            top_left = (
                middle - (size - 1) / 2 * series.spacing[1] * row_dir - (size - 1) / 2 * series.spacing[0] * col_dir
            )
            series.slices.append(SliceSpec(top_left, orientation, instance))
            instance += 1
    return series


def _spatial_neighbour(series: SeriesSpec, chosen: SliceSpec, rng: np.random.Generator) -> SliceSpec:
    """The slice next to ``chosen`` along its own normal, on a random side (the annotator's slip)."""
    normal = np.cross(chosen.orientation[:3], chosen.orientation[3:])
    same_stack = [s for s in series.slices if s.orientation == chosen.orientation]
    ranked = sorted(same_stack, key=lambda s: float(s.position @ normal))
    index = next(i for i, s in enumerate(ranked) if s is chosen) + int(rng.choice([-1, 1]))
    return ranked[index] if 0 <= index < len(ranked) else chosen


def annotate(
    study_id: int, labels: np.ndarray, spine: SpineCurve, series: list[SeriesSpec], rng: np.random.Generator
) -> list[dict]:
    """Rows of train_label_coordinates.csv as annotators make them: scattered points, sometimes a slice off."""

    def place(point: np.ndarray, target_series: SeriesSpec) -> tuple[np.ndarray, SliceSpec] | None:
        point = point + POINT_SD_MM * rng.standard_normal(3)
        spec = nearest_slice(point, target_series)
        if plane_distance(point, spec) > MAX_LABEL_DISTANCE_MM:
            return None  # no slice of the series shows it (a repeat over other levels): no point, as a reader would
        if rng.random() < WRONG_SLICE_RATE:
            spec = _spatial_neighbour(target_series, spec, rng)
        return point, spec

    return label_coordinates(study_id, labels, spine, series, place)


@dataclass
class HardStudy:
    """What :func:`plan_hard_study` draws; the writer renders it."""

    labels: np.ndarray
    severity: np.ndarray
    spine: SpineCurve
    primitives: list[Primitive]
    series: list[SeriesSpec]


def plan_hard_study(
    rng: np.random.Generator, series_ids: list[int], size: int, strength: float, noise: float
) -> HardStudy:
    """Draw one hard study's latent severities, reader labels, spine, phantom and series (without quirks)."""
    severity = severity_units(sample_latents(rng, 1, HARD_READERS.study_correlation), HARD_READERS)[0]
    labels = read_labels(rng, severity, HARD_READERS)
    spine = sample_spine(rng)
    primitives = build_phantom(spine, severity, strength)
    series = [
        sagittal_series(rng, spine, series_ids[0], "Sagittal T1", size),
        sagittal_series(rng, spine, series_ids[1], "Sagittal T2/STIR", size),
        axial_series(rng, spine, series_ids[2], size, range(len(LEVELS))),
    ]
    for spec in series:
        spec.look = sample_look(rng, spec.description, noise)
    return HardStudy(labels, severity, spine, primitives, series)
