"""Paired comparison of two recipes: no difference where there is none, a clear verdict where one is worse."""

from __future__ import annotations

import numpy as np
import pytest

from lumbar_ray.data import grading
from lumbar_ray.metrics import metric_optimal
from lumbar_ray.paired import TERMS, compare_paired


def _graded(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hard-preset labels, the metric-optimal posterior (the best recipe possible), the plain posterior, 3 folds."""
    rng = np.random.default_rng(seed)
    severity = grading.severity_units(grading.sample_latents(rng, n, 0.5), grading.HARD_READERS)
    labels = grading.read_labels(rng, severity, grading.HARD_READERS)
    posterior = grading.posterior(severity, grading.HARD_READERS)
    return labels, metric_optimal(posterior), posterior, np.arange(n) % 3


def test_identical_recipes_show_no_difference():
    labels, best, _, folds = _graded(300, seed=0)
    result = compare_paired(labels, best, best.copy(), folds, samples=50)
    assert list(result.table.index) == list(TERMS)
    assert (result.table["delta"] == 0).all() and not result.table["significant"].any()


def test_a_miscalibrated_recipe_is_significantly_worse():
    """Class weights 1/1/1 scored with the metric's 1/2/4: the plain posterior instead of the weighted one."""
    labels, best, plain, folds = _graded(1500, seed=1)
    result = compare_paired(labels, best, plain, folds, samples=100)
    total = result.table.loc["total"]
    assert total["delta"] > 0 and total["significant"] and total["z"] > 2
    assert (result.folds["total"] > 0).all()
    assert "worse" in result.format("metric weights", "1/1/1")


def test_noise_alone_is_not_called_significant():
    labels, best, _, folds = _graded(300, seed=2)
    rng = np.random.default_rng(3)
    jittered = best * np.exp(0.02 * rng.standard_normal(best.shape))
    jittered /= jittered.sum(axis=-1, keepdims=True)
    assert not compare_paired(labels, best, jittered, folds, samples=100).table.loc["total", "significant"]


def test_misaligned_inputs_and_a_single_fold_are_refused():
    labels, best, _, folds = _graded(30, seed=4)
    with pytest.raises(ValueError, match="misaligned"):
        compare_paired(labels, best, best[:-1], folds)
    with pytest.raises(ValueError, match="two folds"):
        compare_paired(labels, best, best, np.zeros(30, dtype=int))
