"""DICOM series -> the cache that training, tuning and inference read: a Ray Data job.

The pure core (:func:`lumbar_ray.data.volume.preprocess_series`) turns one series read by
:func:`lumbar_ray.data.dicom.read_series` into a cache entry:

- intensities: per series, clipped to the ``clip_percentiles`` of all its voxels (after rescale and
  MONOCHROME1 inversion) and mapped linearly to uint8 0..255 (a constant series maps to 0); the window in
  original units is kept in the metadata;
- geometry: every slice resized from its instance's own grid to ``image_size x image_size`` (area averaging
  when shrinking, bilinear when growing); the per-slice scale factors, positions, orientations, pixel spacings,
  original shapes and instance numbers are kept, so label coordinates and predicted points map both ways
  (see :mod:`lumbar_ray.data.cache`);
- warnings, not failures: several orientations (stacks), slices of mixed shapes, incomplete geometry, unreadable
  files left out of the series.

The Ray layer (:func:`run_preprocess`) builds one row per series from the validated CSVs (no globbing of image
files on the driver), skips series already in the manifest of this cache version, and runs the rest through
``map_batches`` on an actor pool; each actor writes its entries straight to the cache (volumes never travel
through the driver) and returns one small status row per series. A bad series becomes a row of the failures
table naming study, series, file and kind; it never stops the job. An unreadable file inside a series that is
otherwise readable does not fail it: the series is cached without that file, and the file becomes a row of its
own (outcome ``cached_without_file``, kind ``not_dicom``/``undecodable``/...); a series recovered from an
interrupted run names its skipped files only in its ``skipped_files`` warning. Dead actors are restarted and their tasks
retried (Ray Data's actor-pool defaults). Entries written by a run that was killed are found by the next run and reused.

The data root may be a URI such as ``s3://bucket/rsna``: the driver reads its CSVs, and each actor lists and downloads
the files of its series itself (see :func:`lumbar_ray.data.dicom.read_series`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import PreprocessConfig, cache_settings
from lumbar_ray.data.cache import FAILURE_COLUMNS, MANIFEST_COLUMNS, SeriesCache, join_location, manifest_row
from lumbar_ray.data.dicom import DicomReadError, DicomSeries, read_series
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.volume import preprocess_series
from lumbar_ray.raytools import ensure_ray

logger = logging.getLogger(__name__)

STATUS_COLUMNS = (
    "study_id",
    "series_id",
    "split",
    "series_description",
    "status",
    "n_slices",
    "n_stacks",
    "size",
    "kind",
    "file",
    "error",
    "warnings",
    "skipped",
)
SKIPPED_FILE_OUTCOME = "cached_without_file"
"""Outcome of a failures-table row naming an unreadable file left out of a series that was cached."""


def _failure_file(error: Exception, folder: Path | str) -> str:
    path = getattr(error, "path", None)
    return Path(path).name if path and Path(path) != Path(folder) else ""


def _skipped_json(series: DicomSeries) -> str | None:
    """The files a series was cached without, as JSON (a status row crosses Ray as plain columns); None if none."""
    if not series.skipped:
        return None
    return json.dumps([{"file": s.file_name, "kind": s.kind, "error": s.cause} for s in series.skipped])


def process_row(row: dict[str, Any], cache: SeriesCache, cfg: PreprocessConfig) -> dict[str, Any]:
    """Cache one series (or find it cached by an interrupted run); never raises for bad input."""
    study_id, series_id = int(row["study_id"]), int(row["series_id"])
    status = {key: None for key in STATUS_COLUMNS} | {
        "study_id": study_id,
        "series_id": series_id,
        "split": row["split"],
        "series_description": row["series_description"],
        "n_slices": 0,
        "n_stacks": 0,
        "size": cfg.image_size,
    }
    if cache.has(study_id, series_id):  # written by a run that was killed before its manifest
        return status | manifest_row(cache.read_meta(study_id, series_id)) | {"status": "recovered"}
    folder = join_location(row["folder"])
    try:
        series = read_series(folder)
        volume, meta = preprocess_series(series, cfg)
    except DicomReadError as error:
        return status | {
            "status": "failed",
            "kind": error.kind,
            "file": _failure_file(error, folder),
            "error": error.cause,
        }
    except Exception as error:  # a bug or an exotic file must not kill the job: record it, name the series
        logger.exception("unexpected error on series %s/%s", study_id, series_id)
        return status | {"status": "failed", "kind": type(error).__name__, "file": "", "error": str(error)}
    meta = replace(
        meta, study_id=study_id, series_id=series_id, split=row["split"], series_description=row["series_description"]
    )
    cache.write(study_id, series_id, volume, meta)
    return status | manifest_row(meta) | {"status": "done", "skipped": _skipped_json(series)}


class SeriesWorker:
    """The Ray Data actor: caches the series of each batch and returns their status rows."""

    def __init__(self, cache: SeriesCache, cfg: PreprocessConfig) -> None:
        self.cache = cache
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        statuses = [process_row(row, self.cache, self.cfg) for row in rows]
        return {key: [status[key] for status in statuses] for key in STATUS_COLUMNS}


def series_items(
    data_root: str | Path, splits: Sequence[str] | None = None, study_ids: Collection[int] | None = None
) -> list[dict[str, Any]]:
    """One item per series listed in the validated CSVs (train and test), with its expected folder (a URI under a
    URI root).

    Args:
        data_root: RSNA-format folder or its URI.
        splits: only these splits (``train``, ``test``); None = both.
        study_ids: only these studies; None = all.
    """
    data = load_rsna(data_root)
    wanted = None if study_ids is None else {int(s) for s in study_ids}
    items = []
    for split, frame, images in (
        ("train", data.train_series, data.train_images_dir),
        ("test", data.test_series, data.test_images_dir),
    ):
        if frame is None or (splits is not None and split not in splits):
            continue
        if wanted is not None:
            frame = frame[frame["study_id"].astype(int).isin(wanted)]
        images = images if images is not None else join_location(data_root, f"{split}_images")
        for row in frame.itertuples(index=False):
            items.append(
                {
                    "study_id": int(row.study_id),
                    "series_id": int(row.series_id),
                    "split": split,
                    "series_description": str(row.series_description),
                    "folder": str(join_location(images, str(row.study_id), str(row.series_id))),
                }
            )
    return items


@dataclass
class PreprocessSummary:
    """What a preprocessing run did."""

    cache_path: str
    key: str
    total: int
    done: int
    recovered: int
    skipped: int
    failed: int
    slices: int
    seconds: float
    failures: pd.DataFrame = field(repr=False)
    warnings: int = 0
    files_skipped: int = 0

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    def _kind_counts(self, outcome: str) -> dict[str, int]:
        rows = self.failures[self.failures["outcome"] == outcome]
        return {str(k): int(v) for k, v in rows["kind"].value_counts().sort_index().items()}

    def failure_counts(self) -> dict[str, int]:
        """Failed series by kind."""
        return self._kind_counts("failed")

    def skipped_file_counts(self) -> dict[str, int]:
        """Unreadable files left out of cached series, by kind."""
        return self._kind_counts(SKIPPED_FILE_OUTCOME)

    def format(self) -> str:
        """The end-of-run summary printed by the CLI."""
        lines = [
            f"cache {self.cache_path}",
            f"  series: {self.total} listed; {self.done} done, {self.recovered} recovered from an interrupted "
            f"run, {self.skipped} skipped (already cached), {self.failed} failed",
            f"  slices written: {self.slices:,} in {self.seconds:.1f} s ({self.slices_per_second:.0f} slices/s)",
            f"  series cached with warnings: {self.warnings}",
        ]
        counts, skipped = self.failure_counts(), self.skipped_file_counts()
        if skipped:
            lines.append(
                f"  unreadable files left out of cached series: {self.files_skipped} ("
                + ", ".join(f"{k} {v}" for k, v in skipped.items())
                + ")"
            )
        if counts:
            lines.append("  failures by kind: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if counts or skipped:
            lines.append(f"  failures table: {self.cache_path}/failures.csv")
        return "\n".join(lines)


def run_on_ray(
    items: list[dict[str, Any]], cache: SeriesCache, cfg: PreprocessConfig, worker: type = SeriesWorker
) -> list[dict[str, Any]]:
    """Shard the items over an actor pool; each actor writes its entries, the driver gets status rows.

    Args:
        items: one dict per series (see :func:`series_items`).
        cache: the cache version to write.
        cfg: resources (pool size, CPUs per actor).
        worker: the actor class (a :class:`SeriesWorker`; tests inject one that dies).
    """
    import ray

    ensure_ray()
    # A few blocks per worker: each block is one Ray task (~tens of ms of scheduling on a small machine), and
    # series inside a block are streamed one by one, so load still balances.
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * cfg.workers)))
    statuses = dataset.map_batches(
        worker,
        fn_constructor_kwargs={"cache": cache, "cfg": cfg},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.num_cpus,
        # Ray Data restarts a dead actor and retries its tasks by default (max_restarts=-1,
        # max_task_retries=-1); setting them here is deprecated in Ray 2.60.
    )
    return statuses.take_all()


def _skipped_file_rows(statuses: pd.DataFrame) -> pd.DataFrame:
    """One failures-table row per unreadable file left out of a cached series (in the series' file order)."""
    rows = [
        {"study_id": status.study_id, "series_id": status.series_id, "split": status.split}
        | skipped
        | {"outcome": SKIPPED_FILE_OUTCOME}
        for status in statuses[statuses["skipped"].notna()].itertuples()
        for skipped in json.loads(status.skipped)
    ]
    return pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))


