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
    """``shared/`` beside the checkout (CI has it); without it the tests on the real labels skip, saying why."""
    path = _shared_dir()
    if not (path / "rsna" / "train.csv").is_file():
        pytest.skip(f"real RSNA label files not found under {path} (set LUMBAR_RAY_SHARED)")
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
def hard_config(synthetic_config):
    """The fixture dataset's settings with the hard preset (reader noise, varied anatomy and acquisition)."""
    return synthetic_config.model_copy(update={"preset": "hard", "train_studies": 30, "seed": 8})


@pytest.fixture(scope="session")
def hard_dir(tmp_path_factory, hard_config) -> Path:
    """A hard-preset RSNA-format dataset written once per test session (read-only for tests)."""
    from lumbar_ray.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic_hard") / "rsna", hard_config).root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every in-process Ray test of the session.

    Its dashboard runs on a free loopback port: Ray's state API (``ray.util.state``), with which a fault test finds
    the workers it kills, is served there.
    """
    import ray

    from tests.net import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), log_to_driver=False, configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_env(ray_local) -> dict[str, str]:
    """The environment of a CLI subprocess that joins the session's Ray instead of starting its own: a new local
    Ray takes 20-40 s on 2 cores, joining one takes seconds. (Tests of a crashed driver keep their own Ray.)"""
    return os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def trained_pipeline(ray_local, tmp_path_factory):
    """``run_quickstart`` without tuning on :func:`tests.pipeline.pipeline_config`: synth -> preprocess ->
    localise -> CV -> register -> predict the test studies. Shared by the inference, registry-server and job tests."""
    from lumbar_ray.pipeline import run_quickstart
    from tests.pipeline import pipeline_config

    cfg = pipeline_config(tmp_path_factory.mktemp("pipeline"))
    return cfg, run_quickstart(cfg, tune=False)


@pytest.fixture(scope="session")
def segmented_pipeline(trained_pipeline):
    """The pipeline's data localised by a U-Net: ``lumbar-ray segment`` on its masks (one TorchTrainer fit), then
    ``lumbar-ray localize`` with ``localize.method=unet`` on the same held-out fold as the YOLO detectors; the
    config, the segmentation result and the localisation result."""
    from lumbar_ray.pipeline import localize, segment
    from tests.pipeline import unet_config

    cfg = unet_config(trained_pipeline[0])
    return cfg, segment(cfg), localize(cfg)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's server mode, in a thread of the test process) on a free loopback port:
    a :class:`tests.net.S3Server` whose ``upload`` puts a folder in a bucket and returns its ``s3://`` URI."""
    from moto.server import ThreadedMotoServer

    from tests.net import S3Server, free_port

    server = S3Server("127.0.0.1", free_port())
    moto = ThreadedMotoServer(ip_address=server.host, port=server.port, verbose=False)
    moto.start()
    yield server
    moto.stop()


RAY_FIXTURES = frozenset({"ray_local", "ray_env", "trained_pipeline"})


def pytest_collection_modifyitems(config, items):
    """Markers applied consistently: a test that uses the session's Ray must be marked ``ray`` (the unit tier,
    ``-m "not ray and not slow"``, leaves it out); a ``gpu`` test skips, saying so, where there is no CUDA device."""
    uses_ray = [item for item in items if RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    unmarked = [item.nodeid for item in uses_ray if not item.get_closest_marker("ray")]
    if unmarked:
        raise pytest.UsageError(f"tests using Ray without the 'ray' marker: {unmarked}")
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA device; none here")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)
