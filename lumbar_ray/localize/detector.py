"""The level detectors, through ultralytics alone: train one YOLO model per sagittal series type, run it on cached
volumes. No Ray and no MLflow here: :mod:`lumbar_ray.localize.stage` runs the training as Ray tasks and owns the
MLflow runs.

:func:`train_detector` trains one detector in-process from a :func:`~lumbar_ray.localize.yolo_data.export_yolo_dataset`
export. The quickstart's model is built from a yaml (no weights download) at a reduced width so that it trains in
about a minute on two CPUs; a real config names pretrained weights (a ``.pt``), which the detector is fine-tuned
from. :class:`SagittalDetector` runs one through ultralytics' own predictor on every slice of a
cached volume and turns its boxes into one point per target through the rules every sagittal localiser shares
(:func:`~lumbar_ray.localize.levels.resolve_targets`).

Ultralytics is configured only through its documented means, in every process that imports it through this
module:

- ``YOLO_CONFIG_DIR``: a private settings folder (:func:`ultralytics_env`), so the user's
  ``~/.config/Ultralytics/settings.json`` is neither read nor changed; in it ``ultralytics.settings`` turns every
  integration and the analytics ``sync`` off, except MLflow for a training that is routed to a run;
- ``YOLO_OFFLINE``: no online check at import and no analytics; the font that ultralytics' dataset check
  (``check_font``) would otherwise download is found in the private settings folder (:func:`_provide_font`);
- ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID``, ``MLFLOW_RUN`` (:func:`mlflow_env`): the
  run ultralytics' MLflow callback resumes, logs its parameters, per-epoch losses and final mAPs to, and ends.
  They are set in the environment of the process that trains (the stage's Ray task), never changed here.

Ultralytics reads the first two when it is first imported, so this module imports it lazily and sets them (with an
empty ``ULTRALYTICS_API_KEY``: no Platform streaming) just before; a process that imported ultralytics earlier
keeps its settings untouched, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

from lumbar_ray.config import LocalizeConfig
from lumbar_ray.constants import LEVELS
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.localize.levels import (
    DETECTION_COLUMNS,
    detector_targets,
    provisional_target,
    resolve_targets,
    side_groups,
)
from lumbar_ray.paths import DETECTOR_WEIGHTS, atomic_path

logger = logging.getLogger(__name__)

BACKGROUND_OFFSET: dict[str, int] = {"Sagittal T2/STIR": 4, "Sagittal T1": 2}
"""Slices between a labelled slice and its background slice (:func:`add_background`): the canal shows on about
five mid-line slices of a Sagittal T2, a foramen on one or two slices of a Sagittal T1."""

NMS_IOU = 0.7
"""IoU above which the predictor's NMS keeps only the more confident box (ultralytics' validation default)."""
MAX_DETECTIONS = 300

# Augmentations that respect the anatomy: no flips (the levels run head to feet, the canal lies behind the
# discs), no mosaic (a level is told from its neighbours by where it sits in the whole spine).
_AUGMENT = {"fliplr": 0.0, "flipud": 0.0, "mosaic": 0.0, "degrees": 5.0, "translate": 0.1, "scale": 0.2}
# Every integration ultralytics' settings can turn on, and its analytics: all off; MLflow is decided per training.
_SETTINGS_OFF = {"sync": False, "clearml": False, "comet": False, "dvc": False, "raytune": False,
                 "tensorboard": False, "wandb": False}  # fmt: skip


# ------------------------------------------------------------------------------------------------ configuration


def default_settings_dir() -> Path:
    """The private ultralytics settings folder of a process given none: ``$XDG_CACHE_HOME/lumbar_ray/ultralytics``
    (``~/.cache/...``), never the user's own ultralytics folder."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "lumbar_ray" / "ultralytics"


def ultralytics_env(settings_dir: str | Path) -> dict[str, str]:
    """The environment under which ultralytics reads its settings from ``settings_dir`` and stays offline.

    ``ULTRALYTICS_API_KEY`` is emptied too: a key in the user's environment would stream a training to the
    Ultralytics Platform.
    """
    return {"YOLO_CONFIG_DIR": str(Path(settings_dir).resolve()), "YOLO_OFFLINE": "True", "ULTRALYTICS_API_KEY": ""}


