"""One decoded DICOM series -> one cache entry: the pure core of preprocessing (no Ray, no I/O).

- intensities: per series, clipped to the ``clip_percentiles`` of all its voxels (after rescale and MONOCHROME1
  inversion) and mapped linearly to uint8 0..255 (a constant series maps to 0); the window in original units is
  kept in the metadata;
- geometry: every slice resized from its instance's own grid to ``image_size x image_size`` (area averaging when
  shrinking, bilinear when growing); the per-slice scale factors, positions, orientations, pixel spacings,
  original shapes and instance numbers are kept, so label coordinates and predicted points map both ways (see
  :mod:`lumbar_ray.data.cache`);
- warnings, not failures: several orientations (stacks), slices of mixed shapes, incomplete geometry, unreadable
  files left out of the series (the reader's ``skipped``; the cache holds the other slices).

The Ray Data job (:mod:`lumbar_ray.data.preprocess`) calls it once per series.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from lumbar_ray.config import PreprocessConfig
from lumbar_ray.data.cache import SeriesMeta, SliceTable, StackMeta
from lumbar_ray.data.dicom import DicomSeries, SkippedFile, Stack

# Unreadable files named in a series' skipped_files warning; the failures table lists every one.
_LISTED_SKIPPED_FILES = 5


def intensity_window(volume: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The series' clipping window: the given percentiles of all voxels.

    A strided sample of about 100k voxels is used: its percentiles differ from the full volume's by far less
    than one output grey level, and partitioning every voxel cost more than decoding them (profiled).
    """
    flat = volume.reshape(-1)
    step = max(1, flat.size // 100_000)
    low, high = np.percentile(flat[::step], percentiles)
    return float(low), float(high)


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map linearly to 0..255 (a flat window maps everything to 0)."""
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = np.subtract(image, np.float32(low), dtype=np.float32)
    scaled *= np.float32(255.0 / (high - low))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def resize_slice(image: np.ndarray, size: int) -> np.ndarray:
    """Resize one slice to ``size x size``: area averaging when shrinking (no aliasing), bilinear when growing."""
    shrinking = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _skipped_files_warning(skipped: list[SkippedFile]) -> str:
    """The warning of a series cached without its unreadable files, naming the first few of them."""
    named = ", ".join(f"{s.file_name} ({s.kind})" for s in skipped[:_LISTED_SKIPPED_FILES])
    more = f" and {len(skipped) - _LISTED_SKIPPED_FILES} more" if len(skipped) > _LISTED_SKIPPED_FILES else ""
    return f"skipped_files: {len(skipped)} unreadable file(s) left out: {named}{more}"


def series_warnings(series: DicomSeries) -> list[str]:
    """Handled oddities worth reporting: several orientations, mixed slice shapes, incomplete geometry, and
    unreadable files left out (last, so a series without them keeps its warnings as before)."""
    warnings = []
    if len(series.stacks) > 1:
        warnings.append(f"multiple_orientations: {len(series.stacks)} stacks")
    resized = sum(int(np.sum(stack.resized)) for stack in series.stacks)
    if resized:
        warnings.append(f"mixed_shapes: {resized} slices resized to their stack's modal shape")
    if not series.geometry_complete:
        warnings.append("incomplete_geometry: slices without position/orientation ordered by instance number")
    if series.skipped:
        warnings.append(_skipped_files_warning(series.skipped))
    return warnings


def _stack_meta(stack: Stack, start: int) -> StackMeta:
    """The cached description of one stack whose slices start at volume index ``start``."""
    return StackMeta(
        start=start,
        stop=start + stack.n_slices,
        orientation=None if stack.orientation is None else tuple(float(v) for v in stack.orientation),
        normal=None if stack.normal is None else tuple(float(v) for v in stack.normal),
    )


def _slice_rows(stack: Stack, stack_index: int, size: int) -> Iterator[tuple]:
    """One row per slice of ``stack``, in :class:`SliceTable` field order."""
    for i, geometry in enumerate(stack.geometry):
        rows, cols = geometry.shape
        yield (
            geometry.instance_number,
            stack_index,
            geometry.position,
            geometry.orientation,
            geometry.pixel_spacing,
            (rows, cols),
            (size / rows, size / cols),
            bool(stack.resized[i]),
            float(stack.positions_along_normal[i]),
            geometry.file_name,
        )


def preprocess_series(series: DicomSeries, cfg: PreprocessConfig) -> tuple[np.ndarray, SeriesMeta]:
    """One series -> ``(uint8 volume (n, size, size), metadata)`` as stored in the cache (without its ids)."""
    size = cfg.image_size
    volumes = [stack.volume for stack in series.stacks]
    flat = volumes[0].reshape(-1) if len(volumes) == 1 else np.concatenate([v.reshape(-1) for v in volumes])
    low, high = intensity_window(flat, cfg.clip_percentiles)
    resized = np.empty((series.n_slices, size, size), dtype=np.float32)
    stacks, rows = [], []
    for stack_index, stack in enumerate(series.stacks):
        stacks.append(_stack_meta(stack, len(rows)))
        for i in range(stack.n_slices):
            resized[len(rows) + i] = resize_slice(stack.volume[i], size)
        rows += _slice_rows(stack, stack_index, size)
    out = to_uint8(resized, low, high)  # after resizing: fewer pixels to convert (and no double rounding)
    meta = SeriesMeta(
        size=size,
        intensity_window=(low, high),
        stacks=tuple(stacks),
        slices=SliceTable(*zip(*rows, strict=True)),  # rows -> one tuple per field
        dicom=series.meta,
        warnings=tuple(series_warnings(series)),
    )
    return out, meta
