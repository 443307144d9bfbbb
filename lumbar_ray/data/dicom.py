"""Read one DICOM series (a folder or a list of files) into stacks with geometry.

Rules (every caller relies on them):

* **Files.** A series is either every ``*.dcm`` file (case-insensitive, hidden files skipped) directly in a folder
  (``<study_id>/<series_id>/<instance_number>.dcm``), or an explicit sequence of file paths (any names). Files are
  read in natural order: parent folder, then natural file name (``2.dcm`` before ``10.dcm``). Each file is read
  once with :func:`pydicom.dcmread`. An empty or missing folder, or an empty sequence, raises
  :class:`DicomReadError` naming it.
* **Object storage.** A folder may be a URI that pyarrow reads (``s3://bucket/rsna/train_images/1/2``, see
  :func:`lumbar_ray.data.cache.filesystem`): its ``*.dcm`` files are copied into a temporary folder of the calling
  process, read as above, and the copy is deleted; ``series_dir`` and the folder's errors name the URI.
* **Unreadable files.** A file that cannot be used (not DICOM, truncated, no pixel data, undecodable, not
  grayscale) is skipped, never silently: it is listed in ``DicomSeries.skipped`` as a :class:`SkippedFile` (file
  name, kind, cause; never a tag value) and logged at WARNING naming the series and the file. The other files
  make the series. A series without one readable file raises :class:`DicomReadError` naming the folder, with
  the kind and cause of its first file.
* **Multi-frame files.** A file of several frames (Enhanced MR Image Storage, as Siemens XA and Philips write it)
  gives one slice per frame. A frame's tags are the file's whitelisted top-level tags, overridden by those of the
  Shared Functional Groups Sequence, overridden by those of its own item of the Per-frame Functional Groups
  Sequence (the macros of :data:`FRAME_MACROS`: plane position and orientation, pixel measures, rescale, VOI LUT,
  MR timing; MR Echo's EffectiveEchoTime becomes EchoTime). With several frames the file's top-level
  ImagePositionPatient is not used (one position cannot place several frames). A frame's ``file_name`` is its
  file's name and its ``instance_number`` is its **1-based frame number** (a single-frame file, enhanced or
  not, keeps its InstanceNumber), so ``(file_name, instance_number)`` identifies a frame. Frames then follow
  the grouping, sorting and stacking rules below like any other slice.
* **Orientation groups.** Slices whose ImageOrientationPatient row and column direction cosines both lie
  within :data:`ORIENTATION_TOLERANCE_DEG` degrees of a group's first slice (in InstanceNumber, then file-name
  order) belong to that group; each group is one :class:`Stack`. Slices without a usable
  ImagePositionPatient or ImageOrientationPatient form one extra stack with ``geometry_complete=False``.
* **Sorting.** Inside a geometric stack, slices are sorted by ascending projection of ImagePositionPatient on
  the unit normal ``row x column`` of the stack (mean direction cosines of its slices). Projections within
  :data:`TIE_TOLERANCE_MM` of each other are ties, broken by InstanceNumber, then file name. InstanceNumber
  and file name never order slices that have geometry. The incomplete stack is ordered by InstanceNumber
  (missing last), then natural file name.
* **Stack order.** Geometric stacks by their smallest InstanceNumber (missing counts as largest), then by
  their smallest natural file name; the incomplete stack, if any, comes last.
* **Intensities.** Output is float32 ``stored * RescaleSlope + RescaleIntercept`` (defaults 1 and 0).
  MONOCHROME1 is inverted so bright means high signal, as in MONOCHROME2: ``stored`` is first replaced by
  ``lo + hi - stored``, where ``[lo, hi]`` is the range allowed by BitsStored and PixelRepresentation (not the
  slice's own min/max, so every slice of a series is inverted identically and the output stays in the same
  rescaled range).
* **Mixed shapes.** Inside one stack the modal (rows, cols) shape is the stack shape (ties: larger area,
  then larger rows); other slices are resized to it by bilinear interpolation with pixel-centre alignment
  (the field of view is kept; edge samples are clamped) and flagged in ``Stack.resized``. Their
  :class:`SliceGeometry` keeps the original shape and PixelSpacing, because label coordinates are given in
  each instance's own grid; :meth:`Stack.original_to_stack` and :meth:`Stack.stack_to_original` map points
  (``x`` = column, ``y`` = row, pixel centres at integers) with
  ``x_stack = (x + 0.5) * cols_stack / cols_orig - 0.5``.
* **Pixel <-> patient.** :func:`pixel_to_patient` and :func:`patient_to_pixel` are the one place of the rule
  ``IPP + column * column_spacing * row_direction + row * row_spacing * column_direction``.
* **Grouping a request's files.** :func:`group_series_files` reads headers only and groups arbitrary files by
  SeriesInstanceUID (files without one: by parent folder). Files inside a group, and groups by their first
  file, come in the natural order above. A file that is not DICOM, or holds no image (no Rows), is returned as
  a :class:`SkippedFile` and logged at WARNING; it never raises.
* **Privacy.** Only tags in :data:`WHITELISTED_TAGS` (geometry and acquisition parameters) leave this module,
  converted to plain Python types; the pydicom ``Dataset`` is never returned. ``DicomSeries.meta`` holds the
  whitelisted tags whose value is the same in every file of the series. The one exception is
  :class:`SeriesFiles`, which hands the caller its own SeriesInstanceUID and SOPInstanceUIDs to tell its files
  apart within one request; they are left out of its repr and never logged or cached.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder

from lumbar_ray.data.cache import filesystem, is_uri
from lumbar_ray.errors import DicomReadError

logger = logging.getLogger(__name__)

WHITELISTED_TAGS: tuple[str, ...] = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "Modality",
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "PatientPosition",
    "SeriesDescription",
)
"""DICOM keywords allowed out of this module: geometry and acquisition only (no names, IDs, dates, UIDs,
institutions or devices)."""

ORIENTATION_TOLERANCE_DEG: float = 1.0
"""Largest angle between row (and between column) direction cosines of slices in one orientation group."""

TIE_TOLERANCE_MM: float = 1e-3
"""Projections along the normal closer than this are equal positions (ties)."""

FRAME_MACROS: tuple[str, ...] = (
    "PlanePositionSequence",  # ImagePositionPatient
    "PlaneOrientationSequence",  # ImageOrientationPatient
    "PixelMeasuresSequence",  # PixelSpacing, SliceThickness, SpacingBetweenSlices
    "PixelValueTransformationSequence",  # RescaleSlope, RescaleIntercept
    "FrameVOILUTSequence",  # WindowCenter, WindowWidth
    "MRTimingAndRelatedParametersSequence",  # RepetitionTime, FlipAngle, EchoTrainLength
)
"""Functional group macros of a multi-frame file whose whitelisted tags become a frame's tags (shared, then
overridden per frame). Only whitelisted tags are taken from them."""

_COS_TOLERANCE: float = math.cos(math.radians(ORIENTATION_TOLERANCE_DEG))
_PIXEL_DATA_KEYWORDS: tuple[str, ...] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Enhanced MR keeps the echo time as EffectiveEchoTime in its MR Echo macro; a frame reports it as EchoTime.
_ECHO_MACRO: tuple[str, str, str] = ("MREchoSequence", "EffectiveEchoTime", "EchoTime")
_NOT_PARSED = object()


def _directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The row and column direction cosines of an ImageOrientationPatient, as float64 vectors."""
    cosines = np.asarray(orientation, dtype=np.float64)
    return cosines[:3], cosines[3:]


