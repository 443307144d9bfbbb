"""Shared fixtures: the real RSNA label files from ``shared/`` and small synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    """The project's ``shared/`` folder: ``$LUMBAR_RAY_SHARED`` or the sibling of the repository."""
    return Path(os.environ.get("LUMBAR_RAY_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``shared/`` beside the checkout (CI always has it); a missing one is a failure, not a skip."""
    path = _shared_dir()
    if not (path / "rsna" / "train.csv").is_file():
        pytest.fail(f"real RSNA label files not found under {path}; set LUMBAR_RAY_SHARED")
    return path


@pytest.fixture(scope="session")
def real_rsna_dir(shared_dir: Path) -> Path:
    """Folder with the real competition CSVs (no images, no coordinates file)."""
    return shared_dir / "rsna"


@pytest.fixture(scope="session")
def synthetic_config():
    """A small synthetic dataset with every quirk at a rate that makes it appear."""
    from lumbar_ray.config import SynthConfig

    return SynthConfig(
        train_studies=40,
        test_studies=2,
        seed=7,
        image_sizes=[112, 128],
        missing_series_rate=0.1,
        extra_axial_rate=0.2,
        tilted_axial_rate=0.2,
        shuffled_instances_rate=0.2,
        empty_label_rate=0.05,
    )


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory, synthetic_config) -> Path:
    """An RSNA-format synthetic dataset written once per test session (read-only for tests)."""
    from lumbar_ray.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic") / "rsna", synthetic_config).root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every in-process Ray test of the session."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def pipeline_config(workdir: Path):
    """The whole pipeline small enough for CI: 60 studies with a strong planted signal, 96 px cache, 2 folds, the
    tiny classifier on 1 worker, tiny YOLO detectors, no tuning."""
    from lumbar_ray.config import Config

    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": 60, "test_studies": 3, "image_sizes": [96, 112], "seed": 11,
                  "signal_strength": 2.0, "noise": 0.03, "missing_series_rate": 0.08},
        "preprocess": {"image_size": 96, "workers": 1},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "train": {"epochs": 15, "batch_size": 4, "lr": 0.004, "num_workers": 1, "warmup_epochs": 0.5},
        "localize": {"imgsz": 96, "epochs": 30, "batch": 4, "num_cpus": 1.0},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "model_name": "pipeline_ensemble"},
    })  # fmt: skip


@pytest.fixture(scope="session")
def trained_pipeline(ray_local, tmp_path_factory):
    """``run_quickstart`` without tuning on :func:`pipeline_config`: synth -> preprocess -> localise -> CV ->
    register -> predict the test studies. Shared by the inference, registry-server and job tests."""
    from lumbar_ray.quickstart import run_quickstart

    cfg = pipeline_config(tmp_path_factory.mktemp("pipeline"))
    return cfg, run_quickstart(cfg, tune=False)
