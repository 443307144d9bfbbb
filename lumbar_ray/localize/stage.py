"""The localisation stage: train the sagittal detectors on the label points, measure them on a held-out fold.

``run_localize(cfg)`` (``lumbar-ray localize``, the quickstart's step after preprocessing):

1. maps the label coordinates into the cache and fixes the CV folds (the same seeded folds the CV uses);
2. trains one YOLO detector per sagittal series type on the studies outside ``localize.val_fold``, each as a Ray
   task with the GPU it asks for (:func:`lumbar_ray.localize.detector.fit_detectors`); ultralytics' metrics land
   in child runs of one MLflow ``localize`` run;
3. places all 25 points of every validation-fold study with the detectors and the axial geometry, and logs the
   localisation metrics (share within 5/10 px and mm, slice accuracy, per series type and level), the axial
   assignment accuracy from the labelled sagittal points, and overlay images of predicted vs labelled points.

Everything lands under ``<workdir>/localize/<key>/`` (the key hashes every setting that changes the detectors);
a rerun finds the trained detectors and the written evaluation and redoes neither. The CV registers the detectors
with the fold ensemble, so a registered model carries its own localisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import LOCALIZE_RESOURCE_FIELDS, Config, LocalizeConfig, cache_root_for, data_root_for
from lumbar_ray.constants import series_slug
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.localize.detector import DETECTOR_DESCRIPTIONS, WEIGHTS_NAME
from lumbar_ray.localize.evaluate import point_errors, summarise_errors, summary_metrics
from lumbar_ray.localize.study import AXIAL, axial_rows, localise_study, patient_points

logger = logging.getLogger(__name__)

SUMMARY_NAME = "localisation_summary.csv"
AXIAL_SUMMARY_NAME = "axial_from_labels_summary.csv"
VAL_POINTS_NAME = "val_points.parquet"
OVERLAY_STUDIES = 3


def localize_key(cfg: Config) -> str:
    """Hash of what changes the detectors: their settings (not resources), the cache version and the folds."""
    from lumbar_ray.data.preprocess import cache_settings

    settings = cfg.localize.model_dump(mode="json", exclude=set(LOCALIZE_RESOURCE_FIELDS))
    payload = {"localize": settings, "cache": cache_settings(cfg.preprocess), "cv": cfg.cv.model_dump(mode="json")}
    return "loc-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def detector_dir_for(cfg: Config) -> Path:
    """``<workdir>/localize/<key>``: the detectors and evaluation of this config."""
    return Path(cfg.workdir) / "localize" / localize_key(cfg)


def trained_detectors(cfg: Config) -> dict[str, Path]:
    """The detector weights of this config that exist (empty before :func:`run_localize`)."""
    folder = detector_dir_for(cfg)
    found = {description: folder / series_slug(description) / WEIGHTS_NAME for description in DETECTOR_DESCRIPTIONS}
    return {description: path for description, path in found.items() if path.is_file()}


def load_detectors(weights: dict[str, str | Path], cfg: LocalizeConfig, device: str | None = None) -> dict:
    """``SagittalDetector`` per series type from weight files (``cfg.conf`` filters detections)."""
    from lumbar_ray.localize.detector import SagittalDetector

    return {description: SagittalDetector(path, description, cfg, device=device)
            for description, path in weights.items()}  # fmt: skip


def study_series(
    cache: SeriesCache, series: pd.DataFrame, study_id: int, cached: set[tuple[int, int]]
) -> dict[str, list[CachedSeries]]:
    """A study's cached series by type, in series-id order: sagittal volumes loaded (memory-mapped), axial
    metadata only. Series listed but not cached (failed or missing) are left out (and so reported missing)."""
    rows = series[series["study_id"] == study_id].sort_values("series_id")
    out: dict[str, list[CachedSeries]] = {}
    for row in rows.itertuples(index=False):
        key = (int(row.study_id), int(row.series_id))
        if key not in cached:
            continue
        if row.series_description == AXIAL:
            entry = CachedSeries(np.zeros((0, 0, 0), np.uint8), cache.read_meta(*key))
        else:
            entry = cache.read(*key, mmap=True)
        out.setdefault(str(row.series_description), []).append(entry)
    return out


@dataclass
class LocalizeResult:
    """What :func:`run_localize` produced."""

    folder: Path
    weights: dict[str, Path]
    summary: pd.DataFrame
    axial_from_labels: pd.DataFrame
    val_points: pd.DataFrame
    mlflow_run_id: str | None

    def format(self) -> str:
        lines = [f"localisation ({self.folder}):"]
        for row in self.summary[self.summary["level"] == "all"].itertuples(index=False):
            shares = f"<=5px {row.within_5px:.3f}, <=10px {row.within_10px:.3f}, <=10mm {row.within_10mm:.3f}"
            slices = f"slice {row.slice_accuracy:.3f} (+-1: {row.slice_within_1:.3f})"
            lines.append(f"  {row.series_type:<17} {row.points:>4} points: {slices}, {shares}")
        for row in self.axial_from_labels[self.axial_from_labels["level"] == "all"].itertuples(index=False):
            lines.append(f"  axial assignment from labelled sagittal points: slice {row.slice_accuracy:.3f} "
                         f"of {row.points}, <=10px {row.within_10px:.3f}")  # fmt: skip
        return "\n".join(lines)


def _series_reader(cache: SeriesCache):
    @lru_cache(maxsize=4096)
    def series_of(study_id: int, series_id: int) -> CachedSeries:
        return CachedSeries(np.zeros((0, 0, 0), np.uint8), cache.read_meta(study_id, series_id))

    return series_of


def axial_from_labels(points: pd.DataFrame, series: pd.DataFrame, cache: SeriesCache, fraction: float) -> pd.DataFrame:
    """Axial points placed by geometry from the *labelled* sagittal points: the geometry alone, detector-free."""
    series_of = _series_reader(cache)
    rows = []
    axial_ids = series[series["series_description"] == AXIAL]
    for study_id, group in points.groupby("study_id"):
        axial = [series_of(int(study_id), int(s)) for s in sorted(axial_ids.loc[axial_ids["study_id"] == study_id,
                                                                                "series_id"])]  # fmt: skip
        sagittal = group[~group["series_id"].isin([int(a.meta["series_id"]) for a in axial])]
        if not axial or sagittal.empty:
            continue
        by_id = {int(s): series_of(int(study_id), int(s)) for s in sagittal["series_id"].unique()}
        rows += axial_rows(int(study_id), axial, patient_points(sagittal, by_id), fraction)
    return pd.DataFrame(rows)


def localise_studies(
    study_ids: list[int], cache: SeriesCache, series: pd.DataFrame, detectors: dict, fraction: float
) -> tuple[pd.DataFrame, list[dict]]:
    """Points of many studies (a progress bar over them) and their per-study reports."""
    from tqdm.auto import tqdm

    cached = cache.cached_keys()
    frames, reports = [], []
    for study_id in tqdm(study_ids, desc="localising studies", unit="study", leave=False):
        located = localise_study(int(study_id), study_series(cache, series, int(study_id), cached), detectors,
                                 fraction)  # fmt: skip
        frames.append(located.points)
        reports.append(located.to_json())
    return pd.concat(frames, ignore_index=True), reports


def run_localize(cfg: Config) -> LocalizeResult:
    """Train (or reuse) the detectors and evaluate them on the validation fold (see the module docstring)."""
    from lumbar_ray.data.crops import points_from_coordinates
    from lumbar_ray.data.preprocess import cache_settings
    from lumbar_ray.data.rsna import encode_labels, load_rsna
    from lumbar_ray.data.splits import make_folds
    from lumbar_ray.localize.detector import fit_detectors
    from lumbar_ray.tracking import Tracker

    folder = detector_dir_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    data = load_rsna(data_root_for(cfg))
    if data.coordinates is None or data.train is None:
        raise FileNotFoundError(f"{data_root_for(cfg)} has no train.csv or train_label_coordinates.csv")
    cache = SeriesCache(cache_root_for(cfg), cache_settings(cfg.preprocess))
    if cache.read_manifest().empty:
        raise FileNotFoundError(f"cache {cache.path} is empty: run `lumbar-ray preprocess` first")
    points = points_from_coordinates(data.coordinates, cache, data.train_series).points
    study_ids, labels = encode_labels(data.train)
    folds = make_folds(study_ids, labels, cfg.cv.n_folds, cfg.cv.seed)
    if cfg.localize.val_fold >= cfg.cv.n_folds:
        raise ValueError(f"localize.val_fold {cfg.localize.val_fold} is not a fold of cv.n_folds={cfg.cv.n_folds}")
    folds.to_csv(folder / "folds.csv", index=False)

    tracker = Tracker(cfg)
    parent = tracker.parent_run(localize_key(cfg), kind="localize")
    weights = fit_detectors(points, cache, folds, cfg.localize, folder, tracker.uri, parent)
    if (folder / SUMMARY_NAME).is_file() and (folder / VAL_POINTS_NAME).is_file():
        logger.info("localisation of %s already evaluated: reusing %s", folder.name, folder / SUMMARY_NAME)
        result = LocalizeResult(folder, weights, pd.read_csv(folder / SUMMARY_NAME),
                                pd.read_csv(folder / AXIAL_SUMMARY_NAME), pd.read_parquet(folder / VAL_POINTS_NAME),
                                parent)  # fmt: skip
        tracker.finish(parent)
        return result

    val_ids = sorted(int(s) for s in folds.loc[folds["fold"] == cfg.localize.val_fold, "study_id"])
    detectors = load_detectors(weights, cfg.localize)
    fraction = cfg.localize.subarticular_fraction
    predicted, reports = localise_studies(val_ids, cache, data.train_series, detectors, fraction)
    truth = points[points["study_id"].isin(val_ids)]
    series_of = _series_reader(cache)
    summary = summarise_errors(point_errors(predicted, truth, series_of))
    from_labels = axial_from_labels(truth, data.train_series, cache, fraction)
    axial_truth = truth[truth["series_id"].isin(data.train_series.loc[data.train_series["series_description"] == AXIAL,
                                                                      "series_id"])]  # fmt: skip
    axial_summary = summarise_errors(point_errors(from_labels, axial_truth, series_of))

    _log_localisation(tracker, parent, summary, axial_summary, reports, predicted, truth, cache)
    predicted.to_parquet(folder / VAL_POINTS_NAME, index=False)
    axial_summary.to_csv(folder / AXIAL_SUMMARY_NAME, index=False)
    summary.to_csv(folder / SUMMARY_NAME, index=False)  # last: the evaluation's commit marker
    tracker.finish(parent)
    result = LocalizeResult(folder, weights, summary, axial_summary, predicted, parent)
    logger.info("%s", result.format())
    return result


def _log_localisation(
    tracker: Any,
    parent: str,
    summary: pd.DataFrame,
    axial_summary: pd.DataFrame,
    reports: list[dict],
    predicted: pd.DataFrame,
    truth: pd.DataFrame,
    cache: SeriesCache,
) -> None:
    """Metrics, tables, per-study reports and overlay figures of the evaluation, on the ``localize`` run."""
    from lumbar_ray import plots
    from lumbar_ray.tracking import log_values

    values = summary_metrics(summary) | summary_metrics(axial_summary, prefix="axial_from_labels")
    log_values(tracker.client, parent, values)
    tracker.client.log_text(parent, summary.to_csv(index=False), "localisation/summary.csv")
    tracker.client.log_text(parent, axial_summary.to_csv(index=False), "localisation/axial_from_labels.csv")
    tracker.client.log_text(parent, json.dumps(reports, indent=1), "localisation/val_studies.json")
    for study_id in sorted(predicted["study_id"].unique())[:OVERLAY_STUDIES]:
        figure = plots.localisation_overlay(
            int(study_id), predicted[predicted["study_id"] == study_id], truth[truth["study_id"] == study_id], cache
        )
        tracker.client.log_figure(parent, figure, f"localisation/overlay_{study_id}.png")
