"""The localisation stage: train the sagittal detectors on the label points, measure them on a held-out fold.

``run_localize(cfg)`` (``lumbar-ray localize``, the quickstart's step after preprocessing):

1. maps the label coordinates into the cache and fixes the CV folds (the same seeded folds the CV uses);
2. trains one YOLO detector per sagittal series type on the studies outside ``localize.val_fold``, each as a Ray
   task with the GPU it asks for (:func:`fit_detectors`); ultralytics' metrics land in child runs of one MLflow
   ``localize`` run, routed by environment variables given to the task (the driver's MLflow state is untouched);
3. places all 25 points of every validation-fold study with the detectors and the axial geometry, and logs the
   localisation metrics (share within 5/10 px and mm, slice accuracy, per series type and level), the axial
   assignment accuracy from the labelled sagittal points, and overlay images of predicted vs labelled points.

Everything lands under :func:`lumbar_ray.paths.localize_dir_for` (the key hashes every setting that changes the
detectors); a rerun finds the trained detectors and the written evaluation and redoes neither. Registering a CV
(:mod:`lumbar_ray.train.register`) finds them there and ships them with the fold ensemble, so a registered model
carries its own localisation.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lumbar_ray import plots
from lumbar_ray.config import Config, ConfigError, LocalizeConfig, cache_settings
from lumbar_ray.constants import DETECTED_SERIES_TYPES, series_slug
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.data.crops import points_from_coordinates
from lumbar_ray.data.rsna import encode_labels, load_rsna
from lumbar_ray.data.splits import make_folds
from lumbar_ray.localize.detector import complete_export, mlflow_env, train_detector
from lumbar_ray.localize.evaluate import point_errors, summarise_errors, summary_metrics
from lumbar_ray.localize.locators import load_locators
from lumbar_ray.localize.study import AXIAL, LOCATED_COLUMNS, axial_rows, localise_study, patient_points, study_series
from lumbar_ray.localize.yolo_data import export_yolo_dataset, pack_dataset, unpack_dataset
from lumbar_ray.paths import (
    DETECTOR_WEIGHTS,
    FOLDS_CSV,
    ShippedFile,
    atomic_path,
    cache_root_for,
    data_root_for,
    detector_dir_for,
    localize_dir_for,
    localize_key,
    ship_if_local,
    trained_detectors,
    ultralytics_settings_dir,
    unet_weights_for,
)
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.segment.measure import measurements_table, with_measurements
from lumbar_ray.tracking import Tracker

logger = logging.getLogger(__name__)

DETECTOR_TAG = "lumbar_ray.detector"
"""Child-run tag naming the series type (its slug) a detector run belongs to."""
SUMMARY_NAME = "localisation_summary.csv"
AXIAL_SUMMARY_NAME = "axial_from_labels_summary.csv"
VAL_POINTS_NAME = "val_points.parquet"
VAL_ERRORS_NAME = "val_errors.parquet"
RESULTS_NAME = "results.csv"
"""Ultralytics' per-epoch training metrics, kept beside a detector's weights."""
OVERLAY_STUDIES = 3


@dataclass
class LocalizeResult:
    """What :func:`run_localize` produced."""

    folder: Path
    weights: dict[str, Path]
    summary: pd.DataFrame
    axial_from_labels: pd.DataFrame
    val_points: pd.DataFrame
    mlflow_run_id: str | None
    val_errors: pd.DataFrame | None = None
    """:func:`~lumbar_ray.localize.evaluate.point_errors` of ``val_points``, one row per placed target (what
    :func:`~lumbar_ray.localize.evaluate.jitter_values` turns into training jitter)."""

    def format(self) -> str:
        lines = [f"localisation ({self.folder}):"]
        for row in self.summary[self.summary["level"] == "all"].itertuples(index=False):
            shares = f"<=5px {row.within_5px:.3f}, <=10px {row.within_10px:.3f}, <=10mm {row.within_10mm:.3f}"
            slices = f"slice {row.slice_accuracy:.3f} (+-1: {row.slice_within_1:.3f})"
            if row.series_type == "Axial T2":
                slices += f", level {row.level_right:.3f}"
            lines.append(f"  {row.series_type:<17} {row.points:>4} points: {slices}, {shares}")
        for row in self.axial_from_labels[self.axial_from_labels["level"] == "all"].itertuples(index=False):
            lines.append(f"  axial assignment from labelled sagittal points: slice {row.slice_accuracy:.3f} "
                         f"of {row.points}, <=10px {row.within_10px:.3f}")  # fmt: skip
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- training


def _export(points: pd.DataFrame, cache: SeriesCache, folds: pd.DataFrame, cfg: Config, description: str) -> Path:
    """The training data of one series type's detector, in its folder; returns its ``dataset.yaml``."""
    export = export_yolo_dataset(points, cache, description, folds, cfg.localize.val_fold,
                                 detector_dir_for(cfg, description) / "dataset", cfg.localize.box_fraction,
                                 cfg.localize.box_mm)  # fmt: skip
    return complete_export(points, cache, description, export.dataset_yaml)