def pixel_to_patient(
    position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float], column: float, row: float
) -> np.ndarray:
    """Patient coordinates (mm) of a point of a slice's own pixel grid: DICOM's one pixel -> patient rule.

    ``position + column * column_spacing * row_direction + row * row_spacing * column_direction``: PixelSpacing is
    (between rows, between columns), so a step along the columns moves along the *row* direction (the first three
    ImageOrientationPatient cosines). Pixel centres sit at integer coordinates.

    Args:
        position: ImagePositionPatient (mm): the centre of pixel (row 0, column 0).
        orientation: ImageOrientationPatient: row direction cosines, then column direction cosines.
        pixel_spacing: PixelSpacing: (row spacing, column spacing) in mm.
        column: x, the column (may be fractional).
        row: y, the row.

    Returns:
        (3,) float64 point; NaN where ``position`` is None (a slice without geometry).
    """
    row_dir, col_dir = _directions(orientation)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    return np.asarray(position, dtype=np.float64) + column * col_spacing * row_dir + row * row_spacing * col_dir


def patient_to_pixel(
    position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float], point: Sequence[float]
) -> tuple[float, float, float]:
    """Inverse of :func:`pixel_to_patient`: a patient point's ``(column, row)`` on a slice and its plane distance.

    The point is projected orthogonally onto the slice's plane; the direction cosines are orthonormal, so the
    projection's in-plane coordinates are plain dot products.

    Args:
        position: ImagePositionPatient (mm).
        orientation: ImageOrientationPatient (row direction, then column direction).
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
        point: (3,) patient coordinates (mm).

    Returns:
        ``(column, row, distance)``: fractional pixel coordinates of the projection, and the signed distance (mm)
        from the plane along its normal ``row direction x column direction`` (positive on the normal's side).
    """
    row_dir, col_dir = _directions(orientation)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    offset = np.asarray(point, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    distance = float(np.dot(np.cross(row_dir, col_dir), offset))
    return float(np.dot(offset, row_dir)) / col_spacing, float(np.dot(offset, col_dir)) / row_spacing, distance


@dataclass(frozen=True, slots=True)
class SliceGeometry:
    """Geometry of one instance, in its own (original) pixel grid.

    Attributes:
        instance_number: InstanceNumber, or None when absent.
        position: ImagePositionPatient (mm, patient LPS) of the centre of pixel (0, 0), or None.
        orientation: ImageOrientationPatient: row direction cosines then column direction cosines, or None.
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm, or None.
        shape: Original (rows, cols) of the instance.
        slice_thickness: SliceThickness in mm, or None.
        file_name: Base name of the file (no folder).
    """

    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    shape: tuple[int, int]
    slice_thickness: float | None
    file_name: str

    @property
    def has_geometry(self) -> bool:
        """Whether position and orientation are both known (the slice can be sorted along a normal)."""
        return self.position is not None and self.orientation is not None

    def pixel_to_patient(self, x: float, y: float) -> np.ndarray:
        """Map a point of this instance's original grid (x = column, y = row) to patient coordinates (mm).

        Raises:
            ValueError: if position, orientation or pixel spacing is missing.
        """
        if self.position is None or self.orientation is None or self.pixel_spacing is None:
            raise ValueError(f"{self.file_name}: position, orientation or pixel spacing missing")
        return pixel_to_patient(self.position, self.orientation, self.pixel_spacing, x, y)


@dataclass
class DicomSlice:
    """One decoded instance.

    Attributes:
        pixels: float32 (rows, cols), rescaled, MONOCHROME1 inverted.
        geometry: The instance's geometry.
        meta: Whitelisted tags of the file as plain Python values.
    """

    pixels: np.ndarray
    geometry: SliceGeometry
    meta: dict[str, Any]


@dataclass
class Stack:
    """Slices of one orientation, sorted along their normal.

    Attributes:
        volume: float32 (n, rows, cols) in the stack's (modal) shape.
        geometry: Per-slice geometry in volume order (original shapes and spacings).
        orientation: (6,) mean direction cosines of the stack, or None when geometry is incomplete.
        normal: (3,) unit normal ``row x column``, or None when geometry is incomplete.
        positions_along_normal: (n,) projection of each position on ``normal`` (NaN when incomplete).
        resized: (n,) bool, True where a slice was resized to the stack shape.
        geometry_complete: False for the fallback stack of slices lacking position or orientation.
    """

    volume: np.ndarray
    geometry: list[SliceGeometry]
    orientation: np.ndarray | None
    normal: np.ndarray | None
    positions_along_normal: np.ndarray
    resized: np.ndarray
    geometry_complete: bool

    def __repr__(self) -> str:
        normal = None if self.normal is None else self.normal.tolist()
        complete = self.geometry_complete
        return (
            f"Stack(n_slices={self.n_slices}, shape={self.shape}, geometry_complete={complete}, "
            f"n_resized={int(self.resized.sum())}, normal={normal})"
        )

    @property
    def n_slices(self) -> int:
        """Number of slices."""
        return int(self.volume.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Stack (rows, cols)."""
        return int(self.volume.shape[1]), int(self.volume.shape[2])

    @property
    def instance_numbers(self) -> list[int | None]:
        """InstanceNumber of each slice, in volume order."""
        return [g.instance_number for g in self.geometry]

    def index_of_instance(self, instance_number: int) -> int:
        """Volume index of the slice with this InstanceNumber (the first one if duplicated).

        Raises:
            KeyError: if no slice of the stack has this InstanceNumber.
        """
        for index, geometry in enumerate(self.geometry):
            if geometry.instance_number == instance_number:
                return index
        raise KeyError(f"instance {instance_number} is not in this stack")

    def _scales(self, index: int) -> tuple[float, float]:
        """(col, row) scale factors stack / original of slice ``index``."""
        rows, cols = self.geometry[index].shape
        stack_rows, stack_cols = self.shape
        return stack_cols / cols, stack_rows / rows

    def original_to_stack(self, index: int, x: float | np.ndarray, y: float | np.ndarray) -> tuple[Any, Any]:
        """Map a point (x = column, y = row) of slice ``index``'s original grid to the stack grid.

        Pixel centres sit at integer coordinates; the field of view is preserved (identity for slices that
        were not resized). Works elementwise on arrays.
        """
        sx, sy = self._scales(index)
        return (np.asarray(x) + 0.5) * sx - 0.5, (np.asarray(y) + 0.5) * sy - 0.5

    def stack_to_original(self, index: int, x: float | np.ndarray, y: float | np.ndarray) -> tuple[Any, Any]:
        """Inverse of :meth:`original_to_stack`: stack grid point of slice ``index`` to its original grid."""
        sx, sy = self._scales(index)
        return (np.asarray(x) + 0.5) / sx - 0.5, (np.asarray(y) + 0.5) / sy - 0.5

    def stack_pixel_spacing(self, index: int) -> tuple[float, float] | None:
        """(row, col) spacing in mm of slice ``index`` in the stack grid, or None when unknown."""
        spacing = self.geometry[index].pixel_spacing
        if spacing is None:
            return None
        sx, sy = self._scales(index)
        return spacing[0] / sy, spacing[1] / sx


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a series because it cannot be used.

    Attributes:
        file_name: Base name of the file (no folder).
        kind: The :class:`DicomReadError` kind: ``not_dicom``, ``no_pixels``, ``undecodable`` or ``not_grayscale``.
        cause: What is wrong, in words (never a tag value).
    """

    file_name: str
    kind: str
    cause: str


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one series among a request's files, found from their headers alone.

    Attributes:
        series_uid: SeriesInstanceUID ("" for files without one, grouped by folder). It groups files within one
            request only; never cached or logged.
        description: SeriesDescription of the first file ("" when absent).
        orientation: ImageOrientationPatient (normalised) of the first file, or of its first frame for a
            multi-frame file; None when absent or degenerate. It tells sagittal from axial series.
        files: The files, in natural order (parent folder, then natural file name).
        sop_instance_uids: SOPInstanceUID of each file ("" when absent): the caller's own identifier of an image,
            for its responses only.
    """

    series_uid: str = field(repr=False)
    description: str
    orientation: tuple[float, ...] | None
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...] = field(repr=False)


@dataclass
class DicomSeries:
    """A decoded series: one stack per orientation group.

    Attributes:
        stacks: Stacks in the documented deterministic order.
        meta: Whitelisted tags whose value is identical in every slice, as plain Python values.
        n_files: Number of files read (skipped files not counted; a multi-frame file counts once).
        series_dir: The series folder (for a sequence of files: their common folder).
        skipped: Files left out because they cannot be used, in file order.
    """

    stacks: list[Stack]
    meta: dict[str, Any] = field(default_factory=dict)
    n_files: int = 0
    series_dir: str = ""
    skipped: list[SkippedFile] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"DicomSeries(series_dir={self.series_dir!r}, n_files={self.n_files}, n_skipped={len(self.skipped)}, "
            f"stacks={self.stacks!r}, meta={self.meta!r})"
        )

    @property
    def volume(self) -> np.ndarray:
        """The volume of the only stack.

        Raises:
            ValueError: if the series holds several stacks (use :attr:`stacks`).
        """
        if len(self.stacks) != 1:
            raise ValueError(
                f"{self.series_dir}: series has {len(self.stacks)} stacks (several orientations or "
                "incomplete geometry); use .stacks"
            )
        return self.stacks[0].volume

    @property
    def n_slices(self) -> int:
        """Total number of slices over all stacks."""
        return sum(stack.n_slices for stack in self.stacks)

    @property
    def geometry_complete(self) -> bool:
        """Whether every slice had position and orientation."""
        return all(stack.geometry_complete for stack in self.stacks)

    def locate_instance(self, instance_number: int) -> tuple[int, int]:
        """(stack index, slice index) of the first slice with this InstanceNumber.

        Raises:
            KeyError: if no slice has this InstanceNumber.
        """
        for stack_index, stack in enumerate(self.stacks):
            for slice_index, geometry in enumerate(stack.geometry):
                if geometry.instance_number == instance_number:
                    return stack_index, slice_index
        raise KeyError(f"{self.series_dir}: instance {instance_number} is not in this series")


@dataclass
class _RawSlice:
    """A file's stored pixels plus everything needed to turn them into float32 (internal)."""

    stored: np.ndarray
    geometry: SliceGeometry
    meta: dict[str, Any]
    slope: float
    intercept: float


# --------------------------------------------------------------------------------------------------
# Tag conversion


def _plain(value: Any) -> Any:
    """Convert a pydicom value to plain Python (int/float/str/list); None for empty or binary values."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(v is None for v in items) or not items else items
    if isinstance(value, bool):
        return value
    if isinstance(value, int):  # covers pydicom IS
        return int(value)
    if isinstance(value, float):  # covers pydicom DSfloat
        return float(value)
    if isinstance(value, str):
        return str(value) if value != "" else None
    # DSdecimal and other numeric types.
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@functools.cache
def _whitelisted_tags() -> tuple[tuple[str, int, str], ...]:
    """(keyword, tag, dictionary VR) of :data:`WHITELISTED_TAGS`, resolved once per process."""
    return tuple(
        (keyword, int(tag_for_keyword(keyword)), dictionary_VR(tag_for_keyword(keyword)))
        for keyword in WHITELISTED_TAGS
    )


@functools.cache
def _whitelisted_tag_set() -> frozenset[int]:
    """Tags of :data:`WHITELISTED_TAGS`."""
    return frozenset(tag for _, tag, _ in _whitelisted_tags())


def _parse_raw(raw: RawDataElement, dictionary_vr: str) -> Any:
    """Fast conversion of a still-raw DS/IS/CS/US element to plain Python; ``_NOT_PARSED`` otherwise.

    pydicom's generic conversion (value objects, validation, multi-value wrappers) costs about as much as
    decoding an uncompressed slice; the few VRs of the whitelist are simple enough to parse directly. Other
    VRs (text in a specific character set) and anything malformed go through pydicom.
    """
    vr = raw.VR or dictionary_vr
    data = raw.value
    if not isinstance(data, bytes):
        return _NOT_PARSED
    if not data:
        return None
    try:
        if vr == "US":
            count = len(data) // 2
            values: list[Any] = list(struct.unpack(("<" if raw.is_little_endian else ">") + "H" * count, data))
        elif vr in ("DS", "IS", "CS"):
            parts = [part.strip(" \0") for part in data.decode("ascii").split("\\")]
            if vr == "DS":
                values = [float(part) for part in parts]
            elif vr == "IS":
                values = [int(part) for part in parts]
            else:
                values = parts
        else:
            return _NOT_PARSED
    except (UnicodeDecodeError, ValueError, struct.error):
        return _NOT_PARSED
    return values[0] if len(values) == 1 else values


def _converted(ds: pydicom.Dataset, tag: int) -> Any:
    """pydicom's conversion of one element to plain Python; None when its value is malformed (e.g. a DS of
    letters), as if it were absent: a bad optional tag must not cost the whole file."""
    try:
        return _plain(ds[tag].value)
    except (ValueError, TypeError, OverflowError):
        return None


def _whitelisted_meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """Whitelisted tags present in ``ds`` with a non-empty value, as plain Python values."""
    meta: dict[str, Any] = {}
    present = ds.keys() & _whitelisted_tag_set()  # one set operation instead of a lookup per absent tag
    for keyword, tag, dictionary_vr in _whitelisted_tags():
        if tag not in present:
            continue
        element = ds.get_item(tag)
        value = _parse_raw(element, dictionary_vr) if isinstance(element, RawDataElement) else _NOT_PARSED
        if value is _NOT_PARSED:
            value = _converted(ds, tag)
        if value is not None and value != "" and value != []:
            meta[keyword] = value
    return meta


def _floats(value: Any, length: int) -> tuple[float, ...] | None:
    """``value`` as a tuple of ``length`` finite floats, or None when absent or malformed."""
    if not isinstance(value, list) or len(value) != length:
        return None
    try:
        result = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return result if all(math.isfinite(v) for v in result) else None


def _orientation(value: Any) -> tuple[float, float, float, float, float, float] | None:
    """Normalised IOP, or None when absent, malformed or degenerate (zero or parallel vectors)."""
    cosines = _floats(value, 6)
    if cosines is None:
        return None
    # Plain Python: numpy's per-call overhead dominates on 3-vectors and this runs once per file.
    row_norm = math.hypot(*cosines[:3])
    col_norm = math.hypot(*cosines[3:])
    if row_norm < 1e-6 or col_norm < 1e-6:
        return None
    r = [v / row_norm for v in cosines[:3]]
    c = [v / col_norm for v in cosines[3:]]
    cross = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    if math.hypot(*cross) < 1e-3:
        return None
    return (r[0], r[1], r[2], c[0], c[1], c[2])


def _geometry(meta: dict[str, Any], shape: tuple[int, int], file_name: str) -> SliceGeometry:
    """Build a :class:`SliceGeometry` from whitelisted meta; malformed values become None."""
    instance = meta.get("InstanceNumber")
    thickness = meta.get("SliceThickness")
    return SliceGeometry(
        instance_number=instance if isinstance(instance, int) else None,
        position=_floats(meta.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_orientation(meta.get("ImageOrientationPatient")),
        pixel_spacing=_floats(meta.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        shape=shape,
        slice_thickness=float(thickness) if isinstance(thickness, (int, float)) else None,
        file_name=file_name,
    )


# --------------------------------------------------------------------------------------------------
# Reading one file


def _stored_range(ds: pydicom.Dataset, stored: np.ndarray) -> tuple[int, int]:
    """Range of stored values allowed by BitsStored and PixelRepresentation."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 1 if stored.dtype.kind == "i" else 0)) == 1
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the pixel data of ``ds`` (as stored, before rescale).

    Calls the transfer syntax's decoder directly with ``view_only=True``: native pixel data comes back as a
    read-only view instead of pydicom's defensive copy, and the dataset's pixel-array caching is skipped. Both
    are pure overhead here because the pixels are converted to float32 right after.
    """
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is None:
        return ds.pixel_array  # let pydicom infer the encoding
    # A view is impossible when unused high bits must be masked (BitsStored < BitsAllocated): asking for one
    # then only makes pydicom log a warning per file before it copies anyway.
    view_only = ds.get("BitsStored") == ds.get("BitsAllocated")
    array, _ = get_decoder(transfer_syntax).as_array(ds, view_only=view_only)
    return array


def _dcmread(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """:func:`pydicom.dcmread`, with any failure raised as a ``not_dicom`` :class:`DicomReadError`."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types for garbage; all mean "not readable DICOM"
        raise DicomReadError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})", "not_dicom") from exc


