"""Fixtures of the training tests: the config of a CV small enough to train in seconds on 2 CPU cores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lumbar_ray.config import Config


def make_small_config(workdir: Path, **train) -> Config:
    """24 studies, 2 folds, the tiny model on 16 px crops of 3 slices, 2 DDP workers; ``train`` overrides."""
    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": 24, "test_studies": 1, "image_sizes": [96], "seed": 3},
        "preprocess": {"image_size": 96, "workers": 1},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "train": {"epochs": 2, "batch_size": 4, "num_workers": 2, "warmup_epochs": 0.5} | train,
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "model_name": "test_ensemble"},
    })  # fmt: skip


@pytest.fixture(scope="session")
def small_config() -> Callable[..., Config]:
    """The factory :func:`make_small_config`."""
    return make_small_config