def _task_env(tracker: Tracker | None, run_id: str | None, run_name: str) -> dict[str, str]:
    """The environment of one training task: its MLflow routing to ``run_id`` (in the run's own experiment) when
    there is one. Ultralytics' settings are not routed: the task keeps them in its own node's private folder
    (:func:`~lumbar_ray.localize.detector.default_settings_dir`), never in a folder of the driver's."""
    if tracker is None or run_id is None:
        return {}
    experiment = tracker.client.get_experiment(tracker.client.get_run(run_id).info.experiment_id).name
    return mlflow_env(tracker.uri, experiment, run_id, run_name)


def train_packed_detector(packed: bytes, description: str, cfg: LocalizeConfig, track: bool,
                          model_file: ShippedFile | None = None) -> dict[str, bytes]:  # fmt: skip
    """The Ray task, on whichever node has the resources it asks for: unpack the export (:func:`pack_dataset`) in a
    temporary folder of that node, train there, and return the weights (and ultralytics' per-epoch
    ``results.csv``) as bytes. It reads no path of the driver's and leaves nothing the driver must find on its node.

    Args:
        packed: the export of :func:`lumbar_ray.localize.yolo_data.pack_dataset`.
        description: the series type.
        cfg: the detector's settings.
        track: log to the MLflow run the task's environment names (:func:`_task_env`).
        model_file: ``cfg.model`` as the driver read it, when it names a local file (weights or a yaml).

    Returns:
        ``{"detector.pt": bytes}``, with ``"results.csv"`` when ultralytics wrote one.
    """
    if model_file is not None:  # the driver's file, written on this node
        cfg = cfg.model_copy(update={"model": str(model_file.local_path())})
    with tempfile.TemporaryDirectory(prefix="lumbar_ray_detector_") as folder:
        dataset_yaml = unpack_dataset(packed, Path(folder) / "dataset")
        weights = train_detector(dataset_yaml, description, cfg, Path(folder) / "out", track=track)
        outputs = {DETECTOR_WEIGHTS: weights.read_bytes()}
        results = Path(folder) / "out" / "train" / RESULTS_NAME
        return outputs | ({RESULTS_NAME: results.read_bytes()} if results.is_file() else {})


def _write_outputs(outputs: dict[str, bytes], folder: Path) -> Path:
    """Write a training task's outputs into the driver's detector folder (the weights last and atomically: their
    presence marks the detector trained); returns the weights' path."""
    for name, data in sorted(outputs.items(), key=lambda item: item[0] == DETECTOR_WEIGHTS):
        with atomic_path(folder / name) as temporary:
            temporary.write_bytes(data)
    return folder / DETECTOR_WEIGHTS


def _collect(pending: dict[str, tuple[Any, str | None]], folders: dict[str, Path],
             tracker: Tracker | None) -> dict[str, Path]:  # fmt: skip
    """Wait for every training task, write what it returned into its detector folder, and end its child run FINISHED
    or FAILED; then raise the first failure."""
    import ray

    trained: dict[str, Path] = {}
    failure: Exception | None = None
    for description, (ref, run_id) in pending.items():
        try:
            trained[description] = _write_outputs(ray.get(ref), folders[description])
        except Exception as error:  # a RayTaskError wrapping the training's own error
            logger.error("training the %s detector failed: %s", description, error)
            failure = failure or error
        if tracker is not None and run_id is not None:
            tracker.finish(run_id, "FINISHED" if description in trained else "FAILED")
    if failure is not None:
        raise failure
    return trained


