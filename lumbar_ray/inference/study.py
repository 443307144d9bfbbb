"""One study -> its 25 predictions and the points they were read at: the pipeline ``lumbar-ray predict``, the
registered study-level model and ``lumbar-ray serve`` share.

Two halves:

* :func:`read_study`: a study as DICOM files (a folder of any layout, an extracted upload) -> an in-memory cache
  (:class:`~lumbar_ray.data.cache.MemoryCache`) and its series table, exactly as the batch path caches a listed
  study: files grouped by SeriesInstanceUID (:func:`~lumbar_ray.data.dicom.group_series_files`), each series typed
  from its headers (:mod:`lumbar_ray.data.series_type`, a map the caller can extend), read
  (:func:`~lumbar_ray.data.dicom.read_series`) and preprocessed with the model's contract settings
  (:func:`~lumbar_ray.data.volume.preprocess_series`).
* :class:`StudyScorer`: cached series (a :class:`~lumbar_ray.data.cache.SeriesCache` of a batch run, or a study's
  in-memory one) -> the 25 points (:func:`~lumbar_ray.localize.study.localise_study` with the model's detectors),
  the crops of every input geometry (:class:`~lumbar_ray.data.crops.CropDataset`), the fold ensemble's
  probabilities, and the training prior (with the model's temperatures) where a target has no crop.

:func:`study_rows` turns a scored study into submission rows with the point of each target in the original DICOM
coordinates (SOPInstanceUID, InstanceNumber, row, column) and its flags.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from lumbar_ray.baseline import fill_with_prior
from lumbar_ray.config import CropConfig, LocalizeConfig, PreprocessConfig
from lumbar_ray.constants import CONDITION_SERIES, CONDITIONS, SUBMISSION_COLUMNS, TARGETS, row_id
from lumbar_ray.data.cache import MemoryCache, SeriesCache
from lumbar_ray.data.crops import CropDataset
from lumbar_ray.data.dicom import group_series_files, read_series
from lumbar_ray.data.series_type import description_map, series_type
from lumbar_ray.data.volume import preprocess_series
from lumbar_ray.errors import DicomReadError, StudyInputError
from lumbar_ray.localize.study import StudyPoints, localise_study, study_series
from lumbar_ray.segment.measure import with_measurements

logger = logging.getLogger(__name__)

ROW_COLUMNS: tuple[str, ...] = (
    "row_id",
    *SUBMISSION_COLUMNS,
    "study_id",
    "series_id",
    "sop_instance_uid",
    "instance_number",
    "frame",
    "row",
    "column",
    "filled",
    "missing_series",
    "prior",
)
"""A study-level prediction row: the competition's four columns, then where the target was read and its flags.

``sop_instance_uid``, ``instance_number``, ``row`` and ``column`` are the point in the original image's own pixel
grid (``frame``: the 1-based frame of a multi-frame file, else null); all null when the target had no point.
``filled``: the detector did not see the level, its point was placed by the anatomy's order; ``missing_series``:
the study has no series of the type the condition is read on; ``prior``: no crop, the training prior predicted it.
"""
SERIES_COLUMNS = ("study_id", "series_id", "series_description")


def preprocess_settings(contract: Mapping[str, Any], resources: PreprocessConfig | None = None) -> PreprocessConfig:
    """The model's training preprocessing (the contract's settings) with this run's resources and cache."""
    settings = contract["preprocess"]
    resources = resources if resources is not None else PreprocessConfig()
    return resources.model_copy(
        update={"image_size": int(settings["image_size"]), "clip_percentiles": tuple(settings["clip_percentiles"])}
    )