def _failures_table(statuses: pd.DataFrame) -> pd.DataFrame:
    """Failed series, series cached with warnings, and files left out of cached series."""
    failed = statuses[statuses["status"] == "failed"].assign(outcome="failed")
    warned = statuses[(statuses["status"] != "failed") & statuses["warnings"].fillna("").ne("")]
    warned = warned.assign(
        kind=warned["warnings"].str.split(":").str[0], error=warned["warnings"], file="", outcome="cached"
    )
    parts = [part[list(FAILURE_COLUMNS)] for part in (failed, warned, _skipped_file_rows(statuses)) if len(part)]
    table = pd.concat(parts) if parts else pd.DataFrame(columns=list(FAILURE_COLUMNS))
    # stable: a series' skipped files keep the reader's natural file order
    return table.sort_values(["outcome", "study_id", "series_id"], kind="stable").reset_index(drop=True)


def _add_to_manifest(cache: SeriesCache, manifest: pd.DataFrame, statuses: pd.DataFrame) -> None:
    """Write the manifest with the series this run cached (or recovered) added; unchanged when there are none."""
    new_rows = statuses.loc[statuses["status"].isin(["done", "recovered"]), list(MANIFEST_COLUMNS)]
    if not len(new_rows):
        return
    manifest = pd.concat([manifest, new_rows]) if len(manifest) else new_rows
    columns = ("study_id", "series_id", "n_slices", "n_stacks", "size")
    manifest = manifest.astype(dict.fromkeys(columns, "int64"))
    cache.write_manifest(manifest.sort_values(["study_id", "series_id"]).reset_index(drop=True))


