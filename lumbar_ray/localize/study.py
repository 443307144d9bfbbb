"""All 25 target points of one study from its cached series: sagittal detectors, then axial slices by geometry.

1. Sagittal T2/STIR: the canal detector places each level's point (slice + in-plane); Sagittal T1: the foramen
   detector places the left and right points. Missing or duplicate detections are resolved by the anatomy's order
   inside the detector (:func:`lumbar_ray.localize.levels.resolve_levels`): a study is never dropped.
2. Axial T2: each level's subarticular points are built in patient space, ``subarticular_fraction`` of the way
   from the canal point to the same side's foramen point (the lateral recess lies between the two), and each is
   assigned the Axial T2 slice, over every axial series and stack of the study, whose plane is nearest
   (:func:`lumbar_ray.localize.geometry.nearest_axial_slice`); its projection is the in-plane point.

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
from lumbar_ray.localize.geometry import cache_point_to_patient, left_first, nearest_axial_slice

logger = logging.getLogger(__name__)

SAG_T2, SAG_T1, AXIAL = "Sagittal T2/STIR", "Sagittal T1", "Axial T2"
LOCATED_COLUMNS = (*POINT_COLUMNS, "confidence", "filled", "source")
# Patient-left is +x in DICOM's LPS frame; the foramen lies ~15-17 mm lateral of the canal in an adult lumbar spine.
LATERAL_FORAMEN_MM = 16.0
SIDES = {"left": 1.0, "right": -1.0}


class Locator(Protocol):
    """What :func:`localise_study` needs of a sagittal detector: one point per target of its series type.

    :class:`lumbar_ray.localize.detector.SagittalDetector` is one; a test can stand in with the labelled points.
    """

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """One row per target: target, slice, x, y, confidence, filled (``left_first``: slice 0 is patient-left)."""
        ...


@runtime_checkable
class LevelDetector(Locator, Protocol):
    """A :class:`Locator` whose raw detections can be re-levelled before they are resolved: on Sagittal T1 the
    foramina then take their levels from the canal found on Sagittal T2 (:func:`relevel_by_canal`)."""

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
    """

    study_id: int
    points: pd.DataFrame
    missing_series: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

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
        return {
            "study_id": self.study_id,
            "missing_series": self.missing_series,
            "unplaced_targets": self.unplaced,
            "points": points,
        }


def study_series(
    cache: SeriesCache, series: pd.DataFrame, study_id: int, cached: set[tuple[int, int]]
) -> dict[str, list[CachedSeries]]:
    """A study's cached series by type, in series-id order, as :func:`localise_study` takes them.

    Sagittal volumes are loaded (memory-mapped: the detectors read every slice); of axial series only the
    metadata, which is all the geometry needs. Series listed but not cached (failed or missing) are left out, and
    so reported missing.

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
    out = []
    for row in detections.itertuples(index=False):
        point = cache_point_to_patient(entry, int(row.slice), float(row.x), float(row.y))[1:]
        distance = np.hypot(*(anchors - point).T)
        nearest = int(np.argmin(distance))
        if distance[nearest] > max_mm:
            continue
        side_offset = int(row.target) - int(row.target) % len(LEVELS)  # first target of the detection's side
        out.append((side_offset + int(level_index[nearest]), *row[1:]))
    return pd.DataFrame(out, columns=detections.columns).astype(detections.dtypes.to_dict())


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
    """POINTS rows of the ten subarticular targets placed by geometry from the sagittal ``patient`` points.

    Args:
        study_id: the study.
        axial: every Axial T2 series of the study (metadata suffices).
        patient: see :func:`patient_points`.
        fraction: see :func:`subarticular_points`.
    """
    rows = []
    for level in range(len(LEVELS)):
        for side, (point, confidence) in subarticular_points(patient, level, fraction).items():
            hit = nearest_axial_slice(point, axial)
            series = axial[hit.series_position]
            rows.append({"study_id": study_id, "target": target_index(f"{side}_subarticular_stenosis", LEVELS[level]),
                         "series_id": int(series.meta.series_id), "slice": hit.slice_index, "x": hit.x,
                         "y": hit.y, "confidence": confidence, "filled": confidence == 0.0,
                         "source": "geometry"})  # fmt: skip
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
        series: series description -> that study's cached series of the type (the first sagittal one of a
            type is used, as the label coordinates do; every axial series is searched). Sagittal volumes must be
            loaded; axial ones need only their metadata.
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
        entry = series[description][0]
        if entry.volume.shape[0] == 0:
            raise ValueError(f"study {study_id}: the {description} volume must be loaded to detect levels")
        detector = detectors[description]
        first_left = left_first(entry.meta)
        if description == SAG_T1 and len(canal) >= 2 and isinstance(detector, LevelDetector):
            detections = relevel_by_canal(detector.detect(entry.volume, first_left), entry, canal)
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