def fit_detectors(
    points: pd.DataFrame,
    cache: SeriesCache,
    folds: pd.DataFrame,
    cfg: Config,
    tracker: Tracker | None = None,
    parent: str | None = None,
) -> dict[str, Path]:
    """Train the Sagittal T2/STIR and Sagittal T1 detectors as Ray tasks; finished ones are not retrained.

    The driver exports each series type's training data into :func:`lumbar_ray.paths.detector_dir_for` and hands
    it to its task packed, through the object store; the task (:func:`train_packed_detector`, with the resources
    ``cfg.localize`` asks for, on any node) returns the weights the same way and the driver writes them there: no
    path crosses a node. With a ``parent`` run, the task's environment (Ray's ``runtime_env``) routes ultralytics'
    MLflow callback to the series type's child run (tag :data:`DETECTOR_TAG`).

    Args:
        points: POINTS frame of the label points (cache pixels).
        cache: the cache the points refer to.
        folds: study_id -> fold; ``cfg.localize.val_fold`` validates.
        cfg: the config (the detectors' settings and folders).
        tracker: the MLflow store and experiment of ``parent``.
        parent: the run under which each detector gets a child run; None = no MLflow.

    Returns:
        ``{description: weights path}`` for both series types, in training order.

    Raises:
        ray.exceptions.RayTaskError: if a training task failed (its child run is marked FAILED; the other
            tasks are waited for first).
    """
    result = {d: detector_dir_for(cfg, d) / DETECTOR_WEIGHTS for d in DETECTED_SERIES_TYPES}
    missing = [description for description, weights in result.items() if not weights.is_file()]
    for description in (d for d in DETECTED_SERIES_TYPES if d not in missing):
        logger.info("detector for %s already trained: %s", description, result[description])
    if not missing:
        return result
    ensure_ray()
    import ray

    track = tracker is not None and parent is not None
    task = ray.remote(train_packed_detector)
    model_file = ship_if_local(cfg.localize.model)
    pending: dict[str, tuple[Any, str | None]] = {}
    for description in missing:  # each task starts as soon as its data is exported
        slug = series_slug(description)
        packed = ray.put(pack_dataset(_export(points, cache, folds, cfg, description)))  # a failed export runs none
        run_id = tracker.child_run(parent, DETECTOR_TAG, slug, "detector", f"detector_{slug}") if track else None
        options = {"num_cpus": cfg.localize.num_cpus, "num_gpus": cfg.localize.num_gpus,
                   "runtime_env": {"env_vars": _task_env(tracker, run_id, f"detector_{slug}")}}  # fmt: skip
        if cfg.localize.resources:
            options["resources"] = dict(cfg.localize.resources)
        pending[description] = (task.options(**options).remote(packed, description, cfg.localize, track, model_file),
                                 run_id)  # fmt: skip
    folders = {description: detector_dir_for(cfg, description) for description in missing}
    return result | _collect(pending, folders, tracker if track else None)


# -------------------------------------------------------------------------------------------------- evaluation


def _series_reader(cache: SeriesCache):
    @lru_cache(maxsize=4096)
    def series_of(study_id: int, series_id: int) -> CachedSeries:
        return CachedSeries(np.zeros((0, 0, 0), np.uint8), cache.read_meta(study_id, series_id))

    return series_of


def axial_from_labels(points: pd.DataFrame, series: pd.DataFrame, cache: SeriesCache, fraction: float) -> pd.DataFrame:
    """Axial points placed by geometry from the *labelled* sagittal points: the geometry alone, detector-free.

    Only cached axial series are searched (a failed or missing one is left out, as in :func:`localise_studies`).
    """
    series_of = _series_reader(cache)
    cached = cache.cached_keys()
    rows = []
    axial_series = series[series["series_description"] == AXIAL]
    for study_id, group in points.groupby("study_id"):
        axial_ids = sorted(int(s) for s in axial_series.loc[axial_series["study_id"] == study_id, "series_id"])
        axial = [series_of(int(study_id), s) for s in axial_ids if (int(study_id), s) in cached]
        sagittal = group[~group["series_id"].isin(axial_ids)]
        if not axial or sagittal.empty:
            continue
        by_id = {int(s): series_of(int(study_id), int(s)) for s in sagittal["series_id"].unique()}
        rows += axial_rows(int(study_id), axial, patient_points(sagittal, by_id), fraction)
    return pd.DataFrame(rows, columns=list(LOCATED_COLUMNS))  # the columns even when no study has an axial series


