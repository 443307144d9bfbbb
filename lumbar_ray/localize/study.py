"""All 25 target points of one study from its cached series: sagittal detectors, then axial slices by geometry.

1. Sagittal T2/STIR: the canal detector places each level's point (slice + in-plane); Sagittal T1: the foramen
   detector places the left and right points, each detection's level taken from the canal
   (:func:`relevel_by_canal`) and its side from its patient-space x against the canal's (:func:`assign_sides`).
   Missing or duplicate detections are resolved by the anatomy's order inside the detector
   (:func:`lumbar_ray.localize.levels.resolve_levels`): a study is never dropped. Of two series of one sagittal
   type the better one is used (:func:`lumbar_ray.localize.geometry.best_sagittal`).
2. Axial T2: each level's subarticular points are built in patient space, ``subarticular_fraction`` of the way
   from the canal point to the same side's foramen point (the lateral recess lies between the two), and each is
   assigned the Axial T2 slice, over every axial series and stack of the study, whose plane is nearest
   (:func:`lumbar_ray.localize.geometry.nearest_axial_slice`); its projection is the in-plane point. A point no
   axial stack reaches gets no slice: that target is unplaced (the prior fills it downstream).

Where a series type is missing the study still gets every point that can be placed: without Sagittal T2 the
canal is the midpoint of the two foramina, without Sagittal T1 the foramen is ``LATERAL_FORAMEN_MM`` to the side
of the canal; targets with nothing to anchor them get no point (an all-zero crop downstream) and are listed.
Pure numpy/pandas over :class:`~lumbar_ray.data.cache.CachedSeries`: no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from lumbar_ray.constants import LEVELS, POINT_COLUMNS, SERIES_TYPES, TARGETS, target_index
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.localize.geometry import best_sagittal, cache_point_to_patient, left_first, nearest_axial_slice

logger = logging.getLogger(__name__)

SAG_T2, SAG_T1, AXIAL = "Sagittal T2/STIR", "Sagittal T1", "Axial T2"
LOCATED_COLUMNS = (*POINT_COLUMNS, "confidence", "filled", "source")
# Patient-left is +x in DICOM's LPS frame; the foramen lies ~15-17 mm lateral of the canal in an adult lumbar spine.
LATERAL_FORAMEN_MM = 16.0
SIDES = {"left": 1.0, "right": -1.0}
# Without a Sagittal T2 canal, a level's left and right foramen detections on Sagittal T1 are ~2 x 16 mm apart,
# while one foramen's detections spread over its two or three slices (< 10 mm): a gap of at least this much
# between a level's detections is where the canal lies.
MIN_FORAMEN_GAP_MM = LATERAL_FORAMEN_MM
# Closer than this to the canal's mid-line a Sagittal T1 detection has no side (the foramina lie 14-18 mm out).
MIN_SIDE_OFFSET_MM = 5.0


class Locator(Protocol):
    """What :func:`localise_study` needs of a sagittal detector: one point per target of its series type.

    :class:`lumbar_ray.localize.detector.SagittalDetector` is one; a test can stand in with the labelled points.
    A plain Locator's Sagittal T1 sides are its own (``left_first`` is its only hint); a :class:`LevelDetector`'s
    are re-taken from patient space.
    """

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """One row per target: target, slice, x, y, confidence, filled (``left_first``: slice 0 is patient-left)."""
        ...


@runtime_checkable
class LevelDetector(Locator, Protocol):
    """A :class:`Locator` whose raw detections can be re-levelled and re-sided before they are resolved: on
    Sagittal T1 the foramina then take their levels from the canal found on Sagittal T2 and their sides from
    patient space (:func:`foramen_detections`)."""

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Every detection: target, slice, x, y, confidence."""
        ...

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        """What :meth:`locate` returns, from the given detections on a volume of ``n_slices`` slices."""
        ...


