"""The composition layer's own rules, without Ray: the measured jitter a CV or a search trains with, the quickstart's
own model name."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import ConfigError, load_config
from lumbar_ray.errors import MissingDetectorsError
from lumbar_ray.localize.stage import VAL_ERRORS_NAME
from lumbar_ray.paths import cv_run_id, localize_dir_for
from lumbar_ray.pipeline import quickstart_config, train, tune, tuning_config, with_measured_jitter
from lumbar_ray.train.cv import start_cv


def _write_errors(cfg) -> None:
    """Held-out errors as ``lumbar-ray localize`` writes them: sagittal points off by 0-2 px and at most one slice,
    axial ones by 0-8 px and up to two slices."""
    rows = []
    for i in range(10):
        rows.append({"series_type": "Sagittal T1", "error_px": 0.2 * i, "slice_error": float(i % 2)})
        rows.append({"series_type": "Axial T2", "error_px": 0.8 * i, "slice_error": float(i % 3)})
    folder = localize_dir_for(cfg)
    folder.mkdir(parents=True)
    pd.DataFrame(rows).assign(study_id=1, target=0).to_parquet(folder / VAL_ERRORS_NAME, index=False)


def test_the_measured_jitter_comes_from_the_localisations_held_out_errors(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true"])
    _write_errors(cfg)

    measured = with_measured_jitter(cfg)

    px, slices = measured.augment.jitter_px_by_series, measured.augment.jitter_slices_by_series
    assert px == {"Axial T2": pytest.approx(np.quantile(0.8 * np.arange(10), 0.9)),
                  "Sagittal T1": pytest.approx(np.quantile(0.2 * np.arange(10), 0.9))}  # fmt: skip
    assert slices == {"Axial T2": 2, "Sagittal T1": 1}
    assert measured.augment.jitter_px == cfg.augment.jitter_px  # the series types without errors keep it
    assert cv_run_id(measured) != cv_run_id(cfg)  # a CV trained with other jitter is another run
    assert with_measured_jitter(cfg.model_copy(update={"augment": cfg.augment.model_copy(
        update={"jitter_measured": False})})).augment.jitter_px_by_series is None  # fmt: skip
    given = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true",
                               "augment.jitter_px_by_series={Axial T2: 1.5}"])  # fmt: skip
    kept = with_measured_jitter(given).augment
    assert kept.jitter_px_by_series == {"Axial T2": 1.5} and kept.jitter_slices_by_series == slices  # given wins


def test_without_an_evaluated_localisation_the_switch_goes_off_and_says_so(tmp_path, caplog):
    """The config (and so the run id) says what is trained: the plain jitter, not an unresolved measured one."""
    cfg = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true"])
    with caplog.at_level(logging.WARNING, logger="lumbar_ray.pipeline"):
        resolved = with_measured_jitter(cfg)
    assert resolved.augment == cfg.augment.model_copy(update={"jitter_measured": False})
    assert "no evaluated localisation" in caplog.text and "lumbar-ray localize" in caplog.text
    with pytest.raises(ConfigError, match="jitter_measured is not resolved"):
        start_cv(cfg)  # a CV never trains an unresolved one under its name


def test_errors_given_are_used_and_a_searched_setting_keeps_its_search(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true"])
    errors = pd.DataFrame({"series_type": ["Axial T2"] * 10, "error_px": np.arange(10.0), "slice_error": 0.0})
    given = with_measured_jitter(cfg, errors).augment
    assert given.jitter_px_by_series == {"Axial T2": pytest.approx(8.1)} and given.jitter_slices_by_series == {
        "Axial T2": 0}  # fmt: skip
    _write_errors(cfg)
    px = "augment.jitter_px: {dist: uniform, low: 0.0, high: 10.0}"
    searching = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true", f"tune.space={{{px}}}"])
    tuned = tuning_config(searching).augment  # the searched in-plane jitter stays searched; the slices are measured
    assert tuned.jitter_px_by_series is None and tuned.jitter_slices_by_series == {"Axial T2": 2, "Sagittal T1": 1}
    both = f"tune.space={{{px}, augment.jitter_slices: {{dist: int, low: 0, high: 2}}}}"
    searched = tuning_config(load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true", both]))
    assert not searched.augment.jitter_measured and searched.augment.jitter_px_by_series is None


def test_the_quickstart_registers_and_predicts_under_its_own_model_name(tmp_path):
    """The quickstart never takes the production model's alias: with the default name it registers (and predicts)
    as lumbar_ray_quickstart; its run ids stay those of the config it was given."""
    cfg = load_config(None, [f"workdir={tmp_path}"])
    assert cfg.tracking.model_name == "lumbar_ray_ensemble"  # the production name stays the default
    quick = quickstart_config(cfg)
    assert quick.tracking.model_name == "lumbar_ray_quickstart"
    assert quick.predict.model == "models:/lumbar_ray_quickstart@champion"
    assert cv_run_id(quick) == cv_run_id(cfg)  # the model name is no part of a CV's id
    named = load_config(None, [f"workdir={tmp_path}", "tracking.model_name=my_model"])
    assert quickstart_config(named) == named  # a name given on purpose is kept


def test_a_cv_that_would_register_without_its_detectors_is_refused_before_it_trains(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}"])
    with pytest.raises(MissingDetectorsError, match="lumbar-ray localize"):
        train(cfg)
    assert not (tmp_path / "work" / "data").exists() and not (tmp_path / "work" / "cache").exists()  # nothing ran
    with pytest.raises(MissingDetectorsError):
        tune(cfg, register_best=True)