def localise_studies(
    study_ids: list[int], cache: SeriesCache, series: pd.DataFrame, detectors: dict, fraction: float
) -> tuple[pd.DataFrame, list[dict]]:
    """Points of many studies (a progress bar over them) and their per-study reports."""
    cached = cache.cached_keys()
    frames, reports = [], []
    for study_id in tqdm(study_ids, desc="localising studies", unit="study", leave=False):
        study = study_series(cache, series, int(study_id), cached)
        located = with_measurements(localise_study(int(study_id), study, detectors, fraction), study, detectors)
        frames.append(located.points)
        reports.append(located.to_json())
    return pd.concat(frames, ignore_index=True), reports


@dataclass
class _Inputs:
    """What the stage reads: the label points in the cache, the folds, and the training series table."""

    cache: SeriesCache
    points: pd.DataFrame
    folds: pd.DataFrame
    series: pd.DataFrame


def _inputs(cfg: Config) -> _Inputs:
    """Label points in cache pixels and the CV's seeded folds; clear errors when the data or cache is missing."""
    data = load_rsna(data_root_for(cfg))
    if data.coordinates is None or data.train is None:
        raise FileNotFoundError(f"{data_root_for(cfg)} has no train.csv or train_label_coordinates.csv")
    if cfg.localize.val_fold >= cfg.cv.n_folds:
        raise ConfigError(f"localize.val_fold {cfg.localize.val_fold} is not a fold of cv.n_folds={cfg.cv.n_folds}")
    cache = SeriesCache(cache_root_for(cfg), cache_settings(cfg.preprocess))
    if cache.read_manifest().empty:
        raise FileNotFoundError(f"cache {cache.path} is empty: complete it (`lumbar-ray preprocess`) first")
    points = points_from_coordinates(data.coordinates, cache, data.train_series).points
    study_ids, labels = encode_labels(data.train)
    folds = make_folds(study_ids, labels, cfg.cv.n_folds, cfg.cv.seed)
    return _Inputs(cache, points, folds, data.train_series)


def _evaluate(cfg: Config, inputs: _Inputs, weights: dict[str, Path], tracker: Tracker, parent: str) -> LocalizeResult:
    """Localise the validation fold, measure it against the labels, log it and write it (summary last)."""
    folder = localize_dir_for(cfg)
    cache, folds, series = inputs.cache, inputs.folds, inputs.series
    val_ids = sorted(int(s) for s in folds.loc[folds["fold"] == cfg.localize.val_fold, "study_id"])
    detectors = load_locators(weights, cfg.localize, settings_dir=ultralytics_settings_dir(cfg))
    fraction = cfg.localize.subarticular_fraction
    predicted, reports = localise_studies(val_ids, cache, series, detectors, fraction)
    truth = inputs.points[inputs.points["study_id"].isin(val_ids)]
    series_of = _series_reader(cache)
    errors = point_errors(predicted, truth, series_of)
    summary = summarise_errors(errors)
    from_labels = axial_from_labels(truth, series, cache, fraction)
    axial_ids = series.loc[series["series_description"] == AXIAL, "series_id"]
    axial_summary = summarise_errors(point_errors(from_labels, truth[truth["series_id"].isin(axial_ids)], series_of))

    _log_localisation(tracker, parent, summary, axial_summary, reports, predicted, truth, cache)
    predicted.to_parquet(folder / VAL_POINTS_NAME, index=False)
    errors.to_parquet(folder / VAL_ERRORS_NAME, index=False)
    axial_summary.to_csv(folder / AXIAL_SUMMARY_NAME, index=False)
    summary.to_csv(folder / SUMMARY_NAME, index=False)  # last: the evaluation's commit marker
    return LocalizeResult(folder, weights, summary, axial_summary, predicted, parent, errors)


