"""The weighted-frequency prior baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.baseline import fit_prior, prior_oof_probs, run_baseline
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.labels import encode_labels
from lumbar_ray.metrics import score_arrays, validate_submission


@pytest.fixture(scope="module")
def real_labels(real_rsna_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return encode_labels(load_rsna(real_rsna_dir).train)


def test_fit_prior_by_hand() -> None:
    labels = np.zeros((4, 25), dtype=np.int64)
    labels[:, 0] = [0, 0, 1, 2]  # frequencies 1/2, 1/4, 1/4
    labels[:, 1] = [0, 0, 0, IGNORE_INDEX]
    labels[:, 2] = IGNORE_INDEX
    exact = fit_prior(labels, pseudo_count=0)
    np.testing.assert_allclose(fit_prior(labels, weighted=False, pseudo_count=0)[0], [0.5, 0.25, 0.25])
    # x (1, 2, 4) = (0.5, 0.5, 1.0) -> / 2
    np.testing.assert_allclose(exact[0], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(exact[1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(exact[2], [1 / 3] * 3)  # no labelled cell: uniform
    assert exact.shape == (25, 3)
    # default smoothing: counts (3.5, 0.5, 0.5) x (1, 2, 4) = (3.5, 1, 2) -> / 6.5; never a zero probability
    np.testing.assert_allclose(fit_prior(labels)[1], [3.5 / 6.5, 1 / 6.5, 2 / 6.5])
    np.testing.assert_allclose(fit_prior(labels)[2], [1 / 3] * 3)


def test_weighted_prior_is_the_best_constant() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(3, p=[0.7, 0.2, 0.1], size=(400, 25))
    prior = fit_prior(labels, pseudo_count=0)
    best = score_arrays(labels, np.broadcast_to(prior, (400, 25, 3)))
    for _ in range(5):
        noisy = prior * rng.uniform(0.8, 1.2, size=prior.shape)
        noisy /= noisy.sum(axis=1, keepdims=True)
        other = score_arrays(labels, np.broadcast_to(noisy, (400, 25, 3)))
        assert other.spinal > best.spinal and other.foraminal > best.foraminal


def test_oof_uses_only_other_folds() -> None:
    labels = np.zeros((6, 25), dtype=np.int64)
    labels[3:] = 2  # fold 1 is all severe, fold 0 all normal
    folds = np.array([0, 0, 0, 1, 1, 1])
    probs = prior_oof_probs(labels, folds, weighted=False, pseudo_count=0)
    np.testing.assert_allclose(probs[0, 0], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(probs[5, 7], [1.0, 0.0, 0.0])


def test_real_weighted_prior(tmp_path: Path, real_rsna_dir: Path, real_labels) -> None:
    out = tmp_path / "oof.csv"
    result = run_baseline(real_rsna_dir, n_folds=5, seed=42, out_csv=out)
    assert 0.785 <= result.score.total <= 0.80
    assert result.weighted and result.oof_csv == out
    assert len(result.folds) == 1975
    study_ids, _ = real_labels
    written = validate_submission(pd.read_csv(out), study_ids=study_ids)
    assert len(written) == 1975 * 25


def test_real_unweighted_prior(real_rsna_dir: Path) -> None:
    result = run_baseline(real_rsna_dir, weighted=False)
    assert result.score.total == pytest.approx(0.933, abs=0.01)
    assert result.oof_csv is None


def test_real_uniform(real_labels) -> None:
    _, labels = real_labels
    result = score_arrays(labels, np.full((*labels.shape, 3), 1 / 3))
    assert result.total == pytest.approx(0.9994, abs=1e-3)


def test_run_baseline_needs_train_csv(tmp_path: Path, real_rsna_dir: Path) -> None:
    (tmp_path / "test_series_descriptions.csv").write_text((real_rsna_dir / "test_series_descriptions.csv").read_text())
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        run_baseline(tmp_path)
