"""The level detectors: one ultralytics YOLO model per sagittal series type, trained on Ray, tracked in MLflow.

:func:`train_detector` trains one detector in-process from a :func:`~lumbar_ray.localize.yolo_data.export_yolo_dataset`
export. The model is built from a yaml (no weights download) at a reduced width so that it trains in about a
minute on two CPUs. Ultralytics' own MLflow callback logs its per-epoch losses and mAPs into a run we name (the
child run of the series type), and nothing else of ultralytics' integrations runs: no analytics, no font or AMP
check downloads, no ``runs/`` folder in the working directory, no change to the user's ultralytics settings.

:func:`fit_detectors` trains both sagittal detectors as Ray tasks (resumable: a finished ``detector.pt`` is
kept), and :class:`SagittalDetector` runs one on every slice of a cached volume and turns its boxes into one
point per target through :func:`~lumbar_ray.localize.levels.resolve_levels`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import pandas as pd
import yaml

from lumbar_ray.config import LocalizeConfig
from lumbar_ray.constants import LEVELS, series_slug
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.localize.levels import resolve_levels
from lumbar_ray.localize.yolo_data import detector_targets, export_yolo_dataset

logger = logging.getLogger(__name__)

DETECTOR_DESCRIPTIONS: tuple[str, ...] = ("Sagittal T2/STIR", "Sagittal T1")
"""The series types a detector is trained for, in training order."""

WEIGHTS_NAME = "detector.pt"
DETECTOR_TAG = "lumbar_ray.detector"
"""Child-run tag naming the series type (its slug) a detector run belongs to."""

BACKGROUND_OFFSET: dict[str, int] = {"Sagittal T2/STIR": 4, "Sagittal T1": 2}
"""Slices between a labelled slice and its background slice (:func:`add_background`): the canal shows on about
five mid-line slices of a Sagittal T2, a foramen on one or two slices of a Sagittal T1."""

DETECTION_COLUMNS = ("target", "slice", "x", "y", "confidence")
LOCATE_COLUMNS = ("target", "slice", "x", "y", "confidence", "filled")

# Augmentations that respect the anatomy: no flips (the levels run head to feet, the canal lies behind the
# discs), no mosaic (a level is told from its neighbours by where it sits in the whole spine).
_AUGMENT = {"fliplr": 0.0, "flipud": 0.0, "mosaic": 0.0, "degrees": 5.0, "translate": 0.1, "scale": 0.2}
# Ultralytics environment variables the MLflow routing sets for the duration of one training.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
               "MLFLOW_KEEP_RUN_ACTIVE")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- training


def _model_source(cfg: LocalizeConfig, folder: Path) -> str:
    """The ``model`` argument of the trainer: ``cfg.model``, or a copy of its yaml at width ``cfg.width``.

    The copy keeps the file name, so ultralytics picks the same scale (``n`` of ``yolov8n``) and only that
    scale's width multiple changes.
    """
    if cfg.width is None or not cfg.model.endswith((".yaml", ".yml")):
        return cfg.model
    from ultralytics.nn.tasks import yaml_model_load

    spec = yaml_model_load(cfg.model)
    scales = spec.get("scales") or {}
    scale = spec.pop("scale", "") or next(iter(scales), "")
    spec.pop("yaml_file", None)
    if scale in scales:
        depth, _, max_channels = scales[scale]
        spec["scales"] = {scale: [depth, cfg.width, max_channels]}
    else:  # a yaml without scales carries its multiples itself
        spec["width_multiple"] = cfg.width
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(cfg.model).name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _train_args(dataset_yaml: Path, cfg: LocalizeConfig, out_dir: Path, model: str) -> dict[str, Any]:
    """Ultralytics training arguments: everything under ``out_dir``, nothing that plots or downloads."""
    import torch

    return {
        "model": model,
        "data": str(Path(dataset_yaml).resolve()),
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "lr0": cfg.lr0,
        "optimizer": "AdamW",  # "auto" would ignore lr0
        "warmup_bias_lr": 0.0,  # ultralytics' SGD-sized bias warm-up start is far too high for AdamW
        "nbs": cfg.batch,  # no gradient accumulation: a few hundred images give few steps already
        "workers": cfg.workers,
        "seed": cfg.seed,
        "device": 0 if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu",
        "project": str(out_dir.resolve()),
        "name": "train",
        "exist_ok": True,  # a retried task trains again in the same folder
        "pretrained": False,
        "plots": False,  # plots need a font download
        "amp": False,  # the AMP check downloads a model
        "cache": True,  # a few hundred small images: decode once
        "val": False,  # validate the final epoch only (logged to MLflow): per-epoch validation costs a third more
        "verbose": False,
        **_AUGMENT,
    }


def _detector_trainer_class() -> type:
    """DetectionTrainer whose dataset check skips ultralytics' font download (there may be no network)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class _Trainer(DetectionTrainer):
        def get_dataset(self) -> dict:
            with mock.patch("ultralytics.data.utils.check_font"):
                return super().get_dataset()

    return _Trainer


