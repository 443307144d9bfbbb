"""Load and validate a folder in the RSNA 2024 lumbar spine competition layout.

The layout (any part may be absent: a folder can be train-only or test-only)::

    train.csv                        study_id + 25 label columns (empty cell = not labelled)
    train_series_descriptions.csv    study_id, series_id, series_description
    train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    test_series_descriptions.csv     study_id, series_id, series_description
    sample_submission.csv            row_id, normal_mild, moderate, severe
    train_images/<study_id>/<series_id>/<instance_number>.dcm
    test_images/<study_id>/<series_id>/<instance_number>.dcm

The folder may also be a URI that pyarrow reads (``s3://bucket/rsna``, see :func:`lumbar_ray.data.cache.filesystem`):
its CSVs are then read from object storage and its image folders are URIs too (strings; local ones are paths).

Every malformed file raises :class:`RsnaFormatError`, whose message names the file, the CSV line (the
header is line 1) and the offending value, so a broken export can be fixed without a debugger. Facts about
well-formed data that a user should know (empty cells, missing series, ...) are not errors:
:func:`build_report` lists them.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from lumbar_ray.constants import (
    CONDITION_GROUPS,
    CONDITION_TITLES,
    IGNORE_INDEX,
    LEVEL_TITLES,
    LEVELS,
    SERIES_TYPES,
    SEVERITIES,
    SUBMISSION_COLUMNS,
    TARGETS,
)
from lumbar_ray.data.cache import filesystem, join_location
from lumbar_ray.errors import RsnaFormatError
from lumbar_ray.labels import encode_labels

logger = logging.getLogger(__name__)

TRAIN_CSV = "train.csv"
TRAIN_SERIES_CSV = "train_series_descriptions.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
TEST_SERIES_CSV = "test_series_descriptions.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"

SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "instance_number",
    "condition",
    "level",
    "x",
    "y",
)

SUBMISSION_FILE_COLUMNS: tuple[str, ...] = ("row_id", *SUBMISSION_COLUMNS)

# Ids are non-negative decimal integers; 18 digits keep them inside int64 (real series ids have 10 digits).
_INT_PATTERN = r"\d{1,18}"
# Report at most this many ids inline; the full lists stay in the report's fields.
_MAX_LISTED = 10


@dataclass
class RsnaData:
    """The typed tables of an RSNA-format folder; a file that is absent is ``None``.

    Attributes:
        root: the folder (a :class:`~pathlib.Path`), or its URI (a string).
        train: ``study_id`` (int64) + the 25 :data:`TARGETS` columns, categorical over :data:`SEVERITIES`
            (NaN = empty cell), in ``train.csv`` column order.
        train_series: ``study_id``, ``series_id`` (int64), ``series_description`` (str).
        coordinates: ``study_id``, ``series_id``, ``instance_number`` (int64), ``condition``, ``level`` (str,
            as written in the file, e.g. ``Spinal Canal Stenosis``, ``L1/L2``), ``x``, ``y`` (float64).
        test_series: like ``train_series``.
        sample_submission: ``row_id`` (str) + the three probability columns (float64).
        train_images_dir: ``train_images/`` if it exists (a URI under a URI root).
        test_images_dir: ``test_images/`` if it exists (likewise).
    """

    root: Path | str
    train: pd.DataFrame | None = None
    train_series: pd.DataFrame | None = None
    coordinates: pd.DataFrame | None = None
    test_series: pd.DataFrame | None = None
    sample_submission: pd.DataFrame | None = None
    train_images_dir: Path | str | None = None
    test_images_dir: Path | str | None = None


# --- reading helpers


def _line(index: int) -> int:
    """CSV line of a row of a frame read with a RangeIndex: the header is line 1."""
    return int(index) + 2


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_bytes(uri: str) -> io.BytesIO:
    """The whole of a file in object storage (a competition CSV is a few MB at most).

    Raises:
        FileNotFoundError: naming the URI, if the file is absent or cannot be read (no such bucket, no access).
    """
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return io.BytesIO(stream.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {uri}") from None
    except OSError as error:
        raise FileNotFoundError(f"cannot read {uri}: {_one_line(error)}") from None


def _read_csv(path: Path | str) -> pd.DataFrame:
    """Read every cell as a string so that validation, not pandas' guessing, decides what is malformed.

    Blank lines are read as empty rows and then dropped, so the index of the remaining rows still maps to
    their CSV line (see :func:`_line`). A URI (a string, see :func:`lumbar_ray.data.cache.join_location`) is read
    whole through its pyarrow filesystem first.
    """
    source = _read_bytes(path) if isinstance(path, str) else path
    try:
        frame = pd.read_csv(
            source, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False, index_col=False
        )
    except pd.errors.ParserError as error:
        raise RsnaFormatError(path, 1, str(error), "unreadable CSV") from error
    except pd.errors.EmptyDataError as error:
        raise RsnaFormatError(path, 1, "", "empty file") from error
    blank = (frame == "").all(axis=1) if len(frame.columns) else pd.Series(False, index=frame.index)
    return frame.loc[~blank]


def _require_columns(frame: pd.DataFrame, path: Path | str, required: Sequence[str]) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise RsnaFormatError(path, 1, missing, f"missing column(s) (header has {list(frame.columns)})")


def _first_bad(mask: pd.Series) -> int | None:
    """Index label of the first True entry of ``mask``, or None."""
    hits = mask.to_numpy().nonzero()[0]
    return None if len(hits) == 0 else mask.index[hits[0]]


def _parse_int(frame: pd.DataFrame, path: Path | str, column: str) -> pd.Series:
    values = frame[column].str.strip()
    bad = _first_bad(~values.str.fullmatch(_INT_PATTERN))
    if bad is not None:
        raise RsnaFormatError(path, _line(bad), frame.at[bad, column], f"non-integer {column}")
    return values.astype("int64")


def _parse_float(frame: pd.DataFrame, path: Path | str, column: str) -> pd.Series:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce").astype("float64")
    bad = _first_bad(~np.isfinite(values))
    if bad is not None:
        raise RsnaFormatError(path, _line(bad), frame.at[bad, column], f"non-numeric {column}")
    return values


def _check_allowed(frame: pd.DataFrame, path: Path | str, column: str, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    bad = _first_bad(~frame[column].isin(allowed))
    if bad is not None:
        raise RsnaFormatError(
            path,
            _line(bad),
            frame.at[bad, column],
            f"unknown {what} in column {column!r} (expected one of {allowed})",
        )


def _check_unique(frame: pd.DataFrame, path: Path | str, columns: list[str], what: str) -> None:
    duplicated = frame.duplicated(columns, keep="first")
    bad = _first_bad(duplicated)
    if bad is not None:
        key = tuple(frame.loc[bad, columns])
        first = frame.index[(frame[columns] == frame.loc[bad, columns]).all(axis=1).to_numpy()][0]
        value = key[0] if len(key) == 1 else key
        raise RsnaFormatError(path, _line(bad), value, f"duplicate {what} (first at line {_line(first)})")


# --- loaders


def load_train(path: Path | str) -> pd.DataFrame:
    """Load and validate ``train.csv``.

    Args:
        path: the file.

    Returns:
        ``study_id`` (int64) + the 25 targets (categorical over :data:`SEVERITIES`, NaN for empty cells).

    Raises:
        RsnaFormatError: on a missing or unknown column, a non-integer study id, an unknown severity or a
            duplicate study.
    """
    path = join_location(path)
    frame = _read_csv(path)
    _require_columns(frame, path, ["study_id", *TARGETS])
    unknown = [column for column in frame.columns if column not in ("study_id", *TARGETS)]
    if unknown:
        raise RsnaFormatError(path, 1, unknown[0], f"unknown label column (expected study_id and {TARGETS[0]}...)")
    study_ids = _parse_int(frame, path, "study_id")
    targets = frame[list(TARGETS)]
    bad_cells = ~targets.isin(("", *SEVERITIES))
    bad_row = _first_bad(bad_cells.any(axis=1))
    if bad_row is not None:
        column = bad_cells.columns[bad_cells.loc[bad_row].to_numpy().argmax()]
        raise RsnaFormatError(
            path,
            _line(bad_row),
            frame.at[bad_row, column],
            f"unknown severity in column {column!r} (expected one of {SEVERITIES} or empty)",
        )
    result = pd.DataFrame({"study_id": study_ids})
    _check_unique(result, path, ["study_id"], "study row")
    dtype = pd.CategoricalDtype(list(SEVERITIES), ordered=True)
    for target in TARGETS:
        result[target] = targets[target].where(targets[target] != "").astype(dtype)
    return result.reset_index(drop=True)


def load_series(path: Path | str) -> pd.DataFrame:
    """Load and validate a ``*_series_descriptions.csv``.

    Raises:
        RsnaFormatError: on a missing column, a non-integer id, an unknown description or a duplicate series.
    """
    path = join_location(path)
    frame = _read_csv(path)
    _require_columns(frame, path, SERIES_COLUMNS)
    result = pd.DataFrame(
        {
            "study_id": _parse_int(frame, path, "study_id"),
            "series_id": _parse_int(frame, path, "series_id"),
            "series_description": frame["series_description"],
        }
    )
    _check_allowed(result, path, "series_description", SERIES_TYPES, "series description")
    # Series ids are unique over the whole dataset (DICOM UIDs), not only within a study.
    _check_unique(result, path, ["series_id"], "series row")
    return result.reset_index(drop=True)


def load_coordinates(path: Path | str, series: pd.DataFrame | None = None) -> pd.DataFrame:
    """Load and validate ``train_label_coordinates.csv``.

    Args:
        path: the file.
        series: the train series descriptions; when given, every coordinate must point at a series of its
            study.

    Raises:
        RsnaFormatError: on a missing column, a non-integer id, a non-numeric coordinate, an unknown condition
            or level, or a series that the series descriptions do not list for that study.
    """
    path = join_location(path)
    frame = _read_csv(path)
    _require_columns(frame, path, COORDINATE_COLUMNS)
    _check_allowed(frame, path, "condition", CONDITION_TITLES.values(), "condition")
    _check_allowed(frame, path, "level", LEVEL_TITLES.values(), "level")
    result = pd.DataFrame(
        {
            "study_id": _parse_int(frame, path, "study_id"),
            "series_id": _parse_int(frame, path, "series_id"),
            "instance_number": _parse_int(frame, path, "instance_number"),
            "condition": frame["condition"],
            "level": frame["level"],
            "x": _parse_float(frame, path, "x"),
            "y": _parse_float(frame, path, "y"),
        }
    )
    if series is not None:
        known = pd.MultiIndex.from_frame(series[["study_id", "series_id"]])
        pairs = pd.MultiIndex.from_frame(result[["study_id", "series_id"]])
        bad = _first_bad(pd.Series(~pairs.isin(known), index=result.index))
        if bad is not None:
            raise RsnaFormatError(
                path,
                _line(bad),
                int(result.at[bad, "series_id"]),
                f"series is not listed for study {int(result.at[bad, 'study_id'])} in {TRAIN_SERIES_CSV}",
            )
    return result.reset_index(drop=True)


def load_sample_submission(path: Path | str) -> pd.DataFrame:
    """Load and validate ``sample_submission.csv`` (columns, row id format, numeric probabilities).

    Raises:
        RsnaFormatError: on a missing column, a malformed row id or a non-numeric probability.
    """
    path = join_location(path)
    frame = _read_csv(path)
    _require_columns(frame, path, SUBMISSION_FILE_COLUMNS)
    # reindex: an empty frame's partition has no columns at all (a dataset without test studies)
    parts = frame["row_id"].astype(str).str.partition("_").reindex(columns=[0, 1, 2])
    study, target = parts[0].astype(str), parts[2].astype(str)
    malformed = ~study.str.fullmatch(_INT_PATTERN) | ~target.isin(TARGETS)
    bad = _first_bad(malformed)
    if bad is not None:
        raise RsnaFormatError(
            path,
            _line(bad),
            frame.at[bad, "row_id"],
            "malformed row_id (expected <study_id>_<condition>_<level>)",
        )
    result = pd.DataFrame({"row_id": frame["row_id"]})
    for column in SUBMISSION_COLUMNS:
        result[column] = _parse_float(frame, path, column)
    return result.reset_index(drop=True)


def _contents(root: Path | str) -> tuple[set[str], set[str]]:
    """The names of the files and of the folders directly in ``root`` (a folder or a URI).

    Raises:
        FileNotFoundError: naming ``root``, if it is not a folder (for object storage: no such bucket or prefix)
            or cannot be listed.
    """
    fs, path = filesystem(root)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(path)
        entries = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"RSNA data folder not found: {root}") from None
    except OSError as error:  # no access, no such endpoint, ...: still one line naming the root
        raise FileNotFoundError(f"cannot list RSNA data folder {root}: {_one_line(error)}") from None
    files = {entry.base_name for entry in entries if entry.type == pafs.FileType.File}
    return files, {entry.base_name for entry in entries if entry.type == pafs.FileType.Directory}


def load_rsna(root: Path | str) -> RsnaData:
    """Load and validate every competition file present under ``root``.

    Args:
        root: an RSNA-format folder (train-only, test-only or both), or its URI (``s3://bucket/rsna``).

    Returns:
        The typed tables; absent files are ``None``.

    Raises:
        FileNotFoundError: if ``root`` is not a folder (no such bucket or prefix) or holds none of the
            competition CSVs; the message names ``root``.
        RsnaFormatError: if a present file is malformed.
    """
    root = join_location(root)
    files, folders = _contents(root)
    names = (TRAIN_CSV, TRAIN_SERIES_CSV, COORDINATES_CSV, TEST_SERIES_CSV, SAMPLE_SUBMISSION_CSV)
    present = {name: join_location(root, name) for name in names if name in files}
    if not present:
        raise FileNotFoundError(f"none of {names} found in {root}")
    train = load_train(present[TRAIN_CSV]) if TRAIN_CSV in present else None
    train_series = load_series(present[TRAIN_SERIES_CSV]) if TRAIN_SERIES_CSV in present else None
    coordinates = None
    if COORDINATES_CSV in present:
        if train_series is None:
            # Without the series table the series ids cannot be checked; the rest of the file still is.
            logger.warning("%s without %s: series ids of coordinates not checked", COORDINATES_CSV, TRAIN_SERIES_CSV)
        coordinates = load_coordinates(present[COORDINATES_CSV], train_series)
    data = RsnaData(
        root=root,
        train=train,
        train_series=train_series,
        coordinates=coordinates,
        test_series=load_series(present[TEST_SERIES_CSV]) if TEST_SERIES_CSV in present else None,
        sample_submission=(
            load_sample_submission(present[SAMPLE_SUBMISSION_CSV]) if SAMPLE_SUBMISSION_CSV in present else None
        ),
        train_images_dir=join_location(root, TRAIN_IMAGES) if TRAIN_IMAGES in folders else None,
        test_images_dir=join_location(root, TEST_IMAGES) if TEST_IMAGES in folders else None,
    )
    logger.info("loaded RSNA data from %s: %s", root, ", ".join(sorted(present)))
    return data


# --- label encoding


@dataclass
class DataReport:
    """What a folder holds and which gaps it has (none of these is an error).

    Attributes:
        root: the folder.
        n_studies: studies in ``train.csv`` (or, without it, in the train series descriptions).
        n_series: train series.
        series_by_type: train series per description.
        empty_label_cells: empty cells of ``train.csv``.
        studies_with_empty_labels: studies with at least one empty cell.
        studies_missing_series: per series type, the studies without a series of that type.
        multi_series_counts: per series type, ``{k: number of studies with k >= 2 series of that type}``.
        studies_without_series: studies of ``train.csv`` without any series.
        series_without_study: series whose study is not in ``train.csv``.
        class_counts: per condition group, the count of each severity.
        any_severe_spinal_studies: studies with at least one severe spinal level.
        n_coordinates: rows of the coordinates file (None if absent).
        n_test_studies: studies in the test series descriptions.
        n_test_series: test series.
        missing_image_series: per image folder, ``(study_id, series_id)`` without a series folder; None when
            images were not checked.
    """

    root: str
    n_studies: int = 0
    n_series: int = 0
    series_by_type: dict[str, int] = field(default_factory=dict)
    empty_label_cells: int = 0
    studies_with_empty_labels: int = 0
    studies_missing_series: dict[str, list[int]] = field(default_factory=dict)
    multi_series_counts: dict[str, dict[int, int]] = field(default_factory=dict)
    studies_without_series: list[int] = field(default_factory=list)
    series_without_study: list[int] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    any_severe_spinal_studies: int = 0
    n_coordinates: int | None = None
    n_test_studies: int = 0
    n_test_series: int = 0
    missing_image_series: dict[str, list[tuple[int, int]]] | None = None

    @property
    def studies_with_multiple_series(self) -> dict[str, int]:
        """Per series type, the number of studies with more than one series of that type."""
        return {kind: sum(counts.values()) for kind, counts in self.multi_series_counts.items()}

    @property
    def class_frequencies(self) -> dict[str, dict[str, float]]:
        """Per condition group, the fraction of each severity among labelled cells."""
        result = {}
        for group, counts in self.class_counts.items():
            total = sum(counts.values())
            result[group] = {severity: (count / total if total else 0.0) for severity, count in counts.items()}
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (str keys, lists instead of tuples), e.g. for ``mlflow.log_dict``."""
        return {
            "root": self.root,
            "n_studies": self.n_studies,
            "n_series": self.n_series,
            "series_by_type": dict(self.series_by_type),
            "empty_label_cells": self.empty_label_cells,
            "studies_with_empty_labels": self.studies_with_empty_labels,
            "studies_missing_series": {kind: list(ids) for kind, ids in self.studies_missing_series.items()},
            "studies_with_multiple_series": self.studies_with_multiple_series,
            "multi_series_counts": {
                kind: {str(k): v for k, v in counts.items()} for kind, counts in self.multi_series_counts.items()
            },
            "studies_without_series": list(self.studies_without_series),
            "series_without_study": list(self.series_without_study),
            "class_counts": {group: dict(counts) for group, counts in self.class_counts.items()},
            "class_frequencies": self.class_frequencies,
            "any_severe_spinal_studies": self.any_severe_spinal_studies,
            "n_coordinates": self.n_coordinates,
            "n_test_studies": self.n_test_studies,
            "n_test_series": self.n_test_series,
            "missing_image_series": (
                None
                if self.missing_image_series is None
                else {name: [list(pair) for pair in pairs] for name, pairs in self.missing_image_series.items()}
            ),
        }

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"RSNA data report for {self.root}"]
        lines.append(
            f"  train: {self.n_studies:,} studies; {self.empty_label_cells:,} empty label cells in "
            f"{self.studies_with_empty_labels:,} studies"
        )
        by_type = ", ".join(f"{kind} {count:,}" for kind, count in self.series_by_type.items())
        lines.append(f"  series: {self.n_series:,} ({by_type})")
        for kind, ids in self.studies_missing_series.items():
            lines.append(f"  studies without {kind}: {len(ids):,}{_listed(ids)}")
        for kind, counts in self.multi_series_counts.items():
            detail = ", ".join(f"{k} series: {v:,}" for k, v in sorted(counts.items()))
            total = sum(counts.values())
            lines.append(f"  studies with more than one {kind} series: {total:,}" + (f" ({detail})" if total else ""))
        lines.append(
            f"  studies in train.csv without any series: {len(self.studies_without_series):,}"
            f"{_listed(self.studies_without_series)}"
        )
        lines.append(
            f"  series whose study is not in train.csv: {len(self.series_without_study):,}"
            f"{_listed(self.series_without_study)}"
        )
        if self.class_counts:
            lines.append(f"  class frequencies ({' / '.join(SEVERITIES)}):")
            for group, freqs in self.class_frequencies.items():
                shares = " / ".join(f"{100 * share:.1f}%" for share in freqs.values())
                lines.append(f"    {group}: {shares} (n={sum(self.class_counts[group].values()):,})")
            share = self.any_severe_spinal_studies / self.n_studies if self.n_studies else 0.0
            severe = self.any_severe_spinal_studies
            lines.append(f"  studies with a severe spinal level: {severe:,} ({100 * share:.1f}%)")
        if self.n_coordinates is not None:
            lines.append(f"  label coordinates: {self.n_coordinates:,} rows")
        if self.n_test_series:
            lines.append(f"  test: {self.n_test_studies:,} studies, {self.n_test_series:,} series")
        if self.missing_image_series is None:
            lines.append("  image folders: not checked")
        else:
            for name, pairs in self.missing_image_series.items():
                listed = _listed([f"{study}/{series}" for study, series in pairs])
                lines.append(f"  series folders missing under {name}/: {len(pairs):,}{listed}")
        return "\n".join(lines)