def _frame_count(ds: pydicom.Dataset, path: Path) -> int:
    """NumberOfFrames (1 when absent)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError) as exc:
        raise DicomReadError(path, f"malformed NumberOfFrames ({exc})", "undecodable") from exc


def _macro_meta(group: pydicom.Dataset) -> dict[str, Any]:
    """Whitelisted tags of the :data:`FRAME_MACROS` of one functional group item (a frame's or the shared one)."""
    meta: dict[str, Any] = {}
    for keyword in FRAME_MACROS:
        macro = group.get(keyword)
        if macro:
            meta |= _whitelisted_meta(macro[0])
    sequence, source, target = _ECHO_MACRO
    echo = group.get(sequence)
    if echo and source in echo[0]:
        value = _converted(echo[0], tag_for_keyword(source))
        if isinstance(value, (int, float)):
            meta[target] = value
    return meta


def _frame_metas(ds: pydicom.Dataset, path: Path, n_frames: int) -> list[dict[str, Any]]:
    """The whitelisted tags of each frame: the file's, overridden by the shared functional groups', overridden by
    the frame's own; with several frames, InstanceNumber is the 1-based frame number."""
    base = _whitelisted_meta(ds)
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames == 1 and not shared_groups and not per_frame:
        return [base]  # a classic single-frame file: its own tags, untouched
    if per_frame and len(per_frame) != n_frames:
        raise DicomReadError(path, f"{len(per_frame)} per-frame functional groups for {n_frames} frames", "undecodable")
    if n_frames > 1:
        base.pop("ImagePositionPatient", None)  # one position cannot place several frames
    shared = base | (_macro_meta(shared_groups[0]) if shared_groups else {})
    metas = []
    for index in range(n_frames):
        meta = shared | (_macro_meta(per_frame[index]) if per_frame else {})
        if n_frames > 1:
            meta["InstanceNumber"] = index + 1
        metas.append(meta)
    return metas


def _decode_frames(ds: pydicom.Dataset, path: Path, n_frames: int) -> np.ndarray:
    """The stored pixels as ``(frames, rows, cols)``."""
    try:
        stored = _decode(ds)
    except Exception as exc:  # truncated data, missing decoder plug-in, bad group 0028 values
        raise DicomReadError(path, f"cannot decode pixel data ({type(exc).__name__}: {exc})", "undecodable") from exc
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    if stored.ndim != 3 or stored.shape[0] != n_frames:
        raise DicomReadError(
            path, f"expected {n_frames} grayscale frame(s), got pixel array of shape {stored.shape}", "not_grayscale"
        )
    return stored


def _raw_slice(stored: np.ndarray, meta: dict[str, Any], file_name: str, inverted: tuple[int, int] | None) -> _RawSlice:
    """One frame's raw slice; ``inverted`` is the stored range of a MONOCHROME1 file (None otherwise)."""
    slope = float(meta.get("RescaleSlope", 1.0)) if isinstance(meta.get("RescaleSlope"), (int, float)) else 1.0
    intercept = meta.get("RescaleIntercept", 0.0)
    intercept = float(intercept) if isinstance(intercept, (int, float)) else 0.0
    if inverted is not None:
        # slope * (lo + hi - s) + intercept == -slope * s + (slope * (lo + hi) + intercept): one fused pass.
        lo, hi = inverted
        slope, intercept = -slope, slope * (lo + hi) + intercept
    geometry = _geometry(meta, (int(stored.shape[0]), int(stored.shape[1])), file_name)
    return _RawSlice(stored=stored, geometry=geometry, meta=meta, slope=slope, intercept=intercept)


def _read_file(path: Path) -> list[_RawSlice]:
    """Read and decode one file into one raw slice per frame (not converted yet: the caller writes in place)."""
    ds = _dcmread(path)
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise DicomReadError(path, "DICOM file has no pixel data", "no_pixels")
    n_frames = _frame_count(ds, path)
    metas = _frame_metas(ds, path, n_frames)
    samples = metas[0].get("SamplesPerPixel", 1)
    if samples != 1:  # before decoding: a clear cause, and no colour frames decoded for nothing
        photometric = metas[0].get("PhotometricInterpretation")
        raise DicomReadError(
            path, f"expected grayscale pixels, got {samples} samples per pixel ({photometric})", "not_grayscale"
        )
    frames = _decode_frames(ds, path, n_frames)
    monochrome1 = str(metas[0].get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    inverted = _stored_range(ds, frames) if monochrome1 else None
    return [_raw_slice(stored, meta, path.name, inverted) for stored, meta in zip(frames, metas, strict=True)]


def _to_float(raw: _RawSlice, out: np.ndarray | None = None) -> np.ndarray:
    """Write ``stored * slope + intercept`` as float32 into ``out`` (allocated when None), in place."""
    if out is None:
        out = raw.stored.astype(np.float32)
    else:
        out[...] = raw.stored
    if raw.slope != 1.0:
        out *= np.float32(raw.slope)
    if raw.intercept != 0.0:
        out += np.float32(raw.intercept)
    return out


def read_slice(path: str | os.PathLike[str]) -> DicomSlice:
    """Read one single-frame DICOM file: float32 pixels (rescaled, MONOCHROME1 inverted), geometry, whitelisted meta.

    Args:
        path: The ``.dcm`` file.

    Returns:
        The decoded slice; no pydicom object is kept.

    Raises:
        DicomReadError: if the file is not DICOM, is truncated, has no pixel data, cannot be decoded, is not
            grayscale, or holds several frames (kind ``multi_frame``: :func:`read_series` reads those).
    """
    raws = _read_file(Path(path))
    if len(raws) != 1:
        raise DicomReadError(path, f"file holds {len(raws)} frames; read it with read_series", "multi_frame")
    return DicomSlice(pixels=_to_float(raws[0]), geometry=raws[0].geometry, meta=raws[0].meta)


# --------------------------------------------------------------------------------------------------
# Grouping, sorting and stacking


def _natural_key(name: str) -> tuple[int, int, str]:
    """Order ``2.dcm`` before ``10.dcm``; non-numeric stems after numeric ones."""
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _instance_key(geometry: SliceGeometry) -> tuple[int, int, tuple[int, int, str]]:
    """InstanceNumber (missing last), then natural file name."""
    number = geometry.instance_number
    return (number is None, number if number is not None else 0, _natural_key(geometry.file_name))


def _same_orientation(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether row and column cosines of two (normalised) IOPs are within the angular tolerance."""
    row_dot = a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
    col_dot = a[3] * b[3] + a[4] * b[4] + a[5] * b[5]
    return row_dot >= _COS_TOLERANCE and col_dot >= _COS_TOLERANCE


def _group_by_orientation(raws: Sequence[_RawSlice]) -> tuple[list[list[_RawSlice]], list[_RawSlice]]:
    """Split slices into orientation groups (with geometry) and the slices lacking geometry."""
    groups: list[list[_RawSlice]] = []
    references: list[tuple[float, ...]] = []
    incomplete: list[_RawSlice] = []
    # Visiting in instance order makes the reference of each group (its first slice) deterministic.
    for raw in sorted(raws, key=lambda r: _instance_key(r.geometry)):
        orientation = raw.geometry.orientation
        if not raw.geometry.has_geometry or orientation is None:
            incomplete.append(raw)
            continue
        for reference, group in zip(references, groups, strict=True):
            if _same_orientation(reference, orientation):
                group.append(raw)
                break
        else:
            references.append(orientation)
            groups.append([raw])
    return groups, incomplete


def _mean_orientation(group: Sequence[_RawSlice]) -> tuple[np.ndarray, np.ndarray]:
    """(6,) mean normalised direction cosines and (3,) unit normal ``row x column`` of a group."""
    cosines = np.asarray([raw.geometry.orientation for raw in group], dtype=np.float64)
    row, col = cosines[:, :3].mean(axis=0), cosines[:, 3:].mean(axis=0)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    return np.concatenate([row, col]), normal


def _sort_along_normal(group: Sequence[_RawSlice], normal: np.ndarray) -> tuple[list[_RawSlice], np.ndarray]:
    """Sort by projection on ``normal``; ties (within TIE_TOLERANCE_MM) by InstanceNumber then file name."""
    positions = np.asarray([raw.geometry.position for raw in group], dtype=np.float64)
    projections = positions @ normal
    order = np.argsort(projections, kind="stable")
    # Consecutive sorted projections closer than the tolerance share a tie id; ids are monotonic in position.
    tie_ids = np.concatenate([[0], np.cumsum(np.diff(projections[order]) > TIE_TOLERANCE_MM)])
    tie_of = dict(zip(order.tolist(), tie_ids.tolist(), strict=True))
    final = sorted(range(len(group)), key=lambda i: (tie_of[i], _instance_key(group[i].geometry)))
    return [group[i] for i in final], projections[final]


def _modal_shape(raws: Sequence[_RawSlice]) -> tuple[int, int]:
    """Most common (rows, cols); ties broken by larger area, then larger rows."""
    counts = Counter(raw.geometry.shape for raw in raws)
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s[0], s[1]))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of pixel-centre-aligned linear interpolation on one axis."""
    source = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    source = np.clip(source, 0.0, n_in - 1)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (source - lower).astype(np.float32)


def resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image to ``shape`` by bilinear interpolation with pixel-centre alignment.

    Output pixel (i, j) samples the input at ``((i + 0.5) * rows_in / rows_out - 0.5, ...)`` clamped to the
    image, the same mapping as :meth:`Stack.original_to_stack`.

    Args:
        image: (rows, cols) array.
        shape: Target (rows, cols).

    Returns:
        float32 array of ``shape``.
    """
    image = np.asarray(image, dtype=np.float32)
    y0, y1, wy = _axis_weights(image.shape[0], shape[0])
    x0, x1, wx = _axis_weights(image.shape[1], shape[1])
    top, bottom = image[y0], image[y1]
    wy = wy[:, None]
    rows = top + (bottom - top) * wy
    left, right = rows[:, x0], rows[:, x1]
    return left + (right - left) * wx[None, :]


def _build_stack(
    ordered: Sequence[_RawSlice],
    projections: np.ndarray,
    orientation: np.ndarray | None,
    normal: np.ndarray | None,
) -> Stack:
    """Convert sorted slices straight into one preallocated float32 volume, resizing off-shape slices."""
    shape = _modal_shape(ordered)
    volume = np.empty((len(ordered), *shape), dtype=np.float32)
    resized = np.zeros(len(ordered), dtype=bool)
    for index, raw in enumerate(ordered):
        if raw.geometry.shape == shape:
            _to_float(raw, out=volume[index])
        else:
            volume[index] = resize_bilinear(_to_float(raw), shape)
            resized[index] = True
    if resized.any():
        logger.debug("resized %d of %d slices to the modal shape %s", int(resized.sum()), len(ordered), shape)
    return Stack(
        volume=volume,
        geometry=[raw.geometry for raw in ordered],
        orientation=orientation,
        normal=normal,
        positions_along_normal=projections,
        resized=resized,
        geometry_complete=normal is not None,
    )


def _stack_order_key(stack: Stack) -> tuple[bool, int, int, tuple[int, int, str]]:
    """Geometric stacks first, then by smallest InstanceNumber (missing last), then smallest file name."""
    numbers = [g.instance_number for g in stack.geometry if g.instance_number is not None]
    first_number = min(numbers) if numbers else 0
    first_file = min(_natural_key(g.file_name) for g in stack.geometry)
    return (not stack.geometry_complete, not numbers, first_number, first_file)


def _common_meta(raws: Sequence[_RawSlice]) -> dict[str, Any]:
    """Whitelisted tags with the same value in every file."""
    common = dict(raws[0].meta)
    for raw in raws[1:]:
        for key in [k for k, v in common.items() if raw.meta.get(k) != v]:
            del common[key]
    return common


def _file_key(path: Path) -> tuple[str, tuple[int, int, str]]:
    """Natural order of files: parent folder, then natural file name."""
    return str(path.parent), _natural_key(path.name)


MISSING_FOLDER = "series folder does not exist or is not a directory"
EMPTY_FOLDER = "series folder contains no .dcm files"
# Files of a series in object storage downloaded at once (pyarrow releases the GIL while it reads).
DOWNLOAD_THREADS = 8


def is_series_file(name: str) -> bool:
    """Whether a file in a series folder is one of its files: a ``*.dcm`` name (any case), not hidden."""
    return Path(name).suffix.lower() == ".dcm" and not name.startswith(".")


def _series_files(folder: Path) -> list[Path]:
    """The ``*.dcm`` files of a series folder in natural name order."""
    if not folder.is_dir():
        raise DicomReadError(folder, MISSING_FOLDER, "missing_folder")
    files = [p for p in folder.iterdir() if is_series_file(p.name) and p.is_file()]
    if not files:
        raise DicomReadError(folder, EMPTY_FOLDER, "empty_folder")
    return sorted(files, key=_file_key)


def _download_series(folder: str, into: Path) -> None:
    """Copy the series files of a folder URI into the local folder ``into``.

    Raises:
        DicomReadError: naming the URI, for a folder that does not exist or holds no series file.
    """
    fs, path = filesystem(folder)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        raise DicomReadError(folder, MISSING_FOLDER, "missing_folder") from None
    files = [entry for entry in entries if entry.type == pafs.FileType.File and is_series_file(entry.base_name)]
    if not files:
        raise DicomReadError(folder, EMPTY_FOLDER, "empty_folder")

    def download(entry: pafs.FileInfo) -> None:
        with fs.open_input_stream(entry.path) as source:
            (into / entry.base_name).write_bytes(source.read())

    with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(files))) as pool:
        list(pool.map(download, files))


def _read_series_uri(folder: str) -> DicomSeries:
    """:func:`read_series` of a folder URI, through a temporary local copy (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="lumbar-ray-series-") as temporary:
        _download_series(folder, Path(temporary))
        try:
            series = read_series(temporary)
        except DicomReadError as error:  # the folder's own error (no readable file): name the URI, not the copy
            raise DicomReadError(folder, error.cause, error.kind) from None
    return replace(series, series_dir=folder)


def _source_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[list[Path], str]:
    """The files of a series (a folder, or a sequence of files) in natural order, and its folder for messages."""
    if isinstance(source, (str, os.PathLike)):
        return _series_files(Path(source)), str(source)
    files = sorted((Path(path) for path in source), key=_file_key)
    if not files:
        raise DicomReadError("(no files)", "no DICOM files given", "no_files")
    try:
        folder = os.path.commonpath([str(path.parent) for path in files])
    except ValueError:  # absolute and relative paths mixed: no common folder to name
        folder = ""
    return files, folder


def _skip(error: DicomReadError, path: Path, where: str) -> SkippedFile:
    """Record (and log) a file left out because it cannot be used."""
    logger.warning("%s: skipped %s: %s (%s)", where, path.name, error.cause, error.kind)
    return SkippedFile(file_name=path.name, kind=error.kind, cause=error.cause)


def _read_files(files: Sequence[Path], where: str) -> tuple[list[_RawSlice], list[SkippedFile]]:
    """One raw slice per frame of every usable file, and the files skipped.

    Raises:
        DicomReadError: if no file is usable (naming ``where`` and the first file's cause, with its kind).
    """
    raws: list[_RawSlice] = []
    skipped: list[SkippedFile] = []
    for path in files:
        try:
            raws += _read_file(path)
        except DicomReadError as error:
            skipped.append(_skip(error, path, where))
    if not raws:
        first = skipped[0]
        cause = f"no readable DICOM file among {len(files)}; the first, {first.file_name}: {first.cause}"
        raise DicomReadError(where, cause, first.kind)
    return raws, skipped


def read_series(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> DicomSeries:
    """Read a series into one sorted stack per orientation (see the module docstring for the rules).

    Args:
        source: A folder (``<study_id>/<series_id>`` holding ``<instance_number>.dcm`` files) or its URI, or the
            files of one series as a sequence of paths (any names, e.g. one group of :func:`group_series_files`).

    Returns:
        The series: stacks with float32 volumes and per-slice geometry, whitelisted series meta, and the files
        skipped because they cannot be used.

    Raises:
        DicomReadError: for a missing or empty folder, an empty sequence, or when no file is readable (naming
            the folder, with the kind and cause of the first file).
    """
    if isinstance(source, str) and is_uri(source):
        return _read_series_uri(source)
    files, where = _source_files(source)
    raws, skipped = _read_files(files, where)
    groups, incomplete = _group_by_orientation(raws)

    stacks: list[Stack] = []
    for group in groups:
        orientation, normal = _mean_orientation(group)
        ordered, projections = _sort_along_normal(group, normal)
        stacks.append(_build_stack(ordered, projections, orientation, normal))
    if incomplete:
        logger.warning("%s: %d slices lack position or orientation; ordered by InstanceNumber", where, len(incomplete))
        ordered = sorted(incomplete, key=lambda r: _instance_key(r.geometry))
        stacks.append(_build_stack(ordered, np.full(len(ordered), np.nan), None, None))
    stacks.sort(key=_stack_order_key)
    if len(stacks) > 1:
        logger.debug("%s: %d stacks", where, len(stacks))
    return DicomSeries(
        stacks=stacks, meta=_common_meta(raws), n_files=len(files) - len(skipped), series_dir=where, skipped=skipped
    )


# --------------------------------------------------------------------------------------------------
# Grouping a request's files into series (headers only)


@dataclass(frozen=True)
class _Header:
    """What grouping needs of one file's header (internal)."""

    path: Path
    group: tuple[str, str]
    series_uid: str
    sop_instance_uid: str
    description: str
    orientation: tuple[float, ...] | None


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    """A UID of the header as a string ("" when absent)."""
    value = ds.get(keyword)
    return str(value).strip() if value else ""


def _read_header(path: Path) -> _Header:
    """Read one file's header (no pixels).

    Raises:
        DicomReadError: if the file is not DICOM or holds no image.
    """
    ds = _dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds:  # a DICOMDIR, a structured report, a presentation state...
        raise DicomReadError(path, "DICOM file holds no image (no Rows)", "no_pixels")
    first_frame = _frame_metas(ds, path, _frame_count(ds, path))[0]
    series_uid = _uid(ds, "SeriesInstanceUID")
    description = first_frame.get("SeriesDescription")
    return _Header(
        path=path,
        group=("uid", series_uid) if series_uid else ("folder", str(path.parent)),
        series_uid=series_uid,
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        description=description if isinstance(description, str) else "",
        orientation=_orientation(first_frame.get("ImageOrientationPatient")),
    )


def group_series_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[SeriesFiles], list[SkippedFile]]:
    """Group arbitrary DICOM files (e.g. one request's upload) into series, reading their headers only.

    Files are grouped by SeriesInstanceUID (files without one: by parent folder). Files inside a group, and
    groups by their first file, come in natural order (parent folder, then natural file name).

    Args:
        paths: The files, in any order.

    Returns:
        The series, and the files skipped (not DICOM, or holding no image) in file order: such a file is
        reported, never raised.
    """
    groups: dict[tuple[str, str], list[_Header]] = {}
    skipped: list[SkippedFile] = []
    for path in sorted((Path(p) for p in paths), key=_file_key):
        try:
            header = _read_header(path)
        except DicomReadError as error:
            skipped.append(_skip(error, path, str(path.parent)))
            continue
        groups.setdefault(header.group, []).append(header)  # dicts keep insertion (here: natural file) order
    series = [
        SeriesFiles(
            series_uid=headers[0].series_uid,
            description=headers[0].description,
            orientation=headers[0].orientation,
            files=tuple(header.path for header in headers),
            sop_instance_uids=tuple(header.sop_instance_uid for header in headers),
        )
        for headers in groups.values()
    ]
    return series, skipped