def mlflow_env(tracking_uri: str, experiment: str, run_id: str, run_name: str) -> dict[str, str]:
    """The environment that routes ultralytics' MLflow callback to an existing run.

    The callback sets the experiment ``MLFLOW_EXPERIMENT_NAME`` (it must be the run's own, or MLflow refuses to
    resume the run), then ``mlflow.start_run`` resumes ``MLFLOW_RUN_ID`` under the name ``MLFLOW_RUN`` (kept as it
    is); the callback ends the run when the training ends (FAILED if it fails), so nothing stays active in the
    process. Pass it with :func:`train_detector`'s ``track=True``.

    Args:
        tracking_uri: the MLflow store (absolute: the training may run in another directory).
        experiment: the name of the run's experiment.
        run_id: the run to log to.
        run_name: the run's name.
    """
    return {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_RUN_ID": run_id,
            "MLFLOW_RUN": run_name}  # fmt: skip


def _provide_font(config_dir: Path) -> None:
    """Put a font where ultralytics' dataset check (``check_font``) looks first, its settings folder, under the
    name it asks for: found there, it never tries the network. Nothing is drawn with it (``plots=False``), so any
    TrueType font will do: matplotlib's bundled DejaVu Sans."""
    from matplotlib import font_manager

    target = config_dir / "Arial.ttf"
    if not target.is_file():
        config_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as partial:
            shutil.copyfile(font_manager.findfont("DejaVu Sans", fallback_to_default=True), partial)


def _ultralytics(settings_dir: str | Path | None = None, track: bool = False) -> ModuleType:
    """``ultralytics``, imported under :func:`ultralytics_env` and with only the wanted integrations on.

    Args:
        settings_dir: the private settings folder if this process has not imported ultralytics yet; None = the
            ``YOLO_CONFIG_DIR`` the environment names (ultralytics' own way to choose it, e.g. a Ray task's
            ``runtime_env``), else :func:`default_settings_dir`.
        track: whether trainers get ultralytics' MLflow callback (routed by :func:`mlflow_env`).
    """
    if "ultralytics" not in sys.modules:
        os.environ.update(ultralytics_env(settings_dir or os.environ.get("YOLO_CONFIG_DIR") or default_settings_dir()))
    import ultralytics
    from ultralytics.utils import SETTINGS_FILE

    private = os.environ.get("YOLO_CONFIG_DIR")
    if not private or not Path(SETTINGS_FILE).resolve().is_relative_to(Path(private).resolve()):
        # Imported before this module could point it elsewhere: leave the user's settings file as it is.
        logger.warning("ultralytics was imported with the settings %s; not changing them", SETTINGS_FILE)
        return ultralytics
    _provide_font(Path(SETTINGS_FILE).parent)
    wanted = _SETTINGS_OFF | {"mlflow": track}
    if any(ultralytics.settings.get(key) != value for key, value in wanted.items()):
        ultralytics.settings.update(wanted)
    return ultralytics


# ---------------------------------------------------------------------------------------------------- training


def _model_source(cfg: LocalizeConfig, folder: Path) -> str:
    """The ``model`` argument of the trainer: ``cfg.model``, or a copy of its yaml at width ``cfg.width``.

    The copy keeps the file name, so ultralytics picks the same scale (``n`` of ``yolov8n``) and only that
    scale's width multiple changes. Weights (a ``.pt``) are never rescaled: the config refuses a width with them.
    """
    if cfg.width is None or cfg.from_weights:
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
    """Ultralytics training arguments: everything under ``out_dir``, nothing that plots or downloads (but the
    pretrained weights a ``.pt`` model names).

    Args:
        dataset_yaml: the export's ``dataset.yaml``.
        cfg: model, size and schedule of the detector.
        out_dir: ultralytics writes under ``out_dir/train``.
        model: what the trainer builds (:func:`_model_source`): ``cfg.model`` or a rescaled copy of its yaml.

    Returns:
        The ``overrides`` of ultralytics' ``DetectionTrainer``. ``pretrained`` is True for weights, so the trainer
        starts from the ``.pt`` that ``model`` names (False would build the ``.pt``'s architecture and drop its
        weights), and False for a yaml (nothing to load, nothing to download).
    """
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
        "deterministic": True,
        "device": 0 if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu",
        "project": str(out_dir.resolve()),
        "name": "train",
        "exist_ok": True,  # a retried task trains again in the same folder
        "pretrained": cfg.from_weights,
        "plots": False,  # plots need a font download
        "amp": False,  # the AMP check downloads a model
        "cache": True,  # a few hundred small images: decode once
        "val": False,  # validate the final epoch only (logged to MLflow): per-epoch validation costs a third more
        "verbose": False,
        **_AUGMENT,
    }


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
    """Copy the trained weights (best epoch, else last) to ``weights`` atomically: ``detector.pt`` is the marker
    of a finished training, so a crash must never leave a partial one."""
    source = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    with atomic_path(weights) as partial:
        shutil.copyfile(source, partial)