def _listed(values: Sequence[Any]) -> str:
    """`` (a, b, ...)`` with at most :data:`_MAX_LISTED` values, or an empty string."""
    if not len(values):
        return ""
    shown = ", ".join(str(value) for value in values[:_MAX_LISTED])
    more = f", ... {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return f" ({shown}{more})"


def _series_gaps(study_ids: np.ndarray, series: pd.DataFrame) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """Studies without a series type, and the histogram of studies with several series of a type."""
    counts = (
        series.groupby(["study_id", "series_description"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=study_ids, columns=list(SERIES_TYPES), fill_value=0)
    )
    missing = {kind: [int(s) for s in counts.index[counts[kind].to_numpy() == 0]] for kind in SERIES_TYPES}
    multiple = {}
    for kind in SERIES_TYPES:
        several = counts[kind][counts[kind] > 1].value_counts().sort_index()
        multiple[kind] = {int(k): int(v) for k, v in several.items()}
    return missing, multiple


def _class_counts(labels: np.ndarray) -> dict[str, dict[str, int]]:
    result = {}
    for group, conditions in CONDITION_GROUPS.items():
        columns = [TARGETS.index(f"{condition}_{level}") for condition in conditions for level in LEVELS]
        values = labels[:, columns]
        result[group] = {severity: int((values == index).sum()) for index, severity in enumerate(SEVERITIES)}
    return result


def _missing_series_folders(images_dir: Path, series: pd.DataFrame) -> list[tuple[int, int]]:
    """``(study, series)`` pairs without a folder; lists each study folder once instead of globbing files."""
    missing = []
    for study_id, group in series.groupby("study_id", sort=True):
        study_dir = images_dir / str(study_id)
        try:
            with os.scandir(study_dir) as entries:
                present = {entry.name for entry in entries if entry.is_dir()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing.extend((int(study_id), int(s)) for s in sorted(group["series_id"]) if str(s) not in present)
    return missing


def build_report(data: RsnaData, check_images: bool = False) -> DataReport:
    """Summarise a loaded folder: sizes, empty labels, missing or repeated series, class balance.

    Args:
        data: from :func:`load_rsna`.
        check_images: also list series whose folder is missing under ``train_images/`` / ``test_images/``
            (one directory listing per study, no walk over the DICOM files).

    Returns:
        The report; ``report.format()`` renders it.
    """
    report = DataReport(root=str(data.root))
    series = data.train_series
    if data.train is not None:
        study_ids, labels = encode_labels(data.train)
        empty = labels == IGNORE_INDEX
        report.empty_label_cells = int(empty.sum())
        report.studies_with_empty_labels = int(empty.any(axis=1).sum())
        report.class_counts = _class_counts(labels)
        spinal = [TARGETS.index(f"spinal_canal_stenosis_{level}") for level in LEVELS]
        report.any_severe_spinal_studies = int((labels[:, spinal] == SEVERITIES.index("Severe")).any(axis=1).sum())
    elif series is not None:
        study_ids = np.unique(series["study_id"].to_numpy())
    else:
        study_ids = np.empty(0, dtype=np.int64)
    report.n_studies = len(study_ids)
    if series is not None:
        report.n_series = len(series)
        report.series_by_type = {kind: int((series["series_description"] == kind).sum()) for kind in SERIES_TYPES}
        report.studies_missing_series, report.multi_series_counts = _series_gaps(study_ids, series)
        if data.train is not None:
            with_series = set(series["study_id"].tolist())
            report.studies_without_series = [int(s) for s in study_ids if s not in with_series]
            orphans = ~series["study_id"].isin(study_ids)
            report.series_without_study = [int(s) for s in series.loc[orphans, "series_id"]]
    if data.coordinates is not None:
        report.n_coordinates = len(data.coordinates)
    if data.test_series is not None:
        report.n_test_studies = int(data.test_series["study_id"].nunique())
        report.n_test_series = len(data.test_series)
    if check_images:
        report.missing_image_series = {}
        for name, table in ((TRAIN_IMAGES, series), (TEST_IMAGES, data.test_series)):
            if table is not None:
                report.missing_image_series[name] = _missing_series_folders(data.root / name, table)
    return report