@dataclass
class StudyPoints:
    """The points used for one study and what could not be placed.

    Attributes:
        study_id: the study.
        points: one row per placed target: the POINTS columns plus ``confidence`` (0 where filled or derived
            from a filled point), ``filled`` and ``source`` (``detector`` or ``geometry``).
        missing_series: series types the study lacks.
        unplaced: targets without a point.
        measurements: per level the millimetres a segmentation localiser measures
            (:func:`lumbar_ray.segment.measure.with_measurements`); None without one.
    """

    study_id: int
    points: pd.DataFrame
    missing_series: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    measurements: pd.DataFrame | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able report (the per-study file written next to a submission)."""
        points = {
            TARGETS[int(row.target)]: {
                "series_id": int(row.series_id),
                "slice": int(row.slice),
                "x": round(float(row.x), 2),
                "y": round(float(row.y), 2),
                "confidence": round(float(row.confidence), 4),
                "filled": bool(row.filled),
                "source": str(row.source),
            }
            for row in self.points.itertuples(index=False)
        }
        report = {
            "study_id": self.study_id,
            "missing_series": self.missing_series,
            "unplaced_targets": self.unplaced,
            "points": points,
        }
        if self.measurements is not None:  # NaN (not measurable) -> null
            rounded = self.measurements.set_index("level").round(2).astype(object)
            report["measurements"] = rounded.where(rounded.notna(), None).to_dict("index")
        return report


def study_series(
    cache: SeriesCache, series: pd.DataFrame, study_id: int, cached: set[tuple[int, int]]
) -> dict[str, list[CachedSeries]]:
    """A study's cached series by type, as :func:`localise_study` takes them.

    Axial series in series-id order; sagittal ones best first (:func:`~lumbar_ray.localize.geometry.best_sagittal`,
    the one :func:`localise_study` places its points on). Sagittal volumes are loaded (memory-mapped: the detectors
    read every slice); of axial series only the metadata, which is all the geometry needs. Series listed but not
    cached (failed or missing) are left out, and so reported missing.

    Args:
        cache: the cache.
        series: the ``*_series_descriptions.csv`` frame (``study_id``, ``series_id``, ``series_description``).
        study_id: the study.
        cached: ``(study_id, series_id)`` keys the cache holds (:meth:`SeriesCache.cached_keys`).
    """
    rows = series[series["study_id"] == study_id].sort_values("series_id")
    out: dict[str, list[CachedSeries]] = {}
    for row in rows.itertuples(index=False):
        key = (int(row.study_id), int(row.series_id))
        if key not in cached:
            continue
        if row.series_description == AXIAL:
            entry = CachedSeries(np.zeros((0, 0, 0), np.uint8), cache.read_meta(*key))
        else:
            entry = cache.read(*key, mmap=True)
        out.setdefault(str(row.series_description), []).append(entry)
    for description in (SAG_T2, SAG_T1):
        if len(out.get(description, [])) > 1:
            best = best_sagittal(out[description])
            out[description] = [best, *(entry for entry in out[description] if entry is not best)]
    return out


def _sagittal_rows(study_id: int, series: CachedSeries, located: pd.DataFrame) -> list[dict]:
    """POINTS rows (with confidence, filled, source) from a detector's output on ``series``."""
    rows = []
    n_slices = len(series.instance_numbers)
    for row in located.itertuples(index=False):
        if not (np.isfinite(row.x) and np.isfinite(row.y) and np.isfinite(row.slice)):
            continue
        index = int(np.clip(round(float(row.slice)), 0, n_slices - 1))
        rows.append({"study_id": study_id, "target": int(row.target), "series_id": int(series.meta.series_id),
                     "slice": index, "x": float(row.x), "y": float(row.y), "confidence": float(row.confidence),
                     "filled": bool(row.filled), "source": "detector"})  # fmt: skip
    return rows


def relevel_by_canal(
    detections: pd.DataFrame, entry: CachedSeries, canal: dict[int, tuple[np.ndarray, float]], max_mm: float = 20.0
) -> pd.DataFrame:
    """Re-assign the level of each Sagittal T1 detection from the canal levels found on Sagittal T2.

    Left and right foramina of a level lie at the canal's cranio-caudal height, and telling L3/L4 from L4/L5 on a
    lateral slice is much harder for a detector than on the mid-line, where the whole spine shows. So each foramen
    detection takes the level of the nearest detected canal point in the sagittal plane (patient y, z; the
    left-right axis ignored), and is dropped when none lies within ``max_mm``.

    Args:
        detections: :meth:`SagittalDetector.detect` rows on ``entry`` (target = side x level).
        entry: the Sagittal T1 series.
        canal: target index of the spinal canal points (filled ones included) -> (patient point, confidence).
        max_mm: farthest a foramen may lie from its level's canal point in the sagittal plane.
    """
    if detections.empty:
        return detections
    level_index = np.array([target % len(LEVELS) for target in canal])  # TARGETS is condition-major
    anchors = np.stack([point for point, _ in canal.values()])[:, 1:]  # (y, z)
    points = detection_points(detections, entry)[:, 1:]
    distance = np.hypot(*(anchors[None, :, :] - points[:, None, :]).transpose(2, 0, 1))  # (detections, anchors)
    nearest = np.argmin(distance, axis=1)
    near = distance[np.arange(len(points)), nearest] <= max_mm
    target = detections["target"].to_numpy(dtype=np.int64)
    side_offset = target - target % len(LEVELS)  # first target of the detection's side
    out = detections.assign(target=side_offset + level_index[nearest])[near]
    return out.astype(detections.dtypes.to_dict()).reset_index(drop=True)