def load_val_errors(cfg: Config) -> pd.DataFrame | None:
    """The held-out point errors of this config's evaluated localisation (:attr:`LocalizeResult.val_errors`), or
    None when it has not been evaluated (``lumbar-ray localize``)."""
    path = localize_dir_for(cfg) / VAL_ERRORS_NAME
    return pd.read_parquet(path) if path.is_file() else None


def _localisers(cfg: Config, inputs: _Inputs, tracker: Tracker, parent: str) -> dict[str, Path]:
    """Series type -> the weights of its localiser: the YOLO detectors, trained here unless finished, or the U-Net
    that ``lumbar-ray segment`` trained for this config (``localize.method: unet``).

    Raises:
        FileNotFoundError: under ``unet``, when the U-Net has not been trained.
    """
    if cfg.localize.method == "yolo":
        return fit_detectors(inputs.points, inputs.cache, inputs.folds, cfg, tracker, parent)
    weights = trained_detectors(cfg)
    if sorted(weights) != sorted(DETECTED_SERIES_TYPES):
        raise FileNotFoundError(f"localize.method=unet: no trained U-Net at {unet_weights_for(cfg)}; train it first "
                                "(`lumbar-ray segment` with the same config)")  # fmt: skip
    tracker.log_values(parent, {"unet_trained": 1.0})
    return weights


def run_localize(cfg: Config) -> LocalizeResult:
    """Train (or reuse) the detectors and evaluate them on the validation fold (see the module docstring).

    Raises:
        FileNotFoundError: if the data has no label coordinates or the cache is empty.
        ValueError: if ``localize.val_fold`` is not a fold.
    """
    folder = localize_dir_for(cfg)
    inputs = _inputs(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    inputs.folds.to_csv(folder / FOLDS_CSV, index=False)
    tracker = Tracker.from_config(cfg)
    parent = tracker.parent_run(localize_key(cfg), kind="localize", config=cfg)
    try:
        weights = _localisers(cfg, inputs, tracker, parent)
        if all((folder / name).is_file() for name in (SUMMARY_NAME, VAL_POINTS_NAME, VAL_ERRORS_NAME)):
            logger.info("localisation of %s already evaluated: reusing %s", folder.name, folder / SUMMARY_NAME)
            result = LocalizeResult(folder, weights, pd.read_csv(folder / SUMMARY_NAME),
                                    pd.read_csv(folder / AXIAL_SUMMARY_NAME), pd.read_parquet(folder / VAL_POINTS_NAME),
                                    parent, pd.read_parquet(folder / VAL_ERRORS_NAME))  # fmt: skip
        else:
            result = _evaluate(cfg, inputs, weights, tracker, parent)
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    tracker.finish(parent)
    logger.info("%s", result.format())
    return result


def _log_localisation(
    tracker: Tracker,
    parent: str,
    summary: pd.DataFrame,
    axial_summary: pd.DataFrame,
    reports: list[dict],
    predicted: pd.DataFrame,
    truth: pd.DataFrame,
    cache: SeriesCache,
) -> None:
    """Metrics, tables, per-study reports and overlay figures of the evaluation, on the ``localize`` run."""
    values = summary_metrics(summary) | summary_metrics(axial_summary, prefix="axial_from_labels")
    tracker.log_values(parent, values)
    tracker.log_text(parent, summary.to_csv(index=False), "localisation/summary.csv")
    tracker.log_text(parent, axial_summary.to_csv(index=False), "localisation/axial_from_labels.csv")
    tracker.log_text(parent, json.dumps(reports, indent=1), "localisation/val_studies.json")
    measured = measurements_table(reports)
    if not measured.empty:  # a segmentation localiser's millimetres per study and level
        tracker.log_text(parent, measured.to_csv(index=False), "localisation/measurements.csv")
        tracker.log_values(parent, {f"measure.{column}.median": float(measured[column].median())
                                    for column in measured.columns[2:]})  # fmt: skip
    for study_id in sorted(predicted["study_id"].unique())[:OVERLAY_STUDIES]:
        figure = plots.localisation_overlay(
            int(study_id), predicted[predicted["study_id"] == study_id], truth[truth["study_id"] == study_id], cache
        )
        tracker.log_figure(parent, figure, f"localisation/overlay_{study_id}.png")
