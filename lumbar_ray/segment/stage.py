"""The segmentation stage (``lumbar-ray segment``): a 2.5D MONAI U-Net on the sagittal series, trained on Ray Train
through the classifier's own trainer builder, measured on the localisation's held-out fold, tracked in MLflow.

``run_segment(cfg)``:

1. reads the cache (complete it first: :func:`lumbar_ray.pipeline.segment` does) and fixes the CV's seeded folds;
   the studies of ``localize.val_fold`` validate, the others train, so the U-Net and the YOLO detectors are judged
   on the same held-out studies (``source=spider``: SPIDER's scans, read from ``segment.spider_dir`` onto a
   cache-like grid, their patients dealt into seeded folds the same way);
2. builds each sagittal series' targets on the cache grid (:mod:`lumbar_ray.segment.data`: the anatomy masks of
   ``segment.source=masks`` or ``spider``, or level maps around the label points of ``points``) and their 2.5D
   samples, and hands them to the workers through Ray's object store;
3. trains with :func:`lumbar_ray.train.cv.build_trainer` and :func:`lumbar_ray.segment.worker.train_segment_loop`
   (DDP on ``train.num_workers``, checkpoints kept by the validation score, restarts from the latest checkpoint;
   the Ray Train run is named by :func:`lumbar_ray.paths.segment_key`, so an interrupted stage resumes);
4. measures the best epoch's U-Net on the held-out series on the cache grid (:func:`~lumbar_ray.segment.unet.
   predict_volume`, MONAI's Dice per structure, each series one volume) and writes ``unet.pt``
   (:func:`lumbar_ray.paths.unet_weights_for`), which describes itself (settings, classes, source, what it was
   trained and measured on).

MLflow: a parent run ``segment`` tagged with the key, a child run per U-Net (tag :data:`UNET_TAG` = the source)
with its settings and sample counts as params, per-epoch ``val_score``/``dice/<class>`` (at the U-Net's input size),
the held-out Dice on the cache grid (``heldout_dice/<class>``) and ``unet.pt`` as an artifact. A rerun whose
``unet.pt`` exists with the same settings does nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from lumbar_ray.config import Config, ConfigError, cache_settings
from lumbar_ray.data.cache import SeriesCache, filesystem, is_uri
from lumbar_ray.data.crops import points_from_coordinates
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.splits import make_folds
from lumbar_ray.labels import encode_labels
from lumbar_ray.paths import cache_root_for, data_root_for, ray_storage_for, segment_key, unet_weights_for
from lumbar_ray.provenance import package_version
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.segment.data import (
    SeriesTarget,
    build_samples,
    classes_for,
    sagittal_series,
    series_targets,
    spider_files,
    spider_held_out,
    spider_targets,
)
from lumbar_ray.segment.labels import MASKS_DIR
from lumbar_ray.segment.unet import (
    build_unet,
    dice_by_name,
    predict_volume,
    read_unet_meta,
    save_unet,
    series_dice,
    unet_meta,
)
from lumbar_ray.segment.worker import SegmentJob, train_segment_loop
from lumbar_ray.tracking import RunLogger, Tracker, flatten_params, log_params
from lumbar_ray.train.cv import build_trainer
from lumbar_ray.train.worker import load_checkpoint_state

logger = logging.getLogger(__name__)

UNET_TAG = "lumbar_ray.segment_model"
"""Child-run tag of a U-Net run under the ``segment`` parent: its source (``masks``, ``points``, ``spider``)."""


@dataclass
class SegmentResult:
    """What :func:`run_segment` produced (or found)."""

    weights: Path
    key: str
    source: str
    classes: tuple[str, ...]
    dice: dict[str, float]
    """Held-out Dice per structure on the cache grid (best epoch's weights), over the series that hold it."""
    trained: dict[str, Any]
    trained_now: bool
    mlflow_run_id: str | None = None
    unet_run_id: str | None = None
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else math.nan

    def format(self) -> str:
        t = self.trained
        done = f"trained now in {self.seconds:.0f} s" if self.trained_now else "already trained: reused"
        lines = [
            f"segmentation U-Net {self.key} ({self.source}, {len(self.classes)} classes), {done}: {self.weights}",
            f"  held-out fold {t.get('val_fold')}: {len(t.get('val_studies', []))} studies, {t.get('val_series')} "
            f"series; best epoch {t.get('best_epoch', -1) + 1} of {t.get('epochs')} (epochs each start began at, "
            f"from 0: {t.get('starts')})",
            "  Dice per structure (cache grid): " + ", ".join(f"{k} {v:.3f}" for k, v in self.dice.items())
            + f"; mean {self.mean_dice:.3f}",
        ]  # fmt: skip
        if self.unet_run_id:
            lines.append(f"  MLflow U-Net run: {self.unet_run_id} (parent {self.mlflow_run_id})")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class SegmentInputs:
    """What the stage reads: the cache, the folds, the series table, the label points (``source=points``)."""

    cache: SeriesCache
    folds: pd.DataFrame
    series: pd.DataFrame
    data_root: Path | str
    points: pd.DataFrame | None = None

    def studies(self, val_fold: int) -> tuple[list[int], list[int]]:
        """``(training, validation)`` study ids, sorted: validation = fold ``val_fold``."""
        held_out = self.folds["fold"].to_numpy() == val_fold
        ids = self.folds["study_id"].astype(int).to_numpy()
        return sorted(ids[~held_out].tolist()), sorted(ids[held_out].tolist())


def check_source(cfg: Config) -> None:
    """Refuse, before any data is written or cached, a source the config cannot train from.

    Raises:
        ConfigError: ``source=spider`` without ``segment.spider_dir``; ``source=masks`` on data that is not a local
            folder, or on the built-in synthetic data written without masks (``synth.masks=false``); a
            ``localize.val_fold`` that is not a fold.
        FileNotFoundError: ``segment.spider_dir`` is not a SPIDER folder.
    """
    source = cfg.segment.source
    if source == "spider" and cfg.segment.spider_dir is None:
        raise ConfigError("segment.source=spider needs segment.spider_dir: the SPIDER folder (images/, masks/)")
    if source == "spider":
        spider_files(cfg.segment.spider_dir)  # a clear error now, not after the cache is completed
    if source == "masks" and cfg.data.root is not None and is_uri(cfg.data.root):
        raise ConfigError(f"segment.source=masks reads the masks from a local folder, not {cfg.data.root}")
    masks_written = cfg.synth.masks or (data_root_for(cfg) / MASKS_DIR).is_dir()
    if source == "masks" and cfg.data.root is None and not masks_written:
        raise ConfigError("segment.source=masks on the built-in synthetic data needs its masks: set "
                          "synth.masks=true (or segment.source=points)")  # fmt: skip
    if cfg.localize.val_fold >= cfg.cv.n_folds:
        raise ConfigError(f"localize.val_fold {cfg.localize.val_fold} is not a fold of cv.n_folds={cfg.cv.n_folds}")


def segment_inputs(cfg: Config) -> SegmentInputs:
    """The cache, the CV's seeded folds (the localisation's) and the series; clear errors when something is missing.

    Raises:
        FileNotFoundError: no ``train.csv``, no coordinates for ``source=points``, or an empty cache.
        ConfigError: see :func:`check_source`.
    """
    check_source(cfg)
    source, root = cfg.segment.source, data_root_for(cfg)
    data = load_rsna(root)
    if data.train is None or data.train_series is None:
        raise FileNotFoundError(f"{root} has no train.csv or train_series_descriptions.csv")
    if source == "points" and data.coordinates is None:
        raise FileNotFoundError(f"{root} has no train_label_coordinates.csv: segment.source=points draws its maps "
                                "from it")  # fmt: skip
    cache = SeriesCache(cache_root_for(cfg), cache_settings(cfg.preprocess))
    if cache.read_manifest().empty:
        raise FileNotFoundError(f"cache {cache.path} is empty: complete it (`lumbar-ray preprocess`) first")
    study_ids, labels = encode_labels(data.train)
    folds = make_folds(study_ids, labels, cfg.cv.n_folds, cfg.cv.seed)
    points = None
    if source == "points":
        points = points_from_coordinates(data.coordinates, cache, data.train_series).points
    return SegmentInputs(cache, folds, data.train_series, root, points)


def load_targets(cfg: Config, inputs: SegmentInputs, study_ids: list[int]) -> list[SeriesTarget]:
    """The series targets of the cached sagittal series of ``study_ids``.

    Raises:
        FileNotFoundError: ``source=masks`` and a series has no mask file (the hint says how to write them).
    """
    series = sagittal_series(inputs.series, study_ids, inputs.cache.cached_keys())
    try:
        return series_targets(inputs.cache, series, cfg.segment, inputs.data_root, inputs.points)
    except FileNotFoundError as error:
        hint = "use segment.source=points (maps from the label coordinates)"
        if cfg.data.root is None:
            hint = "write the synthetic dataset with synth.masks=true (a new workdir, or remove its data folder)"
        raise FileNotFoundError(f"segment.source=masks: {error}; {hint}") from None


@dataclass
class TrainingData:
    """The series targets of both parts and who is held out."""

    train: list[SeriesTarget]
    val: list[SeriesTarget]
    train_studies: list[int | str]
    val_studies: list[int | str]
    data_root: str
    cache_key: str | None = None


def training_data(cfg: Config) -> TrainingData:
    """The training and held-out series targets of ``cfg.segment.source``.

    The RSNA-format data (masks, points) is split by the CV's folds, fold ``localize.val_fold`` held out (the
    detectors' held-out studies); SPIDER's patients are dealt into ``cv.n_folds`` seeded folds the same way
    (:func:`~lumbar_ray.segment.data.spider_held_out`), every scan of a patient on one side.

    Raises:
        FileNotFoundError: when the data, the cache, the masks or the coordinates the source needs are missing, or
            a part has no series.
    """
    if cfg.segment.source == "spider":
        data = _spider_data(cfg)
    else:
        inputs = segment_inputs(cfg)
        train_ids, val_ids = inputs.studies(cfg.localize.val_fold)
        data = TrainingData(load_targets(cfg, inputs, train_ids), load_targets(cfg, inputs, val_ids), train_ids,
                            val_ids, str(inputs.data_root), inputs.cache.key)  # fmt: skip
    if not data.train or not data.val:
        raise FileNotFoundError(f"segmentation needs series with targets in both parts: {len(data.train)} training "
                                f"and {len(data.val)} held-out series found")  # fmt: skip
    return data


def _spider_data(cfg: Config) -> TrainingData:
    check_source(cfg)
    files = spider_files(cfg.segment.spider_dir)
    held_out = spider_held_out([f.patient for f in files], cfg.cv.n_folds, cfg.cv.seed, cfg.localize.val_fold)
    parts = {True: [f for f in files if f.patient in held_out], False: [f for f in files if f.patient not in held_out]}
    size, window = cfg.preprocess.image_size, cfg.preprocess.clip_percentiles
    numbered = {f.name: number for number, f in enumerate(files)}
    train, val = (spider_targets(parts[side], size, window, [numbered[f.name] for f in parts[side]])
                  for side in (False, True))  # fmt: skip
    patients = ({f.patient for f in parts[side]} for side in (False, True))
    return TrainingData(train, val, *(sorted(p) for p in patients), str(cfg.segment.spider_dir))


def held_out_dice(model: Any, targets: list[SeriesTarget], cfg: Config, n_classes: int) -> np.ndarray:
    """Dice per foreground class of ``model`` on the held-out series, on the cache grid (each series a volume)."""
    predicted = [predict_volume(model, item.volume, cfg.segment).argmax(axis=1).astype(np.uint8) for item in targets]
    return series_dice(predicted, [item.target for item in targets], n_classes)


def best_state(result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(best, latest)`` checkpoint states of a finished fit: the best by validation score (later on a tie) of
    the latest checkpoint and the one Ray kept as the best.

    Raises:
        RuntimeError: if the fit left no checkpoint.
    """
    latest = load_checkpoint_state(result.checkpoint)
    if latest is None:
        raise RuntimeError("the segmentation training finished without a checkpoint")
    candidates = [latest]
    if result.best_checkpoints and result.best_checkpoints[-1][0].path != result.checkpoint.path:
        candidates.append(load_checkpoint_state(result.best_checkpoints[-1][0]))

    def rank(state: dict[str, Any]) -> tuple[float, int]:
        score = float(state["last"]["score"])
        return (math.inf if math.isnan(score) else score, -int(state["epoch"]))

    return min(candidates, key=rank), latest


def _matches(meta: dict[str, Any], cfg: Config) -> bool:
    """Whether a written ``unet.pt`` is this config's U-Net (same settings, classes and source)."""
    expected = unet_meta(cfg.segment)
    return all(meta.get(key) == expected[key] for key in ("format", "config", "classes", "source"))


def _reuse(cfg: Config, weights: Path, meta: dict[str, Any]) -> SegmentResult:
    trained = meta.get("trained", {})
    logger.info("segmentation U-Net %s already trained: reusing %s", segment_key(cfg), weights)
    return SegmentResult(weights, segment_key(cfg), meta["source"], tuple(meta["classes"]),
                         dict(trained.get("heldout_dice", {})), trained, False, trained.get("mlflow_parent"),
                         trained.get("mlflow_run_id"))  # fmt: skip


def _train_params(cfg: Config, counts: dict[str, int]) -> dict[str, str]:
    return flatten_params({"segment": cfg.segment.model_dump(mode="json")}) | {
        "train.num_workers": str(cfg.train.num_workers),
        **{key: str(value) for key, value in counts.items()},
    }


def forget_ray_run(cfg: Config, key: str) -> None:
    """Delete the Ray Train run ``key`` from the storage: Ray resumes a run of the same name, and one that finished
    for another version's ``unet.pt`` would hand back its weights without training."""
    fs, root = filesystem(ray_storage_for(cfg))
    folder = f"{root.rstrip('/')}/{key}"
    if fs.get_file_info(folder).type == pafs.FileType.Directory:
        logger.info("removing the earlier Ray Train run %s", folder)
        fs.delete_dir(folder)


def run_segment(cfg: Config) -> SegmentResult:
    """Train (or reuse) the U-Net of ``cfg`` and measure it on the held-out fold (see the module docstring).

    Raises:
        FileNotFoundError: if the cache is empty, or the masks or coordinates the source needs are missing.
        ConfigError: on a source this version cannot train from, or a validation fold that does not exist.
        RuntimeError: if the Ray Train run failed.
    """
    weights, key = unet_weights_for(cfg), segment_key(cfg)
    if weights.is_file():
        meta = read_unet_meta(weights)
        if _matches(meta, cfg):
            return _reuse(cfg, weights, meta)
        logger.warning("%s was written by other settings or another version: trained again", weights)
        forget_ray_run(cfg, key)
    started = time.perf_counter()
    seg, classes = cfg.segment, classes_for(cfg.segment.source)
    data = training_data(cfg)
    train_samples, val_samples = build_samples(data.train, seg), build_samples(data.val, seg, every_slice=True)
    counts = {"train_studies": len(data.train_studies), "val_studies": len(data.val_studies),
              "train_series": len(data.train), "val_series": len(data.val), "train_samples": len(train_samples),
              "val_samples": len(val_samples)}  # fmt: skip
    logger.info("segmentation %s: %s", key, counts)
    ensure_ray()
    import ray

    tracker = Tracker.from_config(cfg)
    parent = tracker.parent_run(key, kind="segment", config=cfg)
    child = tracker.child_run(parent, UNET_TAG, seg.source, "unet", f"unet_{seg.source}")
    try:
        log_params(tracker.client, child, _train_params(cfg, counts))
        job = SegmentJob(ray.put(train_samples), ray.put(val_samples), classes, RunLogger(tracker.uri, child))
        result = build_trainer(cfg, job, key, loop=train_segment_loop).fit()
        if result.error is not None:
            raise RuntimeError(f"segmentation training {key} failed") from result.error
        best, latest = best_state(result)
        model = build_unet(seg, len(classes))
        model.load_state_dict(best["model"])
        dice = dice_by_name(held_out_dice(model, data.val, cfg, len(classes)), classes)
        trained = counts | {
            "key": key, "data_root": data.data_root, "cache": data.cache_key,
            "val_fold": cfg.localize.val_fold, "val_studies": data.val_studies, "best_epoch": int(best["epoch"]),
            "epochs": seg.epochs, "starts": list(latest["starts"]), "heldout_dice": dice,
            "val_dice": dice_by_name(np.asarray(best["last"]["dice"]), classes), "world_size": cfg.train.num_workers,
            "history": [{k: float(v) for k, v in entry.items()} for entry in latest["history"]],
            "mlflow_parent": parent, "mlflow_run_id": child, "lumbar_ray_version": package_version(),
        }  # fmt: skip
        save_unet(weights, model, unet_meta(seg, trained))
        values = {f"heldout_dice/{name}": value for name, value in dice.items()}
        values |= {"heldout_mean_dice": float(np.mean(list(dice.values()))), "best_epoch": float(best["epoch"])}
        tracker.log_values(child, values)
        tracker.log_values(parent, values)
        tracker.client.log_artifact(child, str(weights))
    except BaseException:
        tracker.finish(child, "FAILED")
        tracker.finish(parent, "FAILED")
        raise
    tracker.finish(child)
    tracker.finish(parent)
    out = SegmentResult(weights, key, seg.source, classes, dice, trained, True, parent, child,
                        time.perf_counter() - started)  # fmt: skip
    logger.info("%s", out.format())
    return out
