"""The composition layer's own rules, without Ray: the measured jitter a CV or a search trains with."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import load_config
from lumbar_ray.localize.stage import VAL_ERRORS_NAME
from lumbar_ray.paths import cv_run_id, localize_dir_for
from lumbar_ray.pipeline import tuning_config, with_measured_jitter


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


def test_without_an_evaluated_localisation_the_jitter_stays_and_says_so(tmp_path, caplog):
    cfg = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true"])
    with caplog.at_level(logging.WARNING, logger="lumbar_ray.pipeline"):
        assert with_measured_jitter(cfg) == cfg
    assert "not evaluated" in caplog.text and "lumbar-ray localize" in caplog.text


def test_a_search_over_the_jitter_searches_it_instead_of_the_measured_one(tmp_path):
    space = "tune.space={augment.jitter_px: {dist: uniform, low: 0.0, high: 10.0}}"
    searching = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true", space])
    _write_errors(searching)
    assert tuning_config(searching).augment.jitter_px_by_series is None
    other = load_config(None, [f"workdir={tmp_path}", "augment.jitter_measured=true",
                               "tune.space={train.lr: {dist: loguniform, low: 0.0001, high: 0.01}}"])  # fmt: skip
    assert tuning_config(other).augment.jitter_px_by_series is not None