@dataclass
class ReadStudy:
    """A study read from DICOM files into memory.

    Attributes:
        study_id: the study.
        cache: its preprocessed series.
        series: ``study_id, series_id, series_description`` of the series that got a type.
        sop_uids: ``(series_id, file name) -> SOPInstanceUID`` (for the response only: never cached or logged).
        frames: ``(series_id, file name)`` of the multi-frame files (their slices' instance numbers are frames).
        report: one entry per series found: its id, type (or None), how it was typed, slices, skipped files.
        skipped: files that are not readable DICOM: ``{"file", "kind", "reason"}``.
    """

    study_id: int
    cache: MemoryCache
    series: pd.DataFrame
    sop_uids: dict[tuple[int, str], str] = field(default_factory=dict)
    frames: set[tuple[int, str]] = field(default_factory=set)
    report: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def study_files(folder: Path) -> list[Path]:
    """Every file under a study folder (any depth; hidden files and folders left out), in path order."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    visible = [path for path in files if not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    return sorted(visible)


def study_id_from_folder(folder: Path, files: Sequence[Path]) -> int | None:
    """The study id a folder's layout gives: its own name when numeric, or the numeric name of the one top-level
    folder holding every file two levels down (the competition's ``<study_id>/<series_id>/<n>.dcm``: a lone
    ``<series_id>/<n>.dcm`` names a series, not a study); None otherwise."""
    if folder.name.isdigit():
        return int(folder.name)
    parts = [path.relative_to(folder).parts for path in files]
    tops = {part[0] for part in parts}
    if len(tops) == 1 and all(len(part) >= 3 for part in parts):
        top = next(iter(tops))
        return int(top) if top.isdigit() else None
    return None


def series_ids(groups: Sequence[Any]) -> list[int]:
    """One id per series group: the name of the one folder holding all of its files when numeric and unique to it
    (the competition's layout, so ids match its CSVs), else the next free number from 1."""
    names = []
    for group in groups:
        parents = {Path(path).parent.name for path in group.files}
        names.append(int(next(iter(parents))) if len(parents) == 1 and next(iter(parents)).isdigit() else None)
    taken = {name for name in names if name is not None and names.count(name) == 1}
    out, next_free = [], 1
    for name in names:
        if name is not None and name in taken:
            out.append(name)
            continue
        while next_free in taken:
            next_free += 1
        taken.add(next_free)
        out.append(next_free)
    return out


IGNORED_KINDS = frozenset({"no_pixels", "not_grayscale"})
"""Skipped files that do not refuse a study: DICOM objects that are no MR image (a DICOMDIR, a structured report, a
presentation state) and colour images (secondary-capture screenshots), which exports carry beside the series."""
DICOM_LIKE_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".ima"})
"""Names a DICOM image file has: such a file that does not read as DICOM refuses its study (a damaged image);
another file that is no DICOM (``Thumbs.db``, ``README.txt``, a PDF report) is left out and listed."""


def refuses_study(skipped: Mapping[str, str]) -> bool:
    """Whether a skipped file refuses its study (:data:`IGNORED_KINDS`, :data:`DICOM_LIKE_SUFFIXES`): a damaged
    image does (its series would silently lose a slice); a non-image object or a stray document does not."""
    if skipped["kind"] in IGNORED_KINDS:
        return False
    if skipped["kind"] == "not_dicom":
        return Path(skipped["file"]).suffix.lower() in DICOM_LIKE_SUFFIXES
    return True


class _UploadNames(logging.Filter):
    """Drops the records of the thread reading an upload: the reader's warnings name files and folders, and an
    upload's names are the client's (an export may name a folder after the patient). What is wrong with a file goes
    back in the answer instead (:attr:`ReadStudy.skipped`)."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "reading", False)


_QUIETED = ("lumbar_ray.data.dicom", "lumbar_ray.data.volume", __name__)


@contextlib.contextmanager
def _names_unlogged() -> Iterator[None]:
    """While reading an upload in this thread, the reader's loggers drop their records (:class:`_UploadNames`)."""
    for name in _QUIETED:
        chosen = logging.getLogger(name)
        if not any(isinstance(f, _UploadNames) for f in chosen.filters):
            chosen.addFilter(_UploadNames())
    _UploadNames.local.reading = True
    try:
        yield
    finally:
        _UploadNames.local.reading = False


def _skipped(entry: Any, relative_to: Path | None) -> dict[str, str]:
    """A skipped file as a response names it: its path inside the upload, never a server path.

    Args:
        entry: a :class:`~lumbar_ray.data.dicom.SkippedFile` (its base name) or a
            :class:`~lumbar_ray.errors.DicomReadError` (its path).
        relative_to: the upload's folder.
    """
    path = Path(getattr(entry, "path", None) or getattr(entry, "file_name", ""))
    if relative_to is not None and path.is_absolute() and path.is_relative_to(relative_to):
        path = path.relative_to(relative_to)
    elif path.is_absolute():
        path = Path(path.name)
    return {"file": str(path), "kind": str(entry.kind), "reason": str(entry.cause)}


def read_study(
    files: Sequence[Path],
    study_id: int,
    settings: PreprocessConfig,
    series_map: Mapping[str, str] | None = None,
    root: Path | None = None,
) -> ReadStudy:
    """Read a study's DICOM files into memory, as the batch path caches a listed study (module docstring).

    A file that is not readable DICOM is skipped and listed (the caller decides whether that refuses the study); a
    series that cannot be typed is read but left out of :attr:`ReadStudy.series` (its targets get the prior).

    Args:
        files: the study's files (any layout).
        study_id: the study's id (the rows' ``row_id``).
        settings: the model's preprocessing (:func:`preprocess_settings`).
        series_map: SeriesDescription pattern -> series type, before the defaults
            (:func:`~lumbar_ray.data.series_type.description_map`).
        root: the folder the files were uploaded into: skipped files are named relative to it.

    Raises:
        StudyInputError: no file is readable DICOM (422).
    """
    mapping = description_map(series_map)
    with _names_unlogged():
        return _read_study(files, study_id, settings, mapping, root)


