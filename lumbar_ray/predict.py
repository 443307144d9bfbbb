"""Inference: a registered fold ensemble -> a competition submission for a folder of studies, on Ray Data.

``lumbar-ray predict --model models:/<name>@<alias> --data DIR --out submission.csv`` (``--data`` may be a URI such as
``s3://bucket/rsna``: the CSVs are read from there and each series is downloaded by the worker that caches it):

1. :func:`plan_prediction` reads the model's data contract from its MLmodel metadata (no weights downloaded on
   the driver) and lists the studies; the caller (the pipeline, the CLI) caches their series with the *same*
   preprocessing settings the model was trained on (:attr:`PredictionPlan.preprocess`);
2. :func:`run_predict` runs a Ray Data ``map_batches`` over the studies with an actor class,
   :class:`StudyPredictor`, that loads the ensemble and its level detectors once per actor (a GPU each when
   asked), places every study's 25 points (:func:`lumbar_ray.localize.study.localise_study`), cuts the crops
   with the training crop code (:class:`lumbar_ray.data.crops.CropDataset`), once per crop geometry of the
   model's members (a member trained with ``crop.second_view`` gets its 50 crops: the contract's crop says so, and
   the second views derive from the same predicted points), and predicts;
3. writes the submission (25 rows per study, rows sum to 1, checked with the metric module's validator), a JSON per
   study with the points used, a report listing studies with missing series or unplaced targets, and the resolved
   config beside them.

A study missing a series still gets all 25 rows: targets of the series it has come from the model, the others
from the training prior carried in the contract (with the model's temperatures, as in the out-of-fold
predictions they were fitted on). Nothing is dropped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import Config, LocalizeConfig, PreprocessConfig, cache_settings, save_config
from lumbar_ray.constants import SEVERITIES, TARGETS
from lumbar_ray.data.cache import SeriesCache, join_location
from lumbar_ray.data.rsna import RsnaData, load_rsna
from lumbar_ray.errors import UnknownStudyError
from lumbar_ray.inference.study import StudyInput, StudyScorer, preprocess_settings
from lumbar_ray.localize.locators import load_locators
from lumbar_ray.metrics import labels_to_submission, validate_submission
from lumbar_ray.paths import (
    RESOLVED_CONFIG,
    atomic_path,
    cache_root_for,
    data_root_for,
    submission_path_for,
    tracking_uri_for,
)
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.registry import load_ensemble, read_contract

logger = logging.getLogger(__name__)

REPORT_NAME = "predict_report.json"
POINTS_FOLDER = "points"


class StudyPredictor:
    """Ray Data actor: the ensemble and its detectors loaded once; a batch of study ids in, predictions out.

    The scoring itself is the study pipeline the registered model and ``lumbar-ray serve`` run
    (:class:`lumbar_ray.inference.study.StudyScorer`), here over the cache of a batch run.

    Args:
        model_uri: MLflow model URI of the ensemble.
        tracking_uri: the store holding it.
        cache_root: preprocessing cache root.
        cache_settings: its settings (the contract's).
        series: ``study_id, series_id, series_description`` records of the studies to predict.
        fold: one fold's model only; None = the mean over folds.
        settings_dir: ultralytics' private settings folder; None = the actor's node's own (a folder of the
            driver's may not exist where the actor runs).
    """

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str,
        cache_root: str,
        cache_settings: dict[str, Any],
        series: list[dict[str, Any]],
        fold: int | None = None,
        settings_dir: str | None = None,
    ) -> None:
        self.ensemble = load_ensemble(model_uri, tracking_uri)
        contract = self.ensemble.contract
        localize = LocalizeConfig(**contract.get("localize", {}).get("config", {}))
        detectors = load_locators(self.ensemble.detector_paths, localize, settings_dir=settings_dir)
        if not detectors:
            logger.warning("%s carries no level detectors: every target falls back to the prior",
                           model_uri)  # fmt: skip
        self.scorer = StudyScorer(self.ensemble.model.unwrap_python_model(), detectors, localize)
        self.fold = fold
        self.cache = SeriesCache(cache_root, cache_settings)
        self.series = pd.DataFrame(series, columns=["study_id", "series_id", "series_description"])
        self.cached = self.cache.cached_keys()

    def predict_studies(self, study_ids: list[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """``(n, 25, 3)`` probabilities and one JSON-able report per study."""
        studies = [StudyInput(int(study_id), self.cache, self.series, self.cached) for study_id in study_ids]
        scored = self.scorer.score(studies, fold=self.fold)
        return np.stack([result.probs for result in scored]), [result.report() for result in scored]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        study_ids = [int(s) for s in batch["study_id"]]
        probs, reports = self.predict_studies(study_ids)
        return {
            "study_id": study_ids,
            "probs": [p.reshape(-1).tolist() for p in probs],
            "report": [json.dumps(r) for r in reports],
        }


@dataclass
class PredictResult:
    """What :func:`run_predict` wrote and found."""

    submission_path: Path
    points_dir: Path
    report_path: Path
    study_ids: list[int]
    missing_series: dict[int, list[str]] = field(default_factory=dict)
    prior_targets: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"submission: {self.submission_path} ({len(self.study_ids)} studies, "
                 f"{len(self.study_ids) * len(TARGETS)} rows) in {self.seconds:.1f} s"]  # fmt: skip
        lines.append(f"per-study points: {self.points_dir}/<study_id>.json; report: {self.report_path}")
        if self.missing_series:
            listed = ", ".join(f"{s} ({', '.join(m)})" for s, m in sorted(self.missing_series.items()))
            lines.append(f"studies with a missing series ({len(self.missing_series)}): {listed}")
        lines.append(f"targets predicted by the prior (no point or series): {self.prior_targets}")
        return "\n".join(lines)


def studies_to_predict(data: RsnaData, split: str, study_ids: list[int] | None) -> tuple[list[int], pd.DataFrame]:
    """The studies of a split (series listed, or named by ``sample_submission.csv``) and their series rows."""
    series = data.test_series if split == "test" else data.train_series
    series = series if series is not None else pd.DataFrame(columns=["study_id", "series_id", "series_description"])
    listed = set(series["study_id"].astype(int))
    if split == "test" and data.sample_submission is not None:  # a study may be named there with no series listed
        listed |= {int(row_id.split("_", 1)[0]) for row_id in data.sample_submission["row_id"]}
    if study_ids is not None:
        unknown = sorted(set(study_ids) - listed)
        if unknown:
            raise UnknownStudyError(f"studies {unknown} are not in the {split} split of the data")
        listed = set(study_ids)
    return sorted(listed), series[series["study_id"].astype(int).isin(listed)]


@dataclass
class PredictionPlan:
    """What a prediction run reads: the model's contract, the studies, and the cache their series must be in.

    Attributes:
        contract: the registered model's data contract.
        data_root: the RSNA-format folder, or its URI (``s3://bucket/rsna``).
        split: ``test`` or ``train``.
        study_ids: the studies to predict.
        series: their ``study_id, series_id, series_description`` rows.
        preprocess: the model's preprocessing settings with this run's resources: cache the series with these.
        cache_root: the cache root.
    """

    contract: dict[str, Any]
    data_root: Path | str
    split: str
    study_ids: list[int]
    series: pd.DataFrame
    preprocess: PreprocessConfig
    cache_root: str


def plan_prediction(cfg: Config) -> PredictionPlan:
    """Read the model's contract and list the studies of ``cfg.predict`` (see :class:`PredictionPlan`).

    Raises:
        lumbar_ray.registry.ModelNotFoundError: an unknown model, version or alias.
        ValueError: unknown study ids, or no study to predict.
    """
    options = cfg.predict
    root = join_location(options.data) if options.data else data_root_for(cfg)
    contract = read_contract(options.model, tracking_uri_for(cfg))
    study_ids, series = studies_to_predict(load_rsna(root), options.split, options.study_ids)
    if not study_ids:
        raise UnknownStudyError(f"{root} lists no {options.split} studies to predict")
    preprocess = preprocess_settings(contract, cfg.preprocess)
    return PredictionPlan(contract, root, options.split, study_ids, series, preprocess, cache_root_for(cfg))


def run_predict(cfg: Config, plan: PredictionPlan) -> PredictResult:
    """Predict the planned studies with the registered ensemble (see the module docstring); their series must be
    cached with ``plan.preprocess`` (a series not cached counts as missing: its targets get the prior)."""
    import ray

    start = time.perf_counter()
    options, out = cfg.predict, submission_path_for(cfg)
    save_config(cfg, out.parent / RESOLVED_CONFIG)  # what produced the submission, beside it
    ensure_ray()
    records = plan.series[["study_id", "series_id", "series_description"]].astype({"study_id": int, "series_id": int})
    dataset = ray.data.from_items([{"study_id": s} for s in plan.study_ids]).map_batches(
        StudyPredictor,
        fn_constructor_kwargs={
            "model_uri": options.model,
            "tracking_uri": tracking_uri_for(cfg),
            "cache_root": plan.cache_root,
            "cache_settings": cache_settings(plan.preprocess),
            "series": records.to_dict("records"),
            "fold": options.fold,
        },
        batch_size=options.batch_size,
        concurrency=options.actors,
        num_cpus=options.num_cpus,
        num_gpus=1 if options.use_gpu else 0,
    )
    rows = sorted(dataset.take_all(), key=lambda row: int(row["study_id"]))
    probs = np.array([row["probs"] for row in rows], dtype=np.float64).reshape(-1, len(TARGETS), len(SEVERITIES))
    predicted_ids = [int(row["study_id"]) for row in rows]
    submission = validate_submission(labels_to_submission(np.array(predicted_ids), probs), study_ids=plan.study_ids)
    result = _write_outputs(out, submission, rows, predicted_ids, options.model)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.format())
    return result


def _write_outputs(out: Path, submission: pd.DataFrame, rows: list[dict], study_ids: list[int], model: str):
    with atomic_path(out) as temporary:
        submission.to_csv(temporary, index=False)
    points_dir = out.parent / POINTS_FOLDER
    points_dir.mkdir(exist_ok=True)
    missing, prior_targets = {}, 0
    for row in rows:
        report = json.loads(row["report"])
        (points_dir / f"{report['study_id']}.json").write_text(json.dumps(report, indent=1))
        if report["missing_series"]:
            missing[int(report["study_id"])] = report["missing_series"]
        prior_targets += len(report["prior_targets"])
    report_path = out.parent / REPORT_NAME
    summary = {"model": model, "submission": str(out), "studies": len(study_ids), "missing_series": missing,
               "prior_targets": prior_targets}  # fmt: skip
    report_path.write_text(json.dumps(summary, indent=1))
    return PredictResult(out, points_dir, report_path, study_ids, missing, prior_targets)
