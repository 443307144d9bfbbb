"""The preprocessed-series cache: format, atomic writes, reading back, and coordinate mapping.

Layout under a cache root (a local folder or any URI pyarrow understands, e.g. ``s3://bucket/cache``)::

    <root>/<key>/                       key = "pp-" + hash of the preprocessing settings and FORMAT_VERSION
        config.json                     the settings that produced this version
        series/<study_id>/<series_id>.npy    uint8 volume, shape (n_slices, size, size)
        series/<study_id>/<series_id>.json   SeriesMeta: per-slice geometry, scales, intensity window, warnings
        manifest.parquet                one row per cached series (rewritten at the end of each run)
        failures.csv                    problems of the latest run: study, series, file, kind, error, outcome

A changed setting gives a new key, so versions never mix. Each file is written to a temporary name and then
renamed; the ``.json`` is written after the ``.npy`` and is the entry's commit marker: an entry exists only when
its ``.json`` does, so a killed run never leaves a half-written entry behind (a stray ``.npy`` or temporary file
is overwritten by the next run). Entries are written once (preprocessing skips an entry that exists), so a copy of
one never goes stale: :func:`copy_to_node` keeps a node-local copy of the entries a training run reads from a
remote root, made once per node and version rather than fetched per item and epoch.

Slices of a series with several orientations are concatenated stack after stack (each sorted along its own
normal, see :mod:`lumbar_ray.data.dicom`); ``slices.stack`` says which stack a slice belongs to. Every slice
is resized from its instance's own grid to ``size x size``; a point maps with pixel-centre alignment:
``x_cache = (x + 0.5) * scale_x - 0.5`` with ``scale_x = size / original_columns`` (and the same for y).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from lumbar_ray.config import settings_hash

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
NODE_CACHE_DIR = "lumbar_ray_cache"
"""The folder under the node's temporary directory that holds its copies of remote caches (by default)."""
MANIFEST_NAME = "manifest.parquet"
FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ("study_id", "series_id", "split", "file", "kind", "error", "outcome")
# Adjacent slices of one stack farther apart than this many of its usual spacings lie in separate blocks: per-level
# axial blocks sharing one orientation are ~30 mm apart at ~4 mm spacing (a factor of ~7), while a single missing
# slice leaves a gap of two spacings and must keep its block whole.
BLOCK_GAP_FACTOR = 2.5


