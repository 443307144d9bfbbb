"""``configs/rsna-gpu.yaml``, the real run, end to end at tiny size on CPU without Ray: its model (the real backbone
and recipe; from scratch, since tests never download), one epoch of each of two folds by the plain-torch steps the
Ray worker runs, the CV finished and registered into a temporary SQLite MLflow, then pulled back by alias.

Only size and place are overridden (crop side, batch, device, folds, paths): a key the real config sets that no
tiny run can build, train or register fails here, not on the cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumbar_ray.config import load_config
from lumbar_ray.paths import tracking_uri_for
from lumbar_ray.registry import load_ensemble
from lumbar_ray.train.cv import assemble_oof
from lumbar_ray.train.register import register_cv
from tests.train.conftest import SMALL_FOLDS, finish_small_cv, predict_held_out, train_small_cv

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rsna-gpu.yaml"


def tiny_real_config(workdir: Path, data_root: Path, cache_root: str):
    """The real config, shrunk to a CPU test: 32 px crops (of the real slice count and channels), 2 studies a
    step, one process, no pretrained download, the small cache's folds and a local MLflow."""
    return load_config(CONFIG, [
        f"workdir={workdir}", f"data.root={data_root}", "preprocess.image_size=64", f"preprocess.cache={cache_root}",
        "cv.n_folds=2", "crop.size=32", "crop.region=24", "train.batch_size=2", "train.epochs=1",
        "train.num_workers=1", "train.use_gpu=false", "train.loader_workers=0", "train.storage=null",
        "model.pretrained=false", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
        "tracking.register_without_detectors=true",
    ])  # fmt: skip


@pytest.mark.slow
def test_the_real_config_builds_its_model_trains_a_step_and_registers(small_cache, synthetic_dir, tmp_path) -> None:
    real = load_config(CONFIG)
    cfg = tiny_real_config(tmp_path, synthetic_dir, small_cache.cache_root)
    recipe = (cfg.model.model_copy(update={"pretrained": True}), cfg.loss, cfg.augment)
    assert recipe == (real.model, real.loss, real.augment)  # the recipe itself is the real one

    outcomes = train_small_cv(cfg, small_cache)
    cv = finish_small_cv(cfg, outcomes, small_cache, synthetic_dir, "cv-real-config")
    registered = register_cv(cfg, cv)

    assert registered is not None and registered.version == 1
    loaded = load_ensemble(f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}", tracking_uri_for(cfg))
    member = loaded.contract["members"][0]
    assert member["model"]["arch"] == real.model.arch and member["model"]["in_chans"] == real.model.in_chans
    assert {name: (crop.size, crop.slices) for name, crop in loaded.inputs.items()} == {"crops": (32, real.crop.slices)}
    model_oof = loaded.calibration.apply([assemble_oof(small_cache.study_ids, outcomes)])  # its temperatures, if any
    assert np.isfinite(model_oof).all() and np.allclose(model_oof.sum(-1), 1)
    for fold in (0, 1):
        np.testing.assert_allclose(predict_held_out(loaded, small_cache, fold), model_oof[np.equal(SMALL_FOLDS, fold)],
                                   atol=1e-5)  # fmt: skip