def _read_study(files: Sequence[Path], study_id: int, settings: PreprocessConfig, mapping: Mapping[str, str],
                root: Path | None) -> ReadStudy:  # fmt: skip
    groups, skipped = group_series_files([Path(path) for path in files])
    out = ReadStudy(int(study_id), MemoryCache(settings.model_dump()), pd.DataFrame(columns=list(SERIES_COLUMNS)))
    out.skipped = [_skipped(entry, root) for entry in skipped]
    rows = []
    for group, series_id in zip(groups, series_ids(groups), strict=True):
        entry = _read_group(out, group, series_id, settings, mapping, root)
        if entry is not None:
            rows.append(entry)
    if not groups or not any(item.get("slices") for item in out.report):
        named = ", ".join(item["file"] for item in out.skipped[:5])
        raise StudyInputError(named, "no readable DICOM image in the study", status=422)
    out.series = pd.DataFrame(rows, columns=list(SERIES_COLUMNS)).astype({"study_id": "int64", "series_id": "int64"})
    return out


def _read_group(study: ReadStudy, group: Any, series_id: int, settings: PreprocessConfig, mapping: Mapping[str, str],
                root: Path | None) -> dict[str, Any] | None:  # fmt: skip
    """Read, type and cache one series group; its series row, or None when it is unreadable or untyped."""
    item: dict[str, Any] = {"series_id": series_id, "type": None, "typed_by": "", "slices": 0}
    study.report.append(item)
    try:
        series = read_series(list(group.files))
    except DicomReadError as error:
        study.skipped.append(_skipped(error, root))
        item["typed_by"] = "unreadable"
        return None
    study.skipped += [_skipped(entry, root) for entry in getattr(series, "skipped", [])]
    kind, how = series_type(group.description, group.orientation, series.meta, mapping)
    item.update(type=kind, typed_by=how, slices=series.n_slices)
    if kind is None:
        logger.info("series %s left out: %s", series_id, how)
        return None
    volume, meta = preprocess_series(series, settings)
    meta = replace(meta, study_id=study.study_id, series_id=series_id, split="test", series_description=kind)
    study.cache.write(study.study_id, series_id, volume, meta)
    for path, uid in zip(group.files, group.sop_instance_uids, strict=True):
        study.sop_uids[(series_id, Path(path).name)] = uid
    study.frames |= {(series_id, name) for name in _multi_frame_files(meta)}
    return {"study_id": study.study_id, "series_id": series_id, "series_description": kind}


def _multi_frame_files(meta: Any) -> set[str]:
    """File names that give more than one slice of a series (multi-frame files)."""
    names = pd.Series(meta.slices.file_name)
    counts = names.value_counts()
    return set(counts[counts > 1].index)


class CropModel(Protocol):
    """What :class:`StudyScorer` needs of a fold ensemble (a :class:`~lumbar_ray.registry.FoldEnsemble`)."""

    @property
    def inputs(self) -> dict[str, CropConfig]:
        """Input name -> the crop geometry its crops are cut with."""
        ...

    def predict_crops(self, model_input: Mapping[str, np.ndarray], fold: int | None = None) -> np.ndarray:
        """Crops by input name -> ``(B, 25, 3)`` probabilities."""
        ...

    def calibrated_prior(self, fold: int | None = None) -> np.ndarray | None:
        """What the model predicts for a target without a crop."""
        ...


@dataclass
class StudyInput:
    """One study to score: its id, the cache holding its series and its series rows.

    Attributes:
        study_id: the study.
        cache: a :class:`SeriesCache` or :class:`MemoryCache`.
        series: its ``study_id, series_id, series_description`` rows (series not cached count as missing).
        cached: the keys the cache holds (computed from the cache when None; pass it for a batch on one cache).
    """

    study_id: int
    cache: SeriesCache | MemoryCache
    series: pd.DataFrame
    cached: set[tuple[int, int]] | None = None


@dataclass
class ScoredStudy:
    """One study's predictions.

    Attributes:
        study_id: the study.
        probs: ``(25, 3)`` float64, rows summing to 1.
        points: the points used and what could not be placed.
        has_crop: ``(25,)`` whether each target had a crop (False: the prior predicted it).
    """

    study_id: int
    probs: np.ndarray
    points: StudyPoints
    has_crop: np.ndarray

    def report(self) -> dict[str, Any]:
        """The JSON-able per-study report (the points used; the targets the prior predicted)."""
        return self.points.to_json() | {"prior_targets": [TARGETS[t] for t in np.flatnonzero(~self.has_crop)]}


