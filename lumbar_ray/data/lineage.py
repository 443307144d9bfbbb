"""The lineage of a trained model: one digest of the training data it learnt from.

:func:`data_digest` gives ``data-<16 hex>``: the first 16 hex digits of a SHA-256 over, in this order,

- the digest's own format version (:data:`DIGEST_VERSION`);
- for each of ``train.csv``, ``train_series_descriptions.csv`` and ``train_label_coordinates.csv`` (the labels,
  which series each study has, and where each label was read: what a model learns from): the file's name and the
  SHA-256 of its bytes, with line endings normalised (CRLF and a lone CR read as LF) and the line breaks at the end
  of the file dropped. Line endings do not matter (a file re-saved on another system holds the same table for the
  reader, :mod:`lumbar_ray.data.rsna`); every other byte does (a changed label, a reordered row, another column
  order: a row order can change the folds);
- the cache version key (:func:`lumbar_ray.data.cache.cache_key`: the preprocessing settings that change cached
  bytes, and the cache format version).

Not in it: where the folder is (a copy elsewhere gives the same digest), modification times, the test files and
``sample_submission.csv``, and the DICOM images themselves (reading every image for each CV would take longer than
many CVs; the series CSV names every series learnt from, the cache key how its pixels were processed). Nothing of a
patient leaves this module: only hashes, the file names and the cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumbar_ray.data.cache import cache_key
from lumbar_ray.data.rsna import COORDINATES_CSV, TRAIN_CSV, TRAIN_SERIES_CSV

DIGEST_VERSION = 1
"""Format of the digest: a change to what goes in (or how) gets a new version, so old and new never compare equal."""
TRAINING_FILES: tuple[str, ...] = (TRAIN_CSV, TRAIN_SERIES_CSV, COORDINATES_CSV)
"""The CSVs of a folder that define what a model learnt, in the order they are hashed."""
PREFIX = "data-"
_LINE_BREAKS = re.compile(rb"\r\n?")


def normalised_bytes(raw: bytes) -> bytes:
    """``raw`` with CRLF and a lone CR as LF, and without line breaks at the end (what the digest hashes)."""
    return _LINE_BREAKS.sub(b"\n", raw).rstrip(b"\n")


def _file_digest(path: Path) -> str:
    """SHA-256 hex of a training CSV's :func:`normalised_bytes`."""
    return hashlib.sha256(normalised_bytes(Path(path).read_bytes())).hexdigest()


@dataclass(frozen=True)
class DataDigest:
    """The digest of a model's training data and what it was computed from.

    Attributes:
        digest: ``data-<16 hex>`` (see the module docstring).
        files: training CSV name -> SHA-256 hex of its normalised bytes.
        cache_key: the cache version key of the preprocessing.
        root: the folder the CSVs were read from (recorded beside the digest, not part of it).
    """

    digest: str
    files: dict[str, str]
    cache_key: str
    root: str

    def __str__(self) -> str:
        return self.digest

    def to_json(self) -> dict[str, Any]:
        """A plain dict (a run folder's record, an MLflow dataset profile): hashes and names only."""
        return {"digest": self.digest, "version": DIGEST_VERSION, "files": dict(self.files),
                "cache_key": self.cache_key, "root": self.root}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataDigest:
        return cls(str(data["digest"]), dict(data["files"]), str(data["cache_key"]), str(data["root"]))


def _combine(files: dict[str, str], key: str) -> str:
    """``data-<16 hex>`` of the training CSVs' digests (in :data:`TRAINING_FILES` order) and a cache key."""
    payload = {"version": DIGEST_VERSION, "files": [[name, files[name]] for name in TRAINING_FILES], "cache": key}
    return PREFIX + hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def data_digest(root: str | Path, settings: dict[str, Any]) -> DataDigest:
    """The digest of the training data of an RSNA-format folder, preprocessed with ``settings``.

    Args:
        root: the folder (its :data:`TRAINING_FILES` are read).
        settings: the preprocessing settings that define the cache version (:func:`lumbar_ray.config.cache_settings`).

    Raises:
        FileNotFoundError: a training CSV is missing (the message names it).
    """
    root = Path(root)
    missing = [name for name in TRAINING_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: no training data to digest")
    files = {name: _file_digest(root / name) for name in TRAINING_FILES}
    key = cache_key(settings)
    return DataDigest(_combine(files, key), files, key, str(root))