def _only_mlflow_callbacks(route: bool):
    """A replacement of ultralytics' ``add_integration_callbacks``: MLflow on trainers when routed, else nothing.

    Ultralytics adds every integration enabled in the user's settings (and analytics); we want exactly one, and
    decide it here rather than by changing the settings file, which other programs share.
    """
    from ultralytics.utils.callbacks import mlflow as mlflow_callbacks

    def add(instance: Any) -> None:
        if route and "Trainer" in type(instance).__name__:
            for event, callback in mlflow_callbacks.callbacks.items():
                instance.add_callback(event, callback)

    return add


@contextlib.contextmanager
def _restored_environment(names: tuple[str, ...]) -> Iterator[None]:
    """Put the listed environment variables back as they were (Ray reuses worker processes)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _mlflow_run_active(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Make run ``run_id`` at ``tracking_uri`` MLflow's active run in this process, for ultralytics' callback.

    The callback logs into the active run and, finding one, neither creates a run nor ends it. It also calls
    ``mlflow.set_experiment`` with ``MLFLOW_EXPERIMENT_NAME``: set to the run's own experiment, so that no other
    experiment appears. On exit the run is left RUNNING and every piece of MLflow's global state we touched
    (tracking URI, active experiment, environment) is restored.
    """
    import mlflow
    from mlflow.tracking import _tracking_service, fluent

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    saved_uri = _tracking_service.utils._tracking_uri  # None when MLflow reads the environment
    saved_experiment = fluent._active_experiment_id
    with _restored_environment(_MLFLOW_ENV):
        os.environ.update({"MLFLOW_EXPERIMENT_NAME": experiment.name, "MLFLOW_KEEP_RUN_ACTIVE": "True"})
        os.environ.pop("MLFLOW_RUN_ID", None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            mlflow.start_run(run_id=run_id)
            try:
                # The callback turns on mlflow.autolog() for every library in the process; ours logs explicitly.
                with mock.patch.object(mlflow, "autolog"):
                    yield
            finally:
                mlflow.end_run()  # pops the run off MLflow's stack; it marks it FINISHED, so:
                client.update_run(run_id, status="RUNNING")
        finally:
            mlflow.set_tracking_uri(saved_uri)
            fluent._active_experiment_id = saved_experiment


@contextlib.contextmanager
def _torch_determinism_restored() -> Iterator[None]:
    """Ultralytics switches torch's deterministic-algorithms mode process-wide: put it back afterwards."""
    import torch

    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _publish(trainer: Any, weights: Path) -> None:
    """Copy the trained weights (best epoch, else last) to ``weights`` atomically."""
    source = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    partial = weights.with_name(weights.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, weights)


def train_detector(
    dataset_yaml: Path,
    description: str,
    cfg: LocalizeConfig,
    out_dir: Path,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> Path:
    """Train one detector in-process and return ``out_dir/detector.pt``; an existing one is returned at once.

    Args:
        dataset_yaml: the export's ``dataset.yaml``.
        description: the series type (for logs).
        cfg: model, size and schedule of the detector.
        out_dir: everything goes here (``train/`` holds ultralytics' own output).
        tracking_uri: MLflow store of ``run_id``.
        run_id: the MLflow run that ultralytics' metrics, params and weights go to (left RUNNING); None = no MLflow.

    Returns:
        The path of the final weights.
    """
    out_dir = Path(out_dir)
    weights = out_dir / WEIGHTS_NAME
    if weights.is_file():
        logger.info("detector for %s already trained: %s", description, weights)
        return weights
    out_dir.mkdir(parents=True, exist_ok=True)
    from ultralytics.utils import callbacks

    route = run_id is not None and tracking_uri is not None
    args = _train_args(dataset_yaml, cfg, out_dir, _model_source(cfg, out_dir / "model"))
    logger.info("training the %s detector (%s, width %s, %d epochs at %d px) in %s", description, cfg.model,
                cfg.width, cfg.epochs, cfg.imgsz, out_dir)  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch_determinism_restored())
        stack.enter_context(mock.patch.object(callbacks, "add_integration_callbacks", _only_mlflow_callbacks(route)))
        if route:
            stack.enter_context(_mlflow_run_active(tracking_uri, run_id))
        trainer = _detector_trainer_class()(overrides=args)
        trainer.train()
    _publish(trainer, weights)
    logger.info("detector for %s written to %s", description, weights)
    return weights


def merge_sides(dataset_yaml: Path) -> Path:
    """Turn a Sagittal T1 export (left and right foramen per level, 10 classes) into 5 side-free level classes.

    A left and a right foramen look alike on their own slices, so a detector trained to tell them apart
    learns to report both; :meth:`SagittalDetector.locate` takes the side from the slice instead. Rewrites the
    export in place (idempotent) and returns ``dataset_yaml``.
    """
    dataset_yaml = Path(dataset_yaml)
    dataset = yaml.safe_load(dataset_yaml.read_text())
    n_levels = len(LEVELS)
    root = Path(dataset["path"])
    for label_file in (root / "labels").rglob("*.txt"):
        lines = [line.split() for line in label_file.read_text().splitlines() if line.strip()]
        label_file.write_text("".join(f"{int(c) % n_levels} {' '.join(rest)}\n" for c, *rest in lines))
    for cache_file in (root / "labels").glob("*.cache"):  # ultralytics' label cache would keep the old classes
        cache_file.unlink()
    names = [dataset["names"][i] for i in range(len(dataset["names"]))]
    dataset["names"] = (
        {i: f"foramen_{LEVELS[i]}" for i in range(n_levels)} if len(names) > n_levels else dataset["names"]
    )
    dataset_yaml.write_text(yaml.safe_dump(dataset, sort_keys=False))
    return dataset_yaml


def add_background(
    points: pd.DataFrame, cache: SeriesCache, description: str, dataset_yaml: Path, offset: int = 2
) -> int:
    """Add label-free slices next to the labelled ones to an export: what the detector must not fire on.

    The export holds labelled slices only, so a detector never sees a slice without its structure and fires
    on every slice that shows a spine: on Sagittal T1 the slices between a foramen and the mid-line look like
    the foramen's slice without the foramen. The slice ``offset`` away from each labelled slice towards the
    volume centre (both ways from a central one) is added unless it is within one slice of a labelled one, as
    an image with an empty label file, in the split of its study.

    Returns:
        The number of images added.
    """
    dataset_yaml = Path(dataset_yaml)
    root = Path(yaml.safe_load(dataset_yaml.read_text())["path"])
    split_of = {int(f.stem.split("_")[0]): f.parent.name for f in (root / "images").glob("*/*.png")}
    selected = points[points["target"].isin(detector_targets(description))]
    added = 0
    for (study_id, series_id), group in selected.groupby(["study_id", "series_id"]):
        volume = cache.read(int(study_id), int(series_id), mmap=True).volume
        labelled = set(group["slice"].astype(int))
        centre = (len(volume) - 1) / 2
        candidates = set()
        for slice_index in labelled:  # towards the centre; from a (near-)central slice both ways
            steps = (
                (offset,) if slice_index < centre - 1 else (-offset,) if slice_index > centre + 1 else (-offset, offset)
            )
            candidates |= {slice_index + step for step in steps}
        for candidate in sorted(candidates):
            if not 0 <= candidate < len(volume) or any(abs(candidate - s) <= 1 for s in labelled):
                continue
            split = split_of.get(int(study_id), "train")
            stem = f"{study_id}_{series_id}_{candidate}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), np.asarray(volume[candidate]))
            (root / "labels" / split / f"{stem}.txt").write_text("")
            added += 1
    logger.info("YOLO dataset %s: %d background slices added", root, added)
    return added


# ---------------------------------------------------------------------------------------------------------- Ray


def fit_detectors(
    points: pd.DataFrame,
    cache: SeriesCache,
    folds: pd.DataFrame,
    cfg: LocalizeConfig,
    out_dir: Path,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Path]:
    """Train the Sagittal T2/STIR and Sagittal T1 detectors as Ray tasks; finished ones are not retrained.

    Args:
        points: POINTS frame of the label points (cache pixels).
        cache: the cache the points refer to.
        folds: study_id -> fold; ``cfg.val_fold`` validates.
        cfg: the detectors' settings, including the resources of each Ray task.
        out_dir: shared folder; each series type trains under ``out_dir/<slug>``.
        tracking_uri: MLflow store of ``parent_run_id``.
        parent_run_id: run under which each detector gets a child run; None = no MLflow.

    Returns:
        ``{description: weights path}`` for both series types.

    Raises:
        ray.exceptions.RayTaskError: if a training task failed (its child run is marked FAILED).
    """
    import ray
    from mlflow import MlflowClient

    from lumbar_ray.tracking import child_run

    out_dir = Path(out_dir).resolve()
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri and parent_run_id else None
    remote = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(train_detector)
    result: dict[str, Path] = {}
    pending: dict[str, tuple[Any, str | None]] = {}
    for description in DETECTOR_DESCRIPTIONS:
        folder = out_dir / series_slug(description)
        if (folder / WEIGHTS_NAME).is_file():
            logger.info("detector for %s already trained: %s", description, folder / WEIGHTS_NAME)
            result[description] = folder / WEIGHTS_NAME
            continue
        export = export_yolo_dataset(points, cache, description, folds, cfg.val_fold, folder / "dataset",
                                     cfg.box_fraction)  # fmt: skip
        add_background(points, cache, description, export.dataset_yaml, BACKGROUND_OFFSET[description])
        if len(_side_groups(description)) > 1:
            merge_sides(export.dataset_yaml)
        run_id = child_run(client, parent_run_id, DETECTOR_TAG, series_slug(description), "detector",
                           f"detector_{series_slug(description)}") if client else None  # fmt: skip
        ref = remote.remote(export.dataset_yaml, description, cfg, folder, tracking_uri, run_id)
        pending[description] = (ref, run_id)
    for description, (ref, run_id) in pending.items():
        try:
            result[description] = Path(ray.get(ref))
        except Exception:
            if client and run_id:
                client.set_terminated(run_id, "FAILED")
            raise
        if client and run_id:
            client.set_terminated(run_id, "FINISHED")
    return {description: result[description] for description in DETECTOR_DESCRIPTIONS}


# ------------------------------------------------------------------------------------------------------ inference


def _side_groups(description: str) -> list[list[int]]:
    """The detector's targets split into runs of five levels (one per side on T1, one on T2)."""
    targets = detector_targets(description)
    return [targets[start : start + len(LEVELS)] for start in range(0, len(targets), len(LEVELS))]


def left_first(meta: dict) -> bool:
    """Whether slice 0 of a cached sagittal series lies on the patient's left (True when unknown).

    The cache orders slices along the normal ``row x column`` of the stack; patient left is +x in DICOM's LPS
    frame, so a normal pointing to -x (the usual sagittal orientation) starts on the left.
    """
    stacks = meta.get("stacks") or []
    normal = stacks[0].get("normal") if stacks else None
    return True if normal is None else bool(normal[0] <= 0)


class SagittalDetector:
    """A trained detector of one sagittal series type, applied to cached volumes.

    Args:
        weights: ``detector.pt`` from :func:`train_detector`.
        description: the series type it was trained on (fixes its classes).
        cfg: ``conf`` is the minimum confidence of a detection.
        device: torch device; None = CUDA when available, else CPU.
    """

    def __init__(self, weights: str | Path, description: str, cfg: LocalizeConfig, device: str | None = None) -> None:
        import torch
        from ultralytics.nn.tasks import load_checkpoint

        self.description = description
        self.cfg = cfg
        self.targets = detector_targets(description)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _ = load_checkpoint(str(weights), device=self.device)
        self.model = model.eval()
        self.groups = _side_groups(description)
        if len(self.model.names) not in {len(LEVELS), len(self.targets)}:
            raise ValueError(f"{weights} has {len(self.model.names)} classes, {description} needs {len(self.targets)}"
                             f" (or {len(LEVELS)}: one per level, sides from the slices)")  # fmt: skip
        self.imgsz = int(self.model.args.get("imgsz", cfg.imgsz))
        self.stride = int(max(self.model.stride.max(), 32))

    def _batch(self, volume: np.ndarray) -> Any:
        """Letterbox every slice to the training size, as ultralytics' validator does; (n, 3, s, s) in 0..1."""
        import torch
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, stride=self.stride)
        images = [letterbox(image=np.repeat(np.asarray(s)[:, :, None], 3, axis=2)) for s in volume]
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return batch.to(self.device).float() / 255.0

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Every detection above ``cfg.conf`` on every slice of a cached ``(n_slices, H, W)`` uint8 volume.

        The detector's class gives the level. On Sagittal T1 the side is the half of the volume the slice lies
        in, whatever the class says: a left and a right foramen look alike on their own slices, so no 2D
        detector can tell them apart, while the slice order can. Detections on the centre slice are dropped.

        Args:
            volume: cached ``(n_slices, H, W)`` uint8 volume.
            left_first: whether slice 0 lies on the patient's left (:func:`left_first`); used on T1 only.

        Returns:
            Columns ``target`` (index into TARGETS), ``slice``, ``x``, ``y`` (cache pixels, pixel centres),
            ``confidence``.
        """
        import torch
        from ultralytics.utils import nms
        from ultralytics.utils.ops import scale_boxes

        volume = np.asarray(volume)
        if volume.ndim != 3 or volume.shape[0] == 0:
            raise ValueError(f"expected a (n_slices, H, W) volume, got shape {volume.shape}")
        with torch.inference_mode():
            batch = self._batch(volume)
            output = self.model(batch)
            per_slice = nms.non_max_suppression(output, self.cfg.conf, 0.7, max_det=300,
                                                end2end=getattr(self.model, "end2end", False))  # fmt: skip
        rows = []
        for index, boxes in enumerate(per_slice):
            if not len(boxes):
                continue
            boxes = boxes.cpu()
            xyxy = scale_boxes(batch.shape[2:], boxes[:, :4].clone(), volume.shape[1:]).numpy()
            centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2 - 0.5  # continuous -> pixel-centre convention
            for (x, y), conf, cls in zip(centre, boxes[:, 4].numpy(), boxes[:, 5].numpy().astype(int), strict=True):
                target = self._target(int(cls), index, len(volume), left_first)
                if target is not None:
                    rows.append((target, index, float(x), float(y), float(conf)))
        frame = pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))
        return frame.astype({"target": "int64", "slice": "int64", "x": "float64", "y": "float64",
                             "confidence": "float64"})  # fmt: skip

    def _target(self, cls: int, slice_index: int, n_slices: int, left_first: bool) -> int | None:
        """The target of a detection of class ``cls`` on slice ``slice_index`` (None: centre slice of T1)."""
        level = cls % len(LEVELS)
        if len(self.groups) == 1:
            return self.groups[0][level]
        centre = (n_slices - 1) / 2
        if slice_index == centre:
            return None
        first, second = self.groups if left_first else self.groups[::-1]
        return (first if slice_index < centre else second)[level]

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Exactly one point per target of this series type, in TARGETS order.

        Each side's detections are resolved to one point per level: per target the centre of the slab of
        slices it is detected on (:func:`slab_centre`), then :func:`resolve_levels` (cranio-caudal order, gaps
        filled). A side without any detection gets NaN points, confidence 0 and ``filled`` True, for the caller
        to fall back on.

        On Sagittal T1 the side is the half of the volume a detection lies in (see :meth:`detect`).

        Args:
            volume: cached ``(n_slices, H, W)`` uint8 volume.
            left_first: whether slice 0 lies on the patient's left (see :func:`left_first`); used on T1 only.

        Returns:
            Columns ``target``, ``slice`` (int; float NaN only for a side without detections), ``x``, ``y``,
            ``confidence``, ``filled``.
        """
        return self.resolve(self.detect(volume, left_first), len(volume))

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        """:meth:`locate` from given detections (e.g. :meth:`detect`'s with levels re-assigned by the caller).

        Args:
            detections: columns of :meth:`detect`.
            n_slices: slices of the volume they come from.
        """
        rows = []
        for group in self.groups:
            rows.extend(self._resolve_side(detections, group, n_slices))
        frame = pd.DataFrame(rows, columns=list(LOCATE_COLUMNS))
        if frame["slice"].notna().all():
            frame["slice"] = frame["slice"].astype("int64")
        return frame.astype({"target": "int64", "filled": "bool"})

    def _resolve_side(self, detections: pd.DataFrame, group: list[int], n_slices: int) -> list[tuple]:
        """One row per target of ``group`` (five levels of one side) from that side's detections."""
        here = detections[detections["target"].isin(group)]
        if here.empty:
            return [(target, np.nan, np.nan, np.nan, 0.0, True) for target in group]
        slabs = pd.DataFrame([slab_centre(frame) for _, frame in here.groupby("target")])
        level = slabs["target"].map({target: index for index, target in enumerate(group)}).to_numpy()
        points = resolve_levels(level, slabs["x"].to_numpy(), slabs["y"].to_numpy(), slabs["slice"].to_numpy(),
                                slabs["confidence"].to_numpy())  # fmt: skip
        slices = np.clip(np.rint(points.slice), 0, n_slices - 1).astype(int)  # filled levels interpolate slices
        return [
            (target, int(slices[i]), float(points.xy[i, 0]), float(points.xy[i, 1]), float(points.confidence[i]),
             bool(points.filled[i]))
            for i, target in enumerate(group)
        ]  # fmt: skip


