"""Export the label points as a YOLO detection dataset, one per sagittal series type, from the cache.

The detector of a series type finds the points of the conditions read on it: on Sagittal T2/STIR the canal at
each level (5 classes), on Sagittal T1 the left and right foramina at each level (10 classes, side-major as in
:data:`TARGETS`). Each labelled slice becomes one grayscale image (the cached uint8 slice, so detection and
classification see the same pixels) with a square box of ``box_fraction`` of the image side around every point
on it. Train/val follow the CV folds: the studies of ``val_fold`` are the validation set, so a detector used for
that fold's crops never saw its studies.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from lumbar_ray.constants import TARGETS
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.localize.levels import detector_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class YoloExport:
    """What :func:`export_yolo_dataset` wrote."""

    dataset_yaml: Path
    train_images: int
    val_images: int
    boxes: int
    class_names: list[str]


def _box_size(entry: CachedSeries, index: int, box_fraction: float, box_mm: float | None) -> tuple[float, float]:
    """Normalised (width, height) of a training box on slice ``index``: ``box_fraction`` of the image side, or
    ``box_mm`` through the slice's millimetres per cache pixel (capped at the whole image)."""
    if box_mm is None:
        return box_fraction, box_fraction
    size = entry.volume.shape[1:]
    mm_x, mm_y = entry.mm_per_pixel(index)
    return min(box_mm / (mm_x * size[1]), 1.0), min(box_mm / (mm_y * size[0]), 1.0)


def export_yolo_dataset(
    points: pd.DataFrame,
    cache: SeriesCache,
    description: str,
    folds: pd.DataFrame,
    val_fold: int,
    out: str | Path,
    box_fraction: float = 0.08,
    box_mm: float | None = None,
) -> YoloExport:
    """Write ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` and ``dataset.yaml`` under ``out``.

    Args:
        points: POINTS frame (study_id, target, series_id, slice, x, y in cache pixels).
        cache: the cache the points refer to.
        description: ``Sagittal T2/STIR`` or ``Sagittal T1``.
        folds: study_id -> fold.
        val_fold: the fold whose studies form the validation set.
        out: output folder (created).
        box_fraction: box side as a fraction of the image side.
        box_mm: box side in millimetres instead (each slice's own pixel spacing and resize): the box covers the same
            anatomy whatever the field of view.
    """
    targets = detector_targets(description)
    class_of = {target: index for index, target in enumerate(targets)}
    names = [TARGETS[target] for target in targets]
    fold_of = dict(zip(folds["study_id"].astype(int), folds["fold"].astype(int), strict=True))
    out = Path(out)
    selected = points[points["target"].isin(targets)]
    counts = {"train": 0, "val": 0}
    boxes = 0
    for (study_id, series_id, slice_index), group in selected.groupby(["study_id", "series_id", "slice"]):
        split = "val" if fold_of.get(int(study_id)) == val_fold else "train"
        entry = cache.read(int(study_id), int(series_id), mmap=True)
        image = np.asarray(entry.volume[int(slice_index)])
        height, width = image.shape
        box_w, box_h = _box_size(entry, int(slice_index), box_fraction, box_mm)
        stem = f"{study_id}_{series_id}_{slice_index}"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "images" / split / f"{stem}.png"), image)
        lines = [
            f"{class_of[int(t)]} {x / width:.6f} {y / height:.6f} {box_w:.6f} {box_h:.6f}"
            for t, x, y in zip(group["target"], group["x"] + 0.5, group["y"] + 0.5, strict=True)
        ]  # pixel centres: cache pixel i covers [i, i + 1)
        (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        counts[split] += 1
        boxes += len(lines)
    dataset = {"path": str(out.resolve()), "train": "images/train", "val": "images/val",
               "names": dict(enumerate(names))}  # fmt: skip
    dataset_yaml = out / "dataset.yaml"
    dataset_yaml.write_text(yaml.safe_dump(dataset, sort_keys=False))
    logger.info("YOLO dataset %s (%s): %d train / %d val images, %d boxes", out, description, counts["train"],
                counts["val"], boxes)  # fmt: skip
    return YoloExport(dataset_yaml, counts["train"], counts["val"], boxes, names)


def pack_dataset(dataset_yaml: Path) -> bytes:
    """An export (the folder of ``dataset.yaml``) as the bytes of one uncompressed tar (its PNGs are compressed
    already): how a detector's training data reaches a task on another node, through Ray's object store."""
    folder = Path(dataset_yaml).parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix != ".cache":  # ultralytics' label caches are rebuilt where it trains
                archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def unpack_dataset(packed: bytes, into: Path) -> Path:
    """Extract a :func:`pack_dataset` archive into ``into`` and point its ``dataset.yaml`` there; returns the yaml.

    Raises:
        tarfile.TarError: for an archive member that would land outside ``into`` (the ``data`` filter's check).
    """
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r") as archive:
        archive.extractall(into, filter="data")
    dataset_yaml = into / "dataset.yaml"
    dataset = yaml.safe_load(dataset_yaml.read_text())
    dataset["path"] = str(into.resolve())
    dataset_yaml.write_text(yaml.safe_dump(dataset, sort_keys=False))
    return dataset_yaml
