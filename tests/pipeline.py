"""The CI-sized pipeline: its config and the figures its end-to-end tests assert on.

One definition shared by the ``trained_pipeline`` fixture (``tests/conftest.py``) and by
``benchmarks/pipeline_spread.py``, which runs it several times (thread counts, seeds) to measure the run-to-run
spread of every figure a test asserts on; the thresholds in ``tests/test_predict.py`` sit outside that spread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pipeline_config(workdir: Path, seed_offset: int = 0):
    """The whole pipeline small enough for CI: 60 studies with a strong planted signal (and their anatomy masks),
    96 px cache, 2 folds, the tiny classifier on 1 worker, tiny YOLO detectors, no tuning.

    Args:
        workdir: where everything goes.
        seed_offset: added to the training and detector seeds (the data and folds stay the same): a stand-in
            for another machine's floating-point path when measuring the spread.
    """
    from lumbar_ray.config import Config

    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": 60, "test_studies": 3, "image_sizes": [96, 112], "seed": 11,
                  "signal_strength": 2.0, "noise": 0.03, "missing_series_rate": 0.08, "masks": True},
        "preprocess": {"image_size": 96, "workers": 1},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "train": {"epochs": 15, "batch_size": 4, "lr": 0.004, "num_workers": 1, "warmup_epochs": 0.5,
                  "seed": seed_offset},
        # Boxes of 0.15 x 96 = 14 px: at the default 0.08 (8 px, one stride of YOLO's finest grid) the assigner
        # finds almost no anchor inside a box, the detector learns next to nothing (T1 mAP50 0.14 after 30 epochs)
        # and what it learns hangs on floating-point noise; at 0.15 the same training reaches mAP50 0.80, equal
        # with 1 and 2 threads.
        "localize": {"imgsz": 96, "epochs": 30, "batch": 4, "num_cpus": 1.0, "seed": seed_offset,
                     "box_fraction": 0.15},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "model_name": "pipeline_ensemble"},
    })  # fmt: skip


def unet_config(cfg):
    """The pipeline's config with the segmentation localiser: ``localize.method=unet``, the U-Net of ``lumbar-ray
    segment`` trained on the masks written with the data (``synth.masks``)."""
    return cfg.model_copy(update={"localize": cfg.localize.model_copy(update={"method": "unet"})})


def pipeline_figures(result: Any) -> dict[str, float]:
    """Every figure of a pipeline run that an end-to-end test asserts on.

    Args:
        result: the :class:`~lumbar_ray.pipeline.QuickstartResult` of :func:`pipeline_config`.
    """
    summary = result.localize.summary.set_index(["series_type", "level"])
    from_labels = result.localize.axial_from_labels.set_index(["series_type", "level"])
    check = result.points_check
    figures = {
        "t2_within_10px": summary.loc[("Sagittal T2/STIR", "all"), "within_10px"],
        "t2_slice_within_1": summary.loc[("Sagittal T2/STIR", "all"), "slice_within_1"],
        "t1_within_10px": summary.loc[("Sagittal T1", "all"), "within_10px"],
        "t1_slice_within_1": summary.loc[("Sagittal T1", "all"), "slice_within_1"],
        "axial_slice_within_1": summary.loc[("Axial T2", "all"), "slice_within_1"],
        "axial_from_labels_slice": from_labels.loc[("Axial T2", "all"), "slice_accuracy"],
        "test_prior_targets": json.loads(Path(result.prediction.report_path).read_text())["prior_targets"],
        "cv_score": result.cv.score.total,
        "cv_prior": result.cv.baseline.total,
        "held_out_predicted": check.predicted_points.total,
        "held_out_labelled": check.labelled_points.total,
        "held_out_prior": check.prior.total,
    }
    return {name: float(value) for name, value in figures.items()}