def detection_points(detections: pd.DataFrame, entry: CachedSeries) -> np.ndarray:
    """``(n, 3)`` patient-space points (mm) of detections (``slice``, ``x``, ``y`` in cache pixels) on ``entry``."""
    points = [cache_point_to_patient(entry, int(row.slice), float(row.x), float(row.y))
              for row in detections.itertuples(index=False)]  # fmt: skip
    return np.array(points, dtype=np.float64).reshape(-1, 3)


def side_of_canal(x_mm: float, canal_x_mm: float, min_offset_mm: float = MIN_SIDE_OFFSET_MM) -> str | None:
    """The patient's side (``left``/``right``) a point at patient x ``x_mm`` lies on, seen from the canal at
    ``canal_x_mm``; None within ``min_offset_mm`` of the canal's plane (the mid-line holds no foramen: a detection
    there is a false positive that would otherwise compete with the real foramen some 15 mm out).

    DICOM's LPS frame has +x towards the patient's left (:data:`SIDES`), whatever the slice order, the field of
    view's centre or a scoliosis: the side is a fact of patient space, not of the slice index.
    """
    offset = x_mm - canal_x_mm
    if abs(offset) < min_offset_mm:
        return None
    return next(side for side, side_sign in SIDES.items() if side_sign == np.sign(offset))


def canal_x_between_foramina(xs: np.ndarray, min_gap_mm: float = MIN_FORAMEN_GAP_MM) -> float | None:
    """The canal's patient x between one level's foramen detections, or None when they do not show both sides.

    The middle of the widest gap between the sorted x of the detections, when that gap is at least
    ``min_gap_mm`` (see :data:`MIN_FORAMEN_GAP_MM`); a narrower one means a single foramen was seen.
    """
    xs = np.sort(np.asarray(xs, dtype=np.float64))
    if len(xs) < 2:
        return None
    gaps = np.diff(xs)
    widest = int(np.argmax(gaps))
    return float((xs[widest] + xs[widest + 1]) / 2.0) if gaps[widest] >= min_gap_mm else None


def slab_centre_x(entry: CachedSeries) -> float:
    """Patient x (mm) of the middle of a sagittal series' slab: halfway between its first and last slices' centres."""
    middle = (entry.meta.size - 1) / 2.0
    ends = (cache_point_to_patient(entry, index, middle, middle)[0] for index in (0, len(entry.meta.slices) - 1))
    return float(np.mean(list(ends)))


def canal_x_by_level(
    level: np.ndarray, xs: np.ndarray, canal: dict[int, tuple[np.ndarray, float]], entry: CachedSeries
) -> np.ndarray:
    """The canal's patient x (mm) at each of the five levels: what the Sagittal T1 foramen sides are taken from.

    Per level, the first known of:

    1. the level's Sagittal T2/STIR canal point (the x of its slice: follows a scoliosis level by level);
    2. the middle of the gap between the level's own left and right foramen detections
       (:func:`canal_x_between_foramina`);
    3. the median of the levels placed by 1 or 2 (the canal moves a few mm between adjacent levels, against the
       ~32 mm between a level's two foramina);
    4. the fallback when nothing places the canal (no Sagittal T2 point and, at every level, one side or no side
       detected): the middle of the Sagittal T1 slab (:func:`slab_centre_x`), i.e. the old slice-range rule, right
       only for a field of view centred on the spine; logged.

    Args:
        level: ``(n,)`` level index 0..4 of each foramen detection.
        xs: ``(n,)`` patient x of each detection.
        canal: target index of the spinal canal points -> (patient point, confidence) (may be empty).
        entry: the Sagittal T1 series the detections lie on.
    """
    out = np.full(len(LEVELS), np.nan)
    for index, name in enumerate(LEVELS):
        spinal = canal.get(target_index("spinal_canal_stenosis", name))
        if spinal is not None:
            out[index] = spinal[0][0]
            continue
        between = canal_x_between_foramina(xs[level == index])
        out[index] = np.nan if between is None else between
    known = np.isfinite(out)
    if not known.any():
        logger.info("series %s: no canal reference for the foramen sides; the slab's middle is used",
                    entry.meta.series_id)  # fmt: skip
    out[~known] = float(np.median(out[known])) if known.any() else slab_centre_x(entry)
    return out


