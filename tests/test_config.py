"""Typed config: defaults, YAML, overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumbar_ray.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_quickstart():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.root is None and cfg.synth.train_studies > 0


def test_yaml_then_overrides_with_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  train_studies: 10\n  image_sizes: [96]\ncv:\n  n_folds: 3\n")
    cfg = load_config(path, ["synth.train_studies=12", "cv.seed=5", "data.root=/data/rsna"])
    assert cfg.synth.train_studies == 12 and cfg.synth.image_sizes == [96]
    assert cfg.cv.n_folds == 3 and cfg.cv.seed == 5 and cfg.data.root == "/data/rsna"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["synth.train_studeis=3"], "synth.train_studeis"),
        (["nope=1"], "nope"),
        (["cv.folds.x=1"], "cv.folds"),
    ],
)
def test_unknown_override_key_is_named(overrides, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}"):
        load_config(None, overrides)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("synth:\n  studies: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'synth.studies'"):
        load_config(path)


def test_wrong_type_and_malformed_override_are_errors():
    with pytest.raises(ConfigError, match="synth.train_studies"):
        load_config(None, ["synth.train_studies=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["synth.train_studies"])


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["synth.seed=9", "workdir=w"])
    assert load_config(save_config(cfg, tmp_path / "resolved.yaml")) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_quickstart_yaml_spells_out_the_embedded_defaults():
    # The file documents the defaults: a default changed in code but not in the file (or back) is caught here.
    assert load_config(REPO / "configs" / "quickstart.yaml") == Config()


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    # Ray workers run in other working directories: a relative workdir or cache broke the README's quickstart there.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["workdir=rel", "preprocess.cache=rel/cache"])
    assert cfg.workdir == str(tmp_path / "rel") and cfg.preprocess.cache == str(tmp_path / "rel" / "cache")
    assert Config().workdir == str(tmp_path / "lumbar_ray_work")
    assert load_config(None, ["preprocess.cache=s3://bucket/cache"]).preprocess.cache == "s3://bucket/cache"
    assert load_config(None, ["train.node_cache=rel/node"]).train.node_cache == str(tmp_path / "rel" / "node")
    with pytest.raises(ConfigError, match="train.node_cache must be a local folder"):
        load_config(None, ["train.node_cache=s3://bucket/node"])


def test_the_aux_slice_loss_needs_an_attention_pool():
    with pytest.raises(ConfigError, match=r"loss.aux_slice_weight > 0 .* model.pool 'mean' has none"):
        load_config(None, ["loss.aux_slice_weight=0.5", "model.pool=mean"])
    with pytest.raises(ConfigError, match="loss.aux_slice_weight"):
        load_config(None, ["loss.aux_slice_weight=-1"])
    assert load_config(None, ["loss.aux_slice_weight=0.5", "model.pool=lstm"]).loss.aux_slice_weight == 0.5
    assert load_config(None, ["model.pool=mean", "loss.aux_slice_weight=0"]).model.pool == "mean"  # off: any pool


def test_a_width_with_pretrained_detector_weights_is_an_error():
    # Weights keep the width they were trained at: a width override could only be ignored or drop the weights.
    with pytest.raises(ConfigError, match=r"localize.width.*set localize.width: null"):
        load_config(None, ["localize.model=yolov8s.pt"])
    cfg = load_config(None, ["localize.model=yolov8s.pt", "localize.width=null"])
    assert cfg.localize.from_weights and cfg.localize.width is None
    assert not load_config().localize.from_weights  # the quickstart's yaml, rescaled by its width


def test_segment_settings_are_checked_where_they_are_set():
    from lumbar_ray.config import SegmentConfig

    assert SegmentConfig().unet_strides == (2, 2) and SegmentConfig(channels=(4, 8, 16, 32)).unet_strides == (2, 2, 2)
    with pytest.raises(ConfigError, match="segment.in_slices must be odd"):
        load_config(overrides=["segment.in_slices=4"])
    with pytest.raises(ConfigError, match="needs 2 values"):
        load_config(overrides=["segment.strides=[2]"])
    with pytest.raises(ConfigError, match="not divisible by the U-Net's total downsampling 8"):
        load_config(overrides=["segment.channels=[4,8,16,32]", "segment.image_size=60"])
    with pytest.raises(ConfigError, match="segment.source"):
        load_config(overrides=["segment.source=nnunet"])
