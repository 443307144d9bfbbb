"""Where outputs live: the storage-root rule, settings-derived ids, the tracking URI, atomic writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from lumbar_ray.config import Config
from lumbar_ray.paths import (
    atomic_path,
    cache_root_for,
    cv_run_id,
    data_root_for,
    localize_key,
    ray_storage_for,
    segment_key,
    ship_if_local,
    tracking_uri_for,
    tune_storage_for,
    unet_weights_for,
)


def test_tracking_uri_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(workdir=str(tmp_path / "new" / "work"))
    uri = tracking_uri_for(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'new' / 'work').resolve()}/mlflow.db"
    assert (tmp_path / "new" / "work").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri_for(cfg) == "http://127.0.0.1:5000"
    cfg.tracking.tracking_uri = "sqlite:///x.db"
    assert tracking_uri_for(cfg) == "sqlite:///x.db"


def test_shared_storage_root_and_explicit_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LUMBAR_RAY_STORAGE", raising=False)
    cfg = Config(workdir=str(tmp_path))
    assert cache_root_for(cfg) == str(tmp_path / "cache")
    assert ray_storage_for(cfg) == str(tmp_path / "ray_results")
    assert tune_storage_for(cfg) == str(tmp_path / "ray_tune")
    monkeypatch.setenv("LUMBAR_RAY_STORAGE", "s3://bucket/lumbar/")
    assert cache_root_for(cfg) == "s3://bucket/lumbar/cache"
    assert ray_storage_for(cfg) == "s3://bucket/lumbar/ray_results"
    assert tune_storage_for(cfg) == "s3://bucket/lumbar/ray_tune"
    explicit = Config.model_validate({"workdir": str(tmp_path), "preprocess": {"cache": "s3://other/c"},
                                      "train": {"storage": "/mnt/ckpt"}})  # fmt: skip
    assert cache_root_for(explicit) == "s3://other/c" and ray_storage_for(explicit) == "/mnt/ckpt"


def test_run_ids_hash_what_is_learnt_not_the_resources(tmp_path: Path) -> None:
    base = Config(workdir=str(tmp_path / "a"))
    elsewhere = Config.model_validate({"workdir": str(tmp_path / "b"),
                                       "train": {"num_workers": 4, "node_cache": str(tmp_path / "node")},
                                       "localize": {"num_cpus": 8.0}})  # fmt: skip
    assert cv_run_id(base) == cv_run_id(elsewhere) and cv_run_id(base).startswith("cv-")
    assert localize_key(base) == localize_key(elsewhere) and localize_key(base).startswith("loc-")
    other = Config.model_validate({"workdir": str(tmp_path / "a"), "train": {"lr": 0.01}})
    assert cv_run_id(other) != cv_run_id(base)
    assert localize_key(other) == localize_key(base)  # the detectors do not depend on the classifier
    named = Config.model_validate({"workdir": str(tmp_path), "train": {"run_id": "mine"}})
    assert cv_run_id(named) == "mine"


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "done.txt"
    with atomic_path(target) as temporary:
        temporary.write_text("whole")
        assert not target.exists()
    assert target.read_text() == "whole"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("partial")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "whole" and list(target.parent.iterdir()) == [target]


ISSUE_8_RECIPE = {"model": {"tta_flip": False}, "loss": {"aux_slice_weight": 0.0},
                  "augment": {"jitter_measured": False}, "calibrate": {"temperature": False}}  # fmt: skip
"""The defaults before issue 13 made the measured recipe the default: the settings of the golden ids."""


def issue_8(workdir: Path, **sections: dict) -> Config:
    """The config of the issue-8 defaults in ``workdir``, with ``sections`` set on top of them."""
    tree = {name: dict(values) for name, values in ISSUE_8_RECIPE.items()}
    for name, values in sections.items():
        tree[name] = tree.get(name, {}) | values
    return Config.model_validate({"workdir": str(workdir), **tree})


def test_ids_of_the_default_config_are_those_existing_workdirs_hold(tmp_path: Path) -> None:
    """Golden values (computed by the code before the layered redesign, 61141a8): a workdir, a cache or a tuning
    run made then is found again, so its folds, detectors and cache entries are reused, not redone. The recipe
    defaults of issue 13 train another model, so the default CV is a new run; the old settings keep their id."""
    from lumbar_ray.config import cache_settings
    from lumbar_ray.data.cache import cache_key

    cfg = Config(workdir=str(tmp_path))
    assert cv_run_id(issue_8(tmp_path)) == "cv-a45d0f059f"
    assert cv_run_id(cfg) == "cv-6e7ef393c5"  # issue 13's defaults (the jitter before it is measured)
    assert localize_key(cfg) == "loc-169c20482517"
    assert cache_key(cache_settings(cfg.preprocess)) == "pp-b617c510463a"


def test_the_hard_preset_and_real_data_get_their_own_folder_and_ids(tmp_path: Path) -> None:
    """A workdir shared by both presets never mixes their data, detectors or CVs (the easy ids stay the golden ones)."""
    easy = Config(workdir=str(tmp_path))
    hard = easy.model_copy(update={"synth": easy.synth.model_copy(update={"preset": "hard"})})
    real = easy.model_copy(update={"data": easy.data.model_copy(update={"root": str(tmp_path / "rsna")})})
    assert data_root_for(easy) == tmp_path / "data" / "synthetic"
    assert data_root_for(hard) == tmp_path / "data" / "synthetic-hard"
    assert data_root_for(real) == tmp_path / "rsna"
    assert len({cv_run_id(easy), cv_run_id(hard), cv_run_id(real)}) == 3
    assert len({localize_key(easy), localize_key(hard), localize_key(real)}) == 3
    in_mm = easy.model_copy(update={"localize": easy.localize.model_copy(update={"box_mm": 18.0})})
    assert localize_key(in_mm) != localize_key(easy) and cv_run_id(in_mm) != cv_run_id(easy)
    aux = easy.model_copy(update={"loss": easy.loss.model_copy(update={"aux_slice_weight": 0.0})})
    assert cv_run_id(aux) != cv_run_id(easy) and localize_key(aux) == localize_key(easy)


def test_ema_and_flip_tta_keep_the_ids_at_their_defaults_and_get_their_own_when_on(tmp_path: Path) -> None:
    base = issue_8(tmp_path)
    explicit = issue_8(tmp_path, train={"ema_decay": 0.0}, model={"tta_flip": False})
    assert cv_run_id(explicit) == cv_run_id(base) == "cv-a45d0f059f"  # the golden id above
    ema = issue_8(tmp_path, train={"ema_decay": 0.99})
    tta = issue_8(tmp_path, model={"tta_flip": True})
    assert len({cv_run_id(base), cv_run_id(ema), cv_run_id(tta)}) == 3  # they change what the CV predicts
    assert localize_key(ema) == localize_key(tta) == localize_key(base)


def test_crops_in_mm_second_views_and_per_series_jitter_keep_the_ids_at_their_defaults_and_get_their_own_when_set(
    tmp_path,
):
    base = issue_8(tmp_path)
    explicit = issue_8(tmp_path, crop={"region_mm": None, "second_view": False},
                       augment={"jitter_px_by_series": None, "jitter_slices_by_series": None})  # fmt: skip
    assert cv_run_id(explicit) == cv_run_id(base) == "cv-a45d0f059f"  # the golden id above
    in_mm = issue_8(tmp_path, crop={"region_mm": 40.0})
    two_views = issue_8(tmp_path, crop={"second_view": True})
    px = issue_8(tmp_path, augment={"jitter_px_by_series": {"Axial T2": 3.0}})
    slices = issue_8(tmp_path, augment={"jitter_slices_by_series": {"Axial T2": 0}})
    changed = (in_mm, two_views, px, slices)
    assert len({cv_run_id(base), *(cv_run_id(cfg) for cfg in changed)}) == 5
    assert {localize_key(cfg) for cfg in changed} == {localize_key(base)}


def test_calibration_keeps_the_ids_and_an_ensemble_id_names_its_members(tmp_path: Path) -> None:
    from lumbar_ray.paths import ensemble_id

    base = issue_8(tmp_path)
    explicit = issue_8(tmp_path, calibrate={"temperature": False})
    assert cv_run_id(explicit) == cv_run_id(base) == "cv-a45d0f059f"  # the golden id above
    calibrated = issue_8(tmp_path, calibrate={"temperature": True})
    # its own run (and registered version); `lumbar-ray ensemble --cv <id>` calibrates a trained CV without retraining
    assert cv_run_id(calibrated) != cv_run_id(base) and localize_key(calibrated) == localize_key(base)
    ids = {ensemble_id(base, ["cv-a", "cv-b"]), ensemble_id(base, ["cv-b", "cv-a"]),
           ensemble_id(calibrated, ["cv-a", "cv-b"]), ensemble_id(base, ["cv-a"])}  # fmt: skip
    assert len(ids) == 4 and all(name.startswith("ens-") for name in ids)
    assert ensemble_id(base, ["cv-a", "cv-b"]) == ensemble_id(issue_8(tmp_path / "other"), ["cv-a", "cv-b"])


def test_predicted_points_are_hashed_by_their_contents_not_their_path(tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    def with_points(path: Path) -> Config:
        return Config.model_validate({"workdir": str(tmp_path), "cv": {"predicted_points": str(path)}})

    points = pd.DataFrame({"study_id": [1], "target": [0], "series_id": [2], "slice": [3], "x": [4.0], "y": [5.0]})
    (tmp_path / "a").mkdir()
    points.to_parquet(tmp_path / "a" / "points.parquet", index=False)
    points.to_parquet(tmp_path / "copy.parquet", index=False)
    same = {
        cv_run_id(with_points(tmp_path / "a" / "points.parquet")),
        cv_run_id(with_points(tmp_path / "copy.parquet")),
    }
    assert len(same) == 1 and same != {cv_run_id(Config(workdir=str(tmp_path)))}
    points.assign(x=6.0).to_parquet(tmp_path / "a" / "points.parquet", index=False)  # new points, the same file
    assert cv_run_id(with_points(tmp_path / "a" / "points.parquet")) not in same
    monkeypatch.chdir(tmp_path)
    relative = with_points(Path("a") / "points.parquet")  # made absolute: a worker elsewhere hashes the same file
    assert relative.cv.predicted_points == str(tmp_path / "a" / "points.parquet")
    monkeypatch.chdir(tmp_path / "a")
    assert cv_run_id(relative) == cv_run_id(with_points(tmp_path / "a" / "points.parquet"))
    with pytest.raises(FileNotFoundError, match="cv.predicted_points"):
        cv_run_id(with_points(tmp_path / "missing.parquet"))


def test_a_shipped_file_is_written_once_on_the_receiving_node_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node_tmp"))
    source = tmp_path / "driver" / "convnext_nano.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 100)
    shipped = ship_if_local(str(source))
    source.unlink()  # the receiving node never sees the driver's path
    received = shipped.local_path()
    assert received.name == "convnext_nano.safetensors" and received.read_bytes() == b"weights" * 100
    assert received.is_relative_to(tmp_path / "node_tmp") and shipped.local_path() == received
    assert ship_if_local("s3://bucket/weights.pt") is None and ship_if_local("convnext_nano") is None


def test_the_segmentation_key_hashes_the_unet_and_its_data_and_moves_no_other_id(tmp_path: Path) -> None:
    """The ``segment`` section came after the golden ids: no setting of it moves the CV's id or the localisation's
    (a YOLO localisation does not depend on the U-Net); its own key follows its settings, the cache, the folds and the
    held-out fold, not the resources it trains on."""
    base = Config(workdir=str(tmp_path))
    segment = {"epochs": 3, "source": "points", "channels": [4, 8], "radius_px": 2.0}
    changed = Config.model_validate({"workdir": str(tmp_path), "segment": segment})
    assert cv_run_id(issue_8(tmp_path, segment={"epochs": 3, "in_slices": 5})) == "cv-a45d0f059f"
    assert cv_run_id(changed) == cv_run_id(base) == "cv-6e7ef393c5"
    assert localize_key(changed) == localize_key(base) == "loc-169c20482517"
    assert segment_key(changed) != segment_key(base) and segment_key(base).startswith("seg-")
    same = [Config.model_validate({"workdir": str(tmp_path / "elsewhere"),
                                   "train": {"num_workers": 4, "cpus_per_worker": 2.0, "lr": 0.1}}),
            Config.model_validate({"workdir": str(tmp_path), "localize": {"epochs": 1, "num_cpus": 8.0}})]  # fmt: skip
    assert {segment_key(cfg) for cfg in same} == {segment_key(base)}
    changes = (("segment", {"seed": 1}), ("preprocess", {"image_size": 128}), ("cv", {"seed": 1}),
               ("cv", {"n_folds": 5}), ("localize", {"val_fold": 1}), ("data", {"root": str(tmp_path / "rsna")}),
               ("synth", {"preset": "hard"}))  # fmt: skip
    other = [Config.model_validate({"workdir": str(tmp_path), section: values}) for section, values in changes]
    assert len({segment_key(base), *(segment_key(cfg) for cfg in other)}) == 1 + len(other)
    assert unet_weights_for(base) == tmp_path / "segment" / segment_key(base) / "unet.pt"


def test_masks_written_beside_the_same_dicom_bytes_keep_the_cv_id(tmp_path):
    plain = Config.model_validate({"workdir": str(tmp_path)})
    masked = Config.model_validate({"workdir": str(tmp_path), "synth": {"masks": True}})
    assert cv_run_id(plain) == cv_run_id(masked)