def slab_centre(detections: pd.DataFrame, keep: float = 0.5) -> dict[str, float]:
    """One detection of one target from its detections on all slices: the centre of the slab it shows on.

    A structure is usually seen on several neighbouring slices with about the same confidence (the canal on
    the five mid-line slices of a Sagittal T2), so the single most confident slice is a coin toss among them,
    while the labelled slice is the middle one. So: take each slice's best detection, grow a run of adjacent
    slices from the most confident one while the confidence stays at least ``keep`` of that peak, and return
    the confidence-weighted mean slice and position of the run, with the peak confidence.

    Args:
        detections: rows of one target (``slice``, ``x``, ``y``, ``confidence``).
        keep: fraction of the peak confidence a slice needs to belong to the slab.
    """
    best = detections.sort_values("confidence").groupby("slice").tail(1).set_index("slice").sort_index()
    peak = best["confidence"].idxmax()
    threshold = keep * best.at[peak, "confidence"]
    run = [peak]
    for step in (-1, 1):
        index = peak + step
        while index in best.index and best.at[index, "confidence"] >= threshold:
            run.append(index)
            index += step
    slab = best.loc[sorted(run)]
    weights = slab["confidence"].to_numpy()
    return {
        "target": int(detections["target"].iloc[0]),
        "slice": float(np.average(slab.index.to_numpy(), weights=weights)),
        "x": float(np.average(slab["x"], weights=weights)),
        "y": float(np.average(slab["y"], weights=weights)),
        "confidence": float(best.at[peak, "confidence"]),
    }