class StudyScorer:
    """Cached series -> 25 points -> crops -> the fold ensemble -> probabilities, the prior where no crop.

    Args:
        model: the fold ensemble (its crop-level entry).
        detectors: series type -> level detector (:func:`~lumbar_ray.localize.detector.load_detectors`).
        localize: the model's localisation settings.
    """

    def __init__(self, model: CropModel, detectors: Mapping[str, Any], localize: LocalizeConfig) -> None:
        self.model = model
        self.detectors = dict(detectors)
        self.localize = localize

    def _crops(self, study: StudyInput) -> tuple[dict[str, np.ndarray], np.ndarray, StudyPoints]:
        """One study's crops by input name, its ``(25,)`` crop mask and its points."""
        cached = study.cached if study.cached is not None else study.cache.cached_keys()
        series = study_series(study.cache, study.series, int(study.study_id), cached)
        points = localise_study(int(study.study_id), series, self.detectors, self.localize.subarticular_fraction)
        points = with_measurements(points, series, self.detectors)
        items = {name: CropDataset(study.cache, [int(study.study_id)], points.points, crop)[0]
                 for name, crop in self.model.inputs.items()}  # fmt: skip
        mask = np.logical_and.reduce([item["mask"].numpy() for item in items.values()])
        return {name: item["crops"].numpy() for name, item in items.items()}, mask, points

    def score(self, studies: Sequence[StudyInput], fold: int | None = None) -> list[ScoredStudy]:
        """Score studies in one forward pass of the ensemble (see the class docstring).

        Args:
            studies: the studies.
            fold: one fold's model (its held-out studies), or None for the mean over folds.
        """
        if not studies:
            return []
        crops, masks, points = zip(*(self._crops(study) for study in studies), strict=True)
        stacked = {name: np.stack([c[name] for c in crops]) for name in self.model.inputs}
        probs = np.asarray(self.model.predict_crops(stacked, fold=fold), dtype=np.float64)
        masks = np.stack(masks)
        prior = self.model.calibrated_prior(fold)
        if prior is not None:
            probs = fill_with_prior(probs, masks, prior)  # no crop: the training prior
        else:
            masks = np.ones_like(masks)  # a model without a prior predicts every target from its (zero) crop
        probs /= probs.sum(axis=-1, keepdims=True)  # float32 softmax means: exact row sums in float64
        return [ScoredStudy(int(study.study_id), p, pts, m)
                for study, p, pts, m in zip(studies, probs, points, masks, strict=True)]  # fmt: skip


def _original_point(study: ReadStudy | None, cache: Any, row: Any) -> dict[str, Any]:
    """A target's point in its original image: SOPInstanceUID, InstanceNumber or frame, row, column."""
    entry = cache.read(int(row.study_id), int(row.series_id))
    index = int(row.slice)
    number = entry.meta.slices.instance_number[index]
    scale_y, scale_x = entry.scale[index]
    file_name = entry.meta.slices.file_name[index]
    key = (int(row.series_id), file_name)
    multi_frame = study is not None and key in study.frames
    return {
        "series_id": int(row.series_id),
        "sop_instance_uid": None if study is None else study.sop_uids.get(key),
        "instance_number": None if multi_frame or number is None else int(number),
        "frame": int(number) if multi_frame and number is not None else None,
        "row": round((float(row.y) + 0.5) / scale_y - 0.5, 2),
        "column": round((float(row.x) + 0.5) / scale_x - 0.5, 2),
    }


def study_rows(scored: ScoredStudy, cache: Any, study: ReadStudy | None = None) -> pd.DataFrame:
    """The 25 rows of a scored study (:data:`ROW_COLUMNS`), in the competition's row order.

    Args:
        scored: the study's predictions.
        cache: the cache its series were read from.
        study: the study as read from DICOM (gives SOPInstanceUIDs and frames); None for a cached batch study.
    """
    by_target = {int(row.target): row for row in scored.points.points.itertuples(index=False)}
    missing = set(scored.points.missing_series)
    rows = []
    for index, target in enumerate(TARGETS):
        condition = next(c for c in CONDITIONS if target.startswith(c))
        level = target[len(condition) + 1 :]
        point = by_target.get(index)
        located = _original_point(study, cache, point) if point is not None else {}
        rows.append({
            "row_id": row_id(scored.study_id, condition, level),
            **dict(zip(SUBMISSION_COLUMNS, scored.probs[index].tolist(), strict=True)),
            "study_id": scored.study_id,
            "series_id": located.get("series_id"),
            "sop_instance_uid": located.get("sop_instance_uid"),
            "instance_number": located.get("instance_number"),
            "frame": located.get("frame"),
            "row": located.get("row"),
            "column": located.get("column"),
            "filled": bool(point.filled) if point is not None else False,
            "missing_series": CONDITION_SERIES[condition] in missing,
            "prior": not bool(scored.has_crop[index]),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))
