"""configs/rsna-gpu.yaml, the real run: every model it trains starts from pretrained weights that timm and
ultralytics know, checked without a download (a name without weights trains from scratch with a mere warning); its
tuning leaves the class weights at the metric's."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumbar_ray.config import Config, load_config
from lumbar_ray.localize import detector as det
from lumbar_ray.models import ARCHITECTURES
from lumbar_ray.models.encoders import has_pretrained_weights
from lumbar_ray.tune.space import miscalibrating_keys

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rsna-gpu.yaml"


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(CONFIG)


def _searched(cfg: Config, key: str) -> list:
    """The values the tune space tries for ``key`` (none if it is not searched)."""
    dim = cfg.tune.space.get(key)
    return list(dim.values or []) if dim else []


def _encoders(cfg: Config) -> dict[str, str]:
    """Every encoder a run or a trial of ``cfg`` can build, by where it is named: an architecture stands for its
    encoder (an unknown one for itself, which has no weights)."""
    archs = {"model.arch": cfg.model.arch} | {f"tune.space model.arch {a}": a for a in _searched(cfg, "model.arch")}
    encoders = {f"tune.space model.encoder {e}": e for e in _searched(cfg, "model.encoder")}
    if cfg.model.encoder:
        encoders["model.encoder"] = cfg.model.encoder
    resolved = {where: ARCHITECTURES[a].encoder if a in ARCHITECTURES else a for where, a in archs.items()}
    return resolved | encoders


def test_it_asks_for_pretrained_weights(cfg):
    assert cfg.model.pretrained
    assert cfg.localize.from_weights and cfg.localize.width is None


def test_every_encoder_it_can_train_has_pretrained_timm_weights(cfg):
    without = {where: name for where, name in _encoders(cfg).items() if not has_pretrained_weights(name)}
    assert without == {}


def test_its_detector_weights_are_an_ultralytics_asset_or_a_local_file(cfg, tmp_path_factory):
    det._ultralytics(tmp_path_factory.mktemp("ultralytics"))  # importing ultralytics writes its settings: private
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    weights = cfg.localize.model
    assert weights in GITHUB_ASSETS_NAMES or Path(weights).is_file(), f"{weights!r}: ultralytics cannot fetch it"


def test_its_tuning_space_leaves_the_class_weights_at_the_metrics(cfg):
    """With the metric's 1/2/4 in the loss the optimum already matches the metric; any other weights miscalibrate
    on real data (docs/recipe-evidence.md), so the real search tunes the sound loss terms instead."""
    assert cfg.loss.class_weights == (1.0, 2.0, 4.0)
    assert miscalibrating_keys(cfg.tune.space) == []
    assert {"loss.any_severe_weight", "loss.aux_slice_weight"} <= set(cfg.tune.space)
    assert {"augment.jitter_px", "augment.rotate_deg", "augment.brightness"} <= set(cfg.tune.space)
    assert cfg.model.pool in ("attention", "lstm")  # every searched architecture has the attention the term trains