def cache_key(settings: dict[str, Any]) -> str:
    """Version key of a cache: a hash of the settings that change cached bytes, and the format version."""
    return settings_hash({"format": FORMAT_VERSION, **settings}, "pp-")


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``scheme://...``, read through pyarrow) rather than a local path.

    The one rule by which every root (a cache root, an RSNA data root) is told local or remote.
    """
    return "://" in str(location)


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local folder (relative allowed) or a URI such as ``s3://b/p``.

    A URI may carry the filesystem's options (pyarrow's ``FileSystem.from_uri``), e.g.
    ``s3://bucket/rsna?endpoint_override=127.0.0.1:9000&scheme=http`` for an S3-compatible server.
    """
    text = str(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    return pafs.FileSystem.from_uri(text)


def without_credentials(uri: str) -> str:
    """``uri`` without the ``user:secret@`` a pyarrow URI can carry: what may be shown, logged or hashed."""
    split = urlsplit(uri)
    return urlunsplit(split._replace(netloc=split.netloc.rsplit("@", 1)[-1]))


def join_location(root: str | Path, *parts: str) -> Path | str:
    """``root`` with ``parts`` appended: a local path as a :class:`~pathlib.Path` (``Path(root).joinpath(*parts)``,
    as given, not resolved), a URI as a string with the parts added to its path and its query (the filesystem's
    options, see :func:`filesystem`) kept."""
    if not is_uri(root):
        return Path(root).joinpath(*parts)
    if not parts:
        return str(root)
    split = urlsplit(str(root))
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def _to_json_value(value: Any) -> Any:
    """A tuple (a per-slice vector) as the list JSON stores; anything else unchanged."""
    return list(value) if isinstance(value, tuple) else value


def _from_json_value(value: Any) -> Any:
    """A JSON list (a per-slice vector) as a tuple, so the metadata stays immutable; anything else unchanged."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class StackMeta:
    """One orientation group of a cached series: slices ``start:stop`` of the volume.

    Attributes:
        start: index of the stack's first slice in the cached volume.
        stop: one past its last slice.
        orientation: the stack's mean ImageOrientationPatient (row then column direction cosines), or None for the
            stack of slices lacking geometry.
        normal: its unit normal ``row x column`` (slices are sorted along it), or None likewise.
    """

    start: int
    stop: int
    orientation: tuple[float, ...] | None
    normal: tuple[float, ...] | None

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the entry's ``stacks`` list."""
        return {field.name: _to_json_value(getattr(self, field.name)) for field in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackMeta:
        """Inverse of :meth:`to_json`."""
        return cls(**{field.name: _from_json_value(data[field.name]) for field in fields(cls)})


@dataclass(frozen=True)
class SliceTable:
    """Per-slice geometry of a cached series: one tuple per field, one item per slice in volume order.

    Vectors are tuples; a slice lacking a DICOM value has None there (and NaN in ``position_along_normal``).

    Attributes:
        instance_number: InstanceNumber (None when absent; may repeat across stacks).
        stack: index of the slice's stack in :attr:`SeriesMeta.stacks`.
        position: ImagePositionPatient (mm) of the centre of original pixel (0, 0).
        orientation: ImageOrientationPatient: row direction cosines then column direction cosines.
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm, in the original grid.
        original_shape: the instance's own (rows, columns).
        scale: ``(scale_y, scale_x)``: cache pixels per original pixel.
        resized: whether the reader resized the slice to its stack's modal shape.
        position_along_normal: projection of ``position`` on the stack's normal (mm).
        file_name: the DICOM file's base name.
    """

    instance_number: tuple[int | None, ...]
    stack: tuple[int, ...]
    position: tuple[tuple[float, float, float] | None, ...]
    orientation: tuple[tuple[float, float, float, float, float, float] | None, ...]
    pixel_spacing: tuple[tuple[float, float] | None, ...]
    original_shape: tuple[tuple[int, int], ...]
    scale: tuple[tuple[float, float], ...]
    resized: tuple[bool, ...]
    position_along_normal: tuple[float, ...]
    file_name: tuple[str, ...]

    def __post_init__(self) -> None:
        lengths = {field.name: len(getattr(self, field.name)) for field in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"per-slice fields differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.instance_number)

    def to_json(self) -> dict[str, list]:
        """The ``slices`` JSON object: field -> list over slices (vectors as lists, missing values null)."""
        return {field.name: [_to_json_value(v) for v in getattr(self, field.name)] for field in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> SliceTable:
        """Inverse of :meth:`to_json`."""
        return cls(**{field.name: tuple(_from_json_value(v) for v in data[field.name]) for field in fields(cls)})


_ID_FIELDS = ("study_id", "series_id", "split", "series_description")


def _positive_float(value: Any) -> float | None:
    """A DICOM tag's value as a positive finite float, or None (absent, malformed, zero)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


@dataclass(frozen=True)
class SeriesMeta:
    """The metadata of one cache entry (its ``.json``): what maps points to and from the original images.

    Attributes:
        size: in-plane size of every cached slice (``size x size``).
        intensity_window: ``(low, high)`` in rescaled DICOM units, mapped to 0..255.
        stacks: the orientation groups, in volume order.
        slices: per-slice geometry.
        dicom: the whitelisted DICOM tags common to every file of the series (plain JSON values).
        warnings: handled oddities (several orientations, mixed shapes, incomplete geometry).
        study_id: the study; None until the preprocessing job names the entry.
        series_id: the series; likewise.
        split: ``train`` or ``test``; likewise.
        series_description: e.g. ``Sagittal T1``; likewise.
    """

    size: int
    intensity_window: tuple[float, float]
    stacks: tuple[StackMeta, ...]
    slices: SliceTable
    dicom: dict[str, Any]
    warnings: tuple[str, ...]
    study_id: int | None = None
    series_id: int | None = None
    split: str | None = None
    series_description: str | None = None

    def stack_bounds(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of the stack holding slice ``index`` (the whole volume when no stack is recorded)."""
        if not self.stacks:
            return 0, len(self.slices)
        stack = self.stacks[self.slices.stack[index]]
        return stack.start, stack.stop

    def stack_spacing(self, index: int) -> float | None:
        """Usual distance (mm) between adjacent slices of the stack holding slice ``index``.

        The median gap along the stack's normal (robust to the wide gaps between blocks of one orientation); for a
        stack without two positioned slices, the series' SpacingBetweenSlices, else its SliceThickness; None when
        none of these is known.
        """
        start, stop = self.stack_bounds(index)
        positions = np.asarray(self.slices.position_along_normal[start:stop], dtype=np.float64)
        gaps = np.abs(np.diff(positions[np.isfinite(positions)]))
        gaps = gaps[gaps > 0]
        if len(gaps):
            return float(np.median(gaps))
        for tag in ("SpacingBetweenSlices", "SliceThickness"):
            value = _positive_float(self.dicom.get(tag))
            if value is not None:
                return value
        return None

    def block_bounds(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of the block of slices holding slice ``index``: the run of its stack in which no two
        adjacent slices lie more than :data:`BLOCK_GAP_FACTOR` usual spacings apart.

        A stack is one orientation; a block is one acquired slab. Tilted per-level axial blocks are separate
        stacks already; untilted ones share a stack and are told apart by the gap between them. Without
        positions along the normal the whole stack is one block.
        """
        start, stop = self.stack_bounds(index)
        positions = np.asarray(self.slices.position_along_normal[start:stop], dtype=np.float64)
        spacing = self.stack_spacing(index)
        if spacing is None or not np.isfinite(positions).all():
            return start, stop
        breaks = start + 1 + np.flatnonzero(np.abs(np.diff(positions)) > BLOCK_GAP_FACTOR * spacing)
        before, after = breaks[breaks <= index], breaks[breaks > index]
        return int(before[-1]) if len(before) else start, int(after[0]) if len(after) else stop

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored on disk.

        Key order and values are those of the format's first version (existing caches stay valid and a rewrite
        gives the same bytes); the ids are written only once set.
        """
        out = {
            "size": self.size,
            "intensity_window": list(self.intensity_window),
            "stacks": [stack.to_json() for stack in self.stacks],
            "slices": self.slices.to_json(),
            "dicom": dict(self.dicom),
            "warnings": list(self.warnings),
        }
        return out | {name: getattr(self, name) for name in _ID_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SeriesMeta:
        """Inverse of :meth:`to_json`."""
        return cls(
            size=data["size"],
            intensity_window=tuple(data["intensity_window"]),
            stacks=tuple(StackMeta.from_json(stack) for stack in data["stacks"]),
            slices=SliceTable.from_json(data["slices"]),
            dicom=dict(data["dicom"]),
            warnings=tuple(data["warnings"]),
            **{name: data.get(name) for name in _ID_FIELDS},
        )


@dataclass
class CachedSeries:
    """One cached series: the volume and what is needed to map points to and from the original images."""

    volume: np.ndarray
    meta: SeriesMeta

    @property
    def instance_numbers(self) -> np.ndarray:
        return np.asarray(self.meta.slices.instance_number)

    @property
    def scale(self) -> np.ndarray:
        """Per-slice ``(scale_y, scale_x)``: cache pixels per original pixel."""
        return np.asarray(self.meta.slices.scale, dtype=np.float64)

    def mm_per_pixel(self, index: int) -> np.ndarray:
        """``(x, y)`` millimetres per cache pixel on slice ``index``: its PixelSpacing over the cache's resize.

        The one rule from cache pixels to millimetres (localisation boxes and errors, crop regions in mm).

        Raises:
            ValueError: if the slice has no PixelSpacing.
        """
        spacing = self.meta.slices.pixel_spacing[index]
        if spacing is None:
            raise ValueError(f"series {self.meta.series_id}: slice {index} has no PixelSpacing")
        row_spacing, col_spacing = (float(v) for v in spacing)
        scale_y, scale_x = self.scale[index]
        return np.array([col_spacing / scale_x, row_spacing / scale_y])

    def slice_of_instance(self, instance_number: int) -> int:
        """Index in the cached volume of the slice with this InstanceNumber.

        Raises:
            KeyError: if the series has no such instance.
        """
        matches = np.flatnonzero(self.instance_numbers == instance_number)
        if len(matches) == 0:
            raise KeyError(f"series {self.meta.series_id} has no instance {instance_number}")
        return int(matches[0])

    def original_to_cache_at(self, index: int, x: float, y: float) -> tuple[float, float]:
        """Map a point of slice ``index``'s original grid (x = column, y = row) to ``(x, y)`` in the cache.

        By index rather than InstanceNumber: instance numbers may repeat across the stacks of a series.
        """
        scale_y, scale_x = self.scale[index]
        return (x + 0.5) * scale_x - 0.5, (y + 0.5) * scale_y - 0.5

    def original_to_cache(self, instance_number: int, x: float, y: float) -> tuple[int, float, float]:
        """Map a point of an instance's own pixel grid (x = column, y = row) to ``(slice, x, y)`` in the cache."""
        index = self.slice_of_instance(instance_number)
        return index, *self.original_to_cache_at(index, x, y)

    def cache_to_original(self, index: int, x: float, y: float) -> tuple[int, float, float]:
        """Map a cache point ``(slice, x, y)`` back to ``(instance_number, x, y)`` in that instance's grid."""
        scale_y, scale_x = self.scale[index]
        return int(self.instance_numbers[index]), (x + 0.5) / scale_x - 0.5, (y + 0.5) / scale_y - 0.5


class SeriesCache:
    """One version of the cache (root + key): atomic entry writes, existence checks, reads.

    Args:
        root: cache root folder or URI.
        settings: the preprocessing settings that define the version (see :func:`cache_key`).
    """

    def __init__(self, root: str | Path, settings: dict[str, Any]) -> None:
        self.root = str(root)
        self.settings = dict(settings)
        self.key = cache_key(self.settings)
        self.fs, base = filesystem(root)
        self.path = f"{base.rstrip('/')}/{self.key}"

    def __reduce__(self):  # rebuild the filesystem on the worker rather than pickling it
        return (SeriesCache, (self.root, self.settings))

    def _entry(self, study_id: int, series_id: int, suffix: str) -> str:
        return f"{self.path}/series/{study_id}/{series_id}.{suffix}"

    def prepare(self) -> None:
        """Create the version folder and write its ``config.json`` (idempotent)."""
        self.fs.create_dir(f"{self.path}/series", recursive=True)
        config = f"{self.path}/config.json"
        if self.fs.get_file_info(config).type != pafs.FileType.File:  # a rerun changes nothing
            self._write_bytes(config, json.dumps(self.settings, indent=2).encode())

    def has(self, study_id: int, series_id: int) -> bool:
        """Whether the entry is complete (its ``.json`` commit marker exists)."""
        return self.fs.get_file_info(self._entry(study_id, series_id, "json")).type == pafs.FileType.File

    def write(self, study_id: int, series_id: int, volume: np.ndarray, meta: SeriesMeta) -> None:
        """Write one entry atomically: the volume first, then the metadata that commits it."""
        self.fs.create_dir(f"{self.path}/series/{study_id}", recursive=True)
        buffer = io.BytesIO()
        np.save(buffer, volume, allow_pickle=False)
        self._write_bytes(self._entry(study_id, series_id, "npy"), buffer.getvalue())
        self._write_bytes(self._entry(study_id, series_id, "json"), json.dumps(meta.to_json()).encode())

    def _write_bytes(self, path: str, data: bytes) -> None:
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, path)  # rename: readers see the old file or the whole new one

    def read_meta(self, study_id: int, series_id: int) -> SeriesMeta:
        """The metadata of one entry."""
        with self.fs.open_input_stream(self._entry(study_id, series_id, "json")) as stream:
            return SeriesMeta.from_json(json.loads(stream.read()))

    def read(self, study_id: int, series_id: int, mmap: bool = False) -> CachedSeries:
        """Load one entry; ``mmap`` memory-maps the volume of a local cache (crops read only what they need)."""
        meta = self.read_meta(study_id, series_id)
        path = self._entry(study_id, series_id, "npy")
        if mmap and isinstance(self.fs, pafs.LocalFileSystem):
            volume = np.load(path, mmap_mode="r")
        else:
            with self.fs.open_input_file(path) as handle:
                volume = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        return CachedSeries(volume=volume, meta=meta)

    def read_manifest(self) -> pd.DataFrame:
        """The manifest (empty frame when none was written yet)."""
        path = f"{self.path}/{MANIFEST_NAME}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return pd.DataFrame(columns=list(MANIFEST_COLUMNS))
        with self.fs.open_input_file(path) as handle:
            return pd.read_parquet(io.BytesIO(handle.read()))

    def cached_keys(self) -> set[tuple[int, int]]:
        """``(study_id, series_id)`` of every entry the manifest lists."""
        manifest = self.read_manifest()
        return set(zip(manifest["study_id"].astype(int), manifest["series_id"].astype(int), strict=True))

    def write_manifest(self, manifest: pd.DataFrame) -> None:
        """Replace the manifest atomically."""
        buffer = io.BytesIO()
        manifest.to_parquet(buffer, index=False)
        self._write_bytes(f"{self.path}/{MANIFEST_NAME}", buffer.getvalue())

    def write_failures(self, failures: pd.DataFrame) -> None:
        """Replace the failures table of the latest run atomically."""
        self._write_bytes(f"{self.path}/{FAILURES_NAME}", failures.to_csv(index=False).encode())

    def read_failures(self) -> pd.DataFrame:
        """The failures table of the latest run (empty when there is none)."""
        path = f"{self.path}/{FAILURES_NAME}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return pd.DataFrame(columns=list(FAILURE_COLUMNS))
        with self.fs.open_input_stream(path) as stream:
            return pd.read_csv(io.BytesIO(stream.read()))


def node_cache_folder(root: str | Path, base: str | Path | None = None) -> Path:
    """Where a node keeps its copy of the cache root ``root``: ``<base>/<hash of root>`` (the cache versions go
    below it, by key, as under the root itself).

    Args:
        root: the cache root (a URI).
        base: a node-local folder; None = ``<the node's temporary directory>/lumbar_ray_cache``.
    """
    # The credentials a URI may carry name no other place: left out, so a rotated key finds the same copy.
    digest = hashlib.sha256(without_credentials(str(root)).encode()).hexdigest()[:16]
    return Path(base if base is not None else Path(tempfile.gettempdir()) / NODE_CACHE_DIR) / digest


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` against the other processes of this node (``flock``: the kernel releases
    it if its holder dies, so a killed worker never blocks the next one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


COPY_ATTEMPTS = 4
"""Tries of one entry's copy before the error is raised (object storage throttles and drops requests now and then)."""


def _copy_entry(source: SeriesCache, target: SeriesCache, study_id: int, series_id: int) -> bool:
    """Copy one entry with the cache's own commit rule (the ``.npy``, then its ``.json``, each renamed into
    place); False only when the source has no such entry (its targets are then masked, as when the source is read
    directly).

    Raises:
        OSError: the copy failed :data:`COPY_ATTEMPTS` times (a full disk, storage that keeps failing): never
            turned into a missing entry, which would train this node's ranks on other data than the others'.
    """
    for attempt in range(1, COPY_ATTEMPTS + 1):
        try:
            if not source.has(study_id, series_id):
                return False
            target.fs.create_dir(f"{target.path}/series/{study_id}", recursive=True)
            for suffix in ("npy", "json"):
                with source.fs.open_input_stream(source._entry(study_id, series_id, suffix)) as stream:
                    data = stream.read()
                target._write_bytes(target._entry(study_id, series_id, suffix), data)
            return True
        except OSError as error:
            if attempt == COPY_ATTEMPTS:
                raise OSError(f"cache entry {study_id}/{series_id} could not be copied to this node from "
                              f"{source.path} after {COPY_ATTEMPTS} tries: {error}") from error  # fmt: skip
            logger.warning("cache entry %s/%s: copy try %d failed (%s); retrying", study_id, series_id, attempt, error)
            time.sleep(0.5 * 2**attempt)
    return False


def copy_to_node(
    cache: SeriesCache, entries: Iterable[tuple[int, int]], base: str | Path | None = None, threads: int = 8
) -> SeriesCache:
    """A node-local copy of ``entries`` of a (remote) cache version, as a :class:`SeriesCache` to read instead.

    Entries already on the node are not fetched again (see the module docstring: they never change). The processes
    of one node (the workers of a fold, the folds trained at once) take turns on a lock per version, so the first
    copies what is missing while the others wait and then find it there; an entry is whole or absent at any
    moment (the cache's commit rule), so a copy killed midway is completed by the next.

    Args:
        cache: the cache version to copy from.
        entries: ``(study_id, series_id)`` of the entries to copy; those the source lacks are left out.
        base: the node-local folder (:func:`node_cache_folder`); None = under the node's temporary directory.
        threads: entries fetched at once (object storage answers each request slowly, but many in parallel).
    """
    local = SeriesCache(node_cache_folder(cache.root, base), cache.settings)
    wanted = sorted({(int(study_id), int(series_id)) for study_id, series_id in entries})
    started = time.perf_counter()
    with _node_lock(Path(f"{local.path}.lock")):
        local.prepare()
        missing = [entry for entry in wanted if not local.has(*entry)]
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            copied = sum(pool.map(lambda entry: _copy_entry(cache, local, *entry), missing))
    logger.info("cache %s on this node at %s: %d of %d entries copied now, %d there already, %d absent (%.1f s)",
                local.key, local.path, copied, len(wanted), len(wanted) - len(missing), len(missing) - copied,
                time.perf_counter() - started)  # fmt: skip
    return local


class MemoryCache:
    """A cache version held in memory: the series of a study that arrives as DICOM files (a served request).

    The read side of :class:`SeriesCache` (``read``, ``read_meta``, ``has``, ``cached_keys``) over a dict, so the
    localisation and crop code that reads a cache reads it unchanged; nothing touches a disk.

    Args:
        settings: the preprocessing settings the entries were made with (the model's contract's).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)
        self.key = cache_key(self.settings)
        self.entries: dict[tuple[int, int], CachedSeries] = {}

    def write(self, study_id: int, series_id: int, volume: np.ndarray, meta: SeriesMeta) -> None:
        """Hold one entry (read back as it is)."""
        self.entries[(int(study_id), int(series_id))] = CachedSeries(volume=volume, meta=meta)

    def has(self, study_id: int, series_id: int) -> bool:
        """Whether the entry is held."""
        return (int(study_id), int(series_id)) in self.entries

    def read_meta(self, study_id: int, series_id: int) -> SeriesMeta:
        """The metadata of one entry."""
        return self.read(study_id, series_id).meta

    def read(self, study_id: int, series_id: int, mmap: bool = False) -> CachedSeries:
        """One entry (``mmap`` is accepted for :class:`SeriesCache`'s signature; it changes nothing here).

        Raises:
            OSError: an entry that is not held (as a missing file of a :class:`SeriesCache` would).
        """
        try:
            return self.entries[(int(study_id), int(series_id))]
        except KeyError:
            raise FileNotFoundError(f"series {study_id}/{series_id} is not in this in-memory cache") from None

    def cached_keys(self) -> set[tuple[int, int]]:
        """``(study_id, series_id)`` of every entry held."""
        return set(self.entries)


MANIFEST_COLUMNS = (
    "study_id",
    "series_id",
    "split",
    "series_description",
    "n_slices",
    "n_stacks",
    "size",
    "warnings",
)


def manifest_row(meta: SeriesMeta) -> dict[str, Any]:
    """The manifest row of one entry, from its metadata."""
    return {
        "study_id": int(meta.study_id),
        "series_id": int(meta.series_id),
        "split": meta.split,
        "series_description": meta.series_description,
        "n_slices": len(meta.slices),
        "n_stacks": len(meta.stacks),
        "size": int(meta.size),
        "warnings": ";".join(meta.warnings),
    }