def assign_sides(
    detections: pd.DataFrame, entry: CachedSeries, canal: dict[int, tuple[np.ndarray, float]]
) -> pd.DataFrame:
    """Sagittal T1 detections with the side of each target taken from patient space (:func:`side_of_canal`).

    A detection's side is where its patient x lies against the canal's x at its level
    (:func:`canal_x_by_level`), whatever side its target said (a detector sides by the slice's half of the
    volume, which an off-centre field of view or a scoliosis breaks). Its level is kept; a detection on the
    canal's own plane is dropped.

    Args:
        detections: :meth:`LevelDetector.detect` rows on ``entry`` (target = side x level).
        entry: the Sagittal T1 series.
        canal: see :func:`canal_x_by_level`.
    """
    if detections.empty:
        return detections
    level = detections["target"].to_numpy(dtype=np.int64) % len(LEVELS)  # TARGETS is condition-major
    xs = detection_points(detections, entry)[:, 0]
    reference = canal_x_by_level(level, xs, canal, entry)[level]
    sides = [side_of_canal(x, canal_x) for x, canal_x in zip(xs, reference, strict=True)]
    targets = [-1 if side is None else target_index(f"{side}_neural_foraminal_narrowing", LEVELS[lvl])
               for side, lvl in zip(sides, level, strict=True)]  # fmt: skip
    out = detections.assign(target=targets)
    return out[out["target"] >= 0].astype(detections.dtypes.to_dict()).reset_index(drop=True)


def foramen_detections(
    detections: pd.DataFrame, entry: CachedSeries, canal: dict[int, tuple[np.ndarray, float]]
) -> pd.DataFrame:
    """Sagittal T1 detections with their level from the canal (:func:`relevel_by_canal`, given two canal points
    or more) and their side from patient space (:func:`assign_sides`)."""
    if len(canal) >= 2:
        detections = relevel_by_canal(detections, entry, canal)
    return assign_sides(detections, entry, canal)


def patient_points(points: pd.DataFrame, series_by_id: dict[int, CachedSeries]) -> dict[int, tuple[np.ndarray, float]]:
    """Target -> (patient-space point (mm), confidence) of the sagittal points given (detected or labelled).

    Args:
        points: POINTS rows of one study; optional ``confidence`` (1 when absent) and ``filled`` (a filled point
            has confidence 0) columns. Rows on series not in ``series_by_id`` are ignored.
        series_by_id: the study's cached series (metadata suffices).
    """
    out = {}
    for row in points.itertuples(index=False):
        entry = series_by_id.get(int(row.series_id))
        if entry is None or not (np.isfinite(row.x) and np.isfinite(row.y)):
            continue
        confidence = float(getattr(row, "confidence", 1.0)) * (not bool(getattr(row, "filled", False)))
        out[int(row.target)] = (cache_point_to_patient(entry, int(row.slice), float(row.x), float(row.y)), confidence)
    return out


def _canal_point(patient: dict, level: int) -> tuple[np.ndarray, float] | None:
    spinal = patient.get(target_index("spinal_canal_stenosis", LEVELS[level]))
    if spinal is not None:
        return spinal
    sides = [patient.get(target_index(f"{side}_neural_foraminal_narrowing", LEVELS[level])) for side in SIDES]
    if all(point is not None for point in sides):
        return (sides[0][0] + sides[1][0]) / 2.0, 0.0
    return None


def subarticular_points(patient: dict, level: int, fraction: float) -> dict[str, tuple[np.ndarray, float]]:
    """Patient-space left/right subarticular points of one level from the canal and foramen points.

    Args:
        patient: target index -> (patient point (3,), confidence) of the sagittal points placed.
        level: level index 0..4.
        fraction: how far from the canal towards the foramen the lateral recess lies.

    Returns:
        side -> (point, confidence); empty when neither the canal nor both foramina are known.
    """
    canal = _canal_point(patient, level)
    if canal is None:
        return {}
    out = {}
    for side, sign in SIDES.items():
        foramen = patient.get(target_index(f"{side}_neural_foraminal_narrowing", LEVELS[level]))
        if foramen is None:
            foramen = (canal[0] + np.array([sign * LATERAL_FORAMEN_MM, 0.0, 0.0]), 0.0)
        point = canal[0] + fraction * (foramen[0] - canal[0])
        out[side] = (point, min(canal[1], foramen[1]))
    return out