def train_detector(
    dataset_yaml: Path,
    description: str,
    cfg: LocalizeConfig,
    out_dir: Path,
    settings_dir: str | Path | None = None,
    track: bool = False,
) -> Path:
    """Train one detector in-process and return ``out_dir/detector.pt``; an existing one is returned at once.

    Args:
        dataset_yaml: the export's ``dataset.yaml``.
        description: the series type (for logs).
        cfg: model, size and schedule of the detector.
        out_dir: everything goes here (``train/`` holds ultralytics' own output).
        settings_dir: ultralytics' private settings folder, if this process has not imported it yet (see
            :func:`_ultralytics`).
        track: log ultralytics' parameters, per-epoch metrics and weights to the MLflow run named by the
            :func:`mlflow_env` variables of this process's environment; False = no MLflow.

    Returns:
        The path of the final weights.

    Raises:
        ValueError: if ``track`` is set but the environment names no run.
    """
    out_dir = Path(out_dir)
    weights = out_dir / DETECTOR_WEIGHTS
    if weights.is_file():
        logger.info("detector for %s already trained: %s", description, weights)
        return weights
    if track and not (os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_EXPERIMENT_NAME")):
        raise ValueError("track=True needs MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_NAME in the environment (mlflow_env)")
    _ultralytics(settings_dir, track=track)
    from ultralytics.models.yolo.detect import DetectionTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    args = _train_args(dataset_yaml, cfg, out_dir, _model_source(cfg, out_dir / "model"))
    logger.info("training the %s detector (%s, width %s, %d epochs at %d px) in %s", description, cfg.model,
                cfg.width, cfg.epochs, cfg.imgsz, out_dir)  # fmt: skip
    with _torch_determinism_restored():
        trainer = DetectionTrainer(overrides=args)
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


def complete_export(points: pd.DataFrame, cache: SeriesCache, description: str, dataset_yaml: Path) -> Path:
    """Turn an export of the label slices into what the detector of ``description`` trains on: background
    slices (:func:`add_background`, :data:`BACKGROUND_OFFSET` away) and, on Sagittal T1, one class per level
    (:func:`merge_sides`). Returns ``dataset_yaml``."""
    add_background(points, cache, description, dataset_yaml, BACKGROUND_OFFSET[description])
    if len(side_groups(description)) > 1:
        merge_sides(dataset_yaml)
    return Path(dataset_yaml)


# ------------------------------------------------------------------------------------------------------ inference


class SagittalDetector:
    """A trained detector of one sagittal series type, applied to cached volumes.

    Args:
        weights: ``detector.pt`` from :func:`train_detector`.
        description: the series type it was trained on (fixes its classes).
        cfg: ``conf`` is the minimum confidence of a detection.
        device: torch device; None = CUDA when available, else CPU.
        settings_dir: see :func:`train_detector`.
    """

    def __init__(
        self,
        weights: str | Path,
        description: str,
        cfg: LocalizeConfig,
        device: str | None = None,
        settings_dir: str | Path | None = None,
    ) -> None:
        ultralytics = _ultralytics(settings_dir)
        import torch

        self.description = description
        self.cfg = cfg
        self.targets = detector_targets(description)
        self.groups = side_groups(description)
        self.device = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.model = ultralytics.YOLO(str(weights), task="detect")
        n_classes = len(self.model.names)
        if n_classes not in {len(LEVELS), len(self.targets)}:
            raise ValueError(f"{weights} has {n_classes} classes, {description} needs {len(self.targets)}"
                             f" (or {len(LEVELS)}: one per level, sides from the slices)")  # fmt: skip
        self.imgsz = int(self.model.overrides.get("imgsz", cfg.imgsz))  # the size it was trained at

    def _predict(self, volume: np.ndarray) -> list[Any]:
        """Ultralytics' predictor on every slice, as one batch: letterboxed to the training size, NMS, boxes
        scaled back to the slice. Grey slices go in as three equal channels (so their BGR order is moot)."""
        images = [np.repeat(np.asarray(image)[:, :, None], 3, axis=2) for image in volume]
        return self.model.predict(images, imgsz=self.imgsz, conf=self.cfg.conf, iou=NMS_IOU, max_det=MAX_DETECTIONS,
                                  device=self.device, verbose=False)  # fmt: skip

    def detect(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Every detection above ``cfg.conf`` on every slice of a cached ``(n_slices, H, W)`` uint8 volume.

        The detector's class gives the level. On Sagittal T1 a left and a right foramen look alike on their own
        slices, so no 2D detector can tell them apart: the side here is provisional (:meth:`_target`), and the
        study-level localisation sides each detection again from its patient-space position.

        Args:
            volume: cached ``(n_slices, H, W)`` uint8 volume.
            left_first: whether slice 0 lies on the patient's left
                (:func:`~lumbar_ray.localize.geometry.left_first`); used on T1 only.

        Returns:
            Columns ``target`` (index into TARGETS), ``slice``, ``x``, ``y`` (cache pixels, pixel centres),
            ``confidence``.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3 or volume.shape[0] == 0:
            raise ValueError(f"expected a (n_slices, H, W) volume, got shape {volume.shape}")
        rows = []
        for index, result in enumerate(self._predict(volume)):
            boxes = result.boxes.cpu()
            if not len(boxes):
                continue
            xyxy = boxes.xyxy.numpy()
            centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2 - 0.5  # continuous -> pixel-centre convention
            for (x, y), conf, cls in zip(centre, boxes.conf.numpy(), boxes.cls.numpy().astype(int), strict=True):
                rows.append((self._target(int(cls), index, len(volume), left_first), index, float(x), float(y),
                             float(conf)))  # fmt: skip
        frame = pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))
        return frame.astype({"target": "int64", "slice": "int64", "x": "float64", "y": "float64",
                             "confidence": "float64"})  # fmt: skip

    def _target(self, cls: int, slice_index: int, n_slices: int, left_first: bool) -> int:
        """The target of a detection of class ``cls`` on slice ``slice_index``: on Sagittal T1 with a provisional
        side (:func:`~lumbar_ray.localize.levels.provisional_target`)."""
        return provisional_target(self.description, cls, slice_index, n_slices, left_first)

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        """Exactly one point per target of this series type, in TARGETS order.

        Each side's detections are resolved to one point per level: per target the centre of the slab of
        slices it is detected on (:func:`~lumbar_ray.localize.levels.slab_centre`), then
        :func:`~lumbar_ray.localize.levels.resolve_levels` (cranio-caudal order, gaps filled). A side without any
        detection gets NaN points, confidence 0 and ``filled`` True, for the caller to fall back on.

        On Sagittal T1 the side is provisional: the half of the volume a detection lies in (see :meth:`_target`).

        Args:
            volume: cached ``(n_slices, H, W)`` uint8 volume.
            left_first: whether slice 0 lies on the patient's left
                (:func:`~lumbar_ray.localize.geometry.left_first`); used on T1 only.

        Returns:
            Columns ``target``, ``slice`` (int; float NaN only for a side without detections), ``x``, ``y``,
            ``confidence``, ``filled``.
        """
        return self.resolve(self.detect(volume, left_first), len(volume))

    def resolve(self, detections: pd.DataFrame, n_slices: int) -> pd.DataFrame:
        """:meth:`locate` from given detections (e.g. :meth:`detect`'s with levels re-assigned by the caller):
        :func:`~lumbar_ray.localize.levels.resolve_targets`.

        Args:
            detections: columns of :meth:`detect`.
            n_slices: slices of the volume they come from.
        """
        return resolve_targets(detections, self.description, n_slices)


def load_detectors(
    weights: dict[str, str | Path],
    cfg: LocalizeConfig,
    device: str | None = None,
    settings_dir: str | Path | None = None,
) -> dict[str, SagittalDetector]:
    """A :class:`SagittalDetector` per series type from its weights (``cfg.conf`` filters detections).

    Args:
        weights: series type -> ``detector.pt``.
        cfg: the localisation settings.
        device: see :class:`SagittalDetector`.
        settings_dir: see :func:`train_detector`.
    """
    return {description: SagittalDetector(path, description, cfg, device=device, settings_dir=settings_dir)
            for description, path in weights.items()}  # fmt: skip