def run_preprocess(
    data_root: str | Path,
    cache_root: str | Path,
    cfg: PreprocessConfig,
    splits: Sequence[str] | None = None,
    study_ids: Collection[int] | None = None,
) -> PreprocessSummary:
    """Cache every series of an RSNA-format folder that this cache version does not hold yet.

    Args:
        data_root: RSNA-format folder or its URI (validated with :func:`lumbar_ray.data.rsna.load_rsna`).
        cache_root: cache root folder or URI; the version folder below it is keyed by the settings.
        cfg: preprocessing settings and resources.
        splits: only the series of these splits (inference caches ``test`` alone); None = all.
        study_ids: only the series of these studies; None = all.

    Returns:
        The run's summary; the manifest and failures table are written beside the entries.
    """
    start = time.perf_counter()
    cache = SeriesCache(cache_root, cache_settings(cfg))
    cache.prepare()
    items = series_items(data_root, splits, study_ids)
    manifest = cache.read_manifest()
    cached = set(zip(manifest["study_id"].astype(int), manifest["series_id"].astype(int), strict=True))
    todo = [item for item in items if (item["study_id"], item["series_id"]) not in cached]
    logger.info(
        "cache %s: %d series listed, %d already cached, %d to do",
        cache.path,
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    statuses = pd.DataFrame(run_on_ray(todo, cache, cfg) if todo else [], columns=list(STATUS_COLUMNS))
    _add_to_manifest(cache, manifest, statuses)
    failures = _failures_table(statuses)
    if todo:
        cache.write_failures(failures)
    counts = statuses["status"].value_counts()
    summary = PreprocessSummary(
        cache_path=cache.path,
        key=cache.key,
        total=len(items),
        done=int(counts.get("done", 0)),
        recovered=int(counts.get("recovered", 0)),
        skipped=len(items) - len(todo),
        failed=int(counts.get("failed", 0)),
        slices=int(statuses.loc[statuses["status"] == "done", "n_slices"].sum()),
        seconds=time.perf_counter() - start,
        failures=failures,
        warnings=int((failures["outcome"] == "cached").sum()),
        files_skipped=int((failures["outcome"] == SKIPPED_FILE_OUTCOME).sum()),
    )
    logger.info("preprocessing summary:\n%s", summary.format())
    return summary
