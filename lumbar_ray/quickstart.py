"""The quickstart: the whole pipeline on built-in synthetic data, on one machine, with embedded defaults.

It synthesises a small RSNA-format dataset, validates it, reports on it, scores the prior baseline,
preprocesses every series into the cache with Ray Data, trains the sagittal YOLO level detectors (built from
their yaml, no download) and measures localisation on a held-out fold, trains the k-fold CV on Ray Train (the
tiny model on CPU workers), scores it out of fold against the prior, logs everything to MLflow (a SQLite file in
the workdir), registers the fold ensemble with its detectors, runs a short Ray Tune + Optuna search (``tune.*``:
2 trials on fold 0) and finally pulls the model back by alias to predict the synthetic test studies into a
competition-format submission.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lumbar_ray.baseline import BaselineResult, run_baseline
from lumbar_ray.config import Config, cache_root_for, data_root_for, save_config
from lumbar_ray.data.preprocess import PreprocessSummary, run_preprocess
from lumbar_ray.data.rsna import DataReport, build_report, load_rsna
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.localize.stage import LocalizeResult, run_localize
from lumbar_ray.predict import PointsComparison, PredictResult, compare_points_on_fold, run_predict
from lumbar_ray.train.cv import CVResult, run_cv
from lumbar_ray.tune.run import TuneResult, experiment_exists, run_tune

logger = logging.getLogger(__name__)


@dataclass
class QuickstartResult:
    """Where the quickstart put things and what it measured."""

    workdir: Path
    data_root: Path
    report: DataReport
    baseline: BaselineResult
    preprocess: PreprocessSummary
    localize: LocalizeResult
    cv: CVResult
    prediction: PredictResult
    tracking_uri: str
    points_check: PointsComparison | None = None
    tuning: TuneResult | None = None


def run_quickstart(config: Config, tune: bool = True) -> QuickstartResult:
    """Synthesise (or reuse) the dataset, validate and report it, score the prior, preprocess, localise, train,
    register, tune and predict the test studies with the model pulled back by its alias."""
    from lumbar_ray.tracking import resolve_tracking_uri

    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir / "resolved_config.yaml")
    root = data_root_for(config)
    if config.data.root is None:
        write_dataset(root, config.synth, overwrite=True)
    data = load_rsna(root)
    report = build_report(data, check_images=True)
    (workdir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    baseline = run_baseline(root, n_folds=config.cv.n_folds, seed=config.cv.seed, out_csv=workdir / "baseline_oof.csv")
    preprocessed = run_preprocess(root, cache_root_for(config), config.preprocess)
    localized = run_localize(config)  # resumable: trained detectors and a written evaluation are reused
    cv = run_cv(config)  # resumable: a rerun skips the folds already trained
    # The detectors never saw localize.val_fold: its studies show what predicted points cost against labelled ones.
    points_check = compare_points_on_fold(config, cv, config.localize.val_fold) if cv.registered else None
    tuning = run_tune(config, resume=experiment_exists(config)) if tune else None  # a rerun resumes (or just reads)
    model_uri = f"models:/{config.tracking.model_name}@{config.tracking.alias}"
    predict_cfg = config.model_copy(update={"predict": config.predict.model_copy(update={"model": model_uri})})
    prediction = run_predict(predict_cfg)
    logger.info("quickstart finished in %s", workdir)
    uri = resolve_tracking_uri(config)
    return QuickstartResult(
        workdir, root, report, baseline, preprocessed, localized, cv, prediction, uri, points_check, tuning
    )