def axial_rows(study_id: int, axial: list[CachedSeries], patient: dict, fraction: float) -> list[dict]:
    """POINTS rows of the subarticular targets placed by geometry from the sagittal ``patient`` points.

    A point whose nearest axial slice does not image it (:attr:`~lumbar_ray.localize.geometry.AxialHit.covered`:
    outside every field of view, or beyond :data:`~lumbar_ray.localize.geometry.AXIAL_REACH_SLICES` spacings of
    every block) gets no row: the level was not imaged axially, and its target falls back to the prior.

    Args:
        study_id: the study.
        axial: every Axial T2 series of the study (metadata suffices).
        patient: see :func:`patient_points`.
        fraction: see :func:`subarticular_points`.
    """
    rows, beyond = [], []
    for level in range(len(LEVELS)):
        for side, (point, confidence) in subarticular_points(patient, level, fraction).items():
            hit = nearest_axial_slice(point, axial)
            if not hit.covered:  # no axial block images this level: missing, not another level's slice
                beyond.append(f"{side} {LEVELS[level]}")
                continue
            series = axial[hit.series_position]
            rows.append({"study_id": study_id, "target": target_index(f"{side}_subarticular_stenosis", LEVELS[level]),
                         "series_id": int(series.meta.series_id), "slice": hit.slice_index, "x": hit.x,
                         "y": hit.y, "confidence": confidence, "filled": confidence == 0.0,
                         "source": "geometry"})  # fmt: skip
    if beyond:
        logger.info("study %s: no axial stack reaches the subarticular points %s: left without a point",
                    study_id, ", ".join(beyond))  # fmt: skip
    return rows


def localise_study(
    study_id: int,
    series: dict[str, list[CachedSeries]],
    detectors: dict[str, Locator | LevelDetector],
    subarticular_fraction: float = 0.4,
) -> StudyPoints:
    """Place the 25 target points of one study (see the module docstring).

    Args:
        study_id: the study.
        series: series description -> that study's cached series of the type (of several sagittal ones of a
            type the best is used, :func:`~lumbar_ray.localize.geometry.best_sagittal`; every axial series is
            searched). Sagittal volumes must be loaded; axial ones need only their metadata.
        detectors: ``Sagittal T2/STIR`` and/or ``Sagittal T1`` -> its detector (a series type without one gets no
            sagittal points).
        subarticular_fraction: see :func:`subarticular_points`.
    """
    rows: list[dict] = []
    missing = [description for description in SERIES_TYPES if not series.get(description)]
    canal: dict[int, tuple[np.ndarray, float]] = {}
    for description in (SAG_T2, SAG_T1):
        if not series.get(description) or description not in detectors:
            continue
        entry = best_sagittal(series[description])
        if entry.volume.shape[0] == 0:
            raise ValueError(f"study {study_id}: the {description} volume must be loaded to detect levels")
        detector = detectors[description]
        first_left = left_first(entry.meta)
        if description == SAG_T1 and isinstance(detector, LevelDetector):
            detections = foramen_detections(detector.detect(entry.volume, first_left), entry, canal)
            located = detector.resolve(detections, entry.volume.shape[0])
        else:
            located = detector.locate(entry.volume, left_first=first_left)
        new_rows = _sagittal_rows(study_id, entry, located)
        rows += new_rows
        if description == SAG_T2:
            canal = patient_points(pd.DataFrame(new_rows), {int(entry.meta.series_id): entry})
    if series.get(AXIAL) and rows:
        by_id = {int(s.meta.series_id): s for description in (SAG_T2, SAG_T1) for s in series.get(description, [])}
        patient = patient_points(pd.DataFrame(rows), by_id)
        rows += axial_rows(study_id, series[AXIAL], patient, subarticular_fraction)
    frame = pd.DataFrame(rows, columns=list(LOCATED_COLUMNS))
    frame = frame.sort_values("target").reset_index(drop=True)
    frame = frame.astype({"study_id": "int64", "target": "int64", "series_id": "int64", "slice": "int64",
                          "x": "float64", "y": "float64", "confidence": "float64", "filled": "bool"})  # fmt: skip
    placed = set(frame["target"].tolist())
    unplaced = [name for i, name in enumerate(TARGETS) if i not in placed]
    if unplaced:
        logger.info("study %s: %d targets without a point (missing series: %s)", study_id, len(unplaced),
                    missing or "none")  # fmt: skip
    return StudyPoints(int(study_id), frame, missing, unplaced)
