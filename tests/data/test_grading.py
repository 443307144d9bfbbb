"""The readers' model of the hard preset: real marginals, a posterior that matches the draws, and its Bayes floor."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from lumbar_ray.constants import LEVELS, TARGETS
from lumbar_ray.data import grading
from lumbar_ray.data.grading import HARD_READERS, ReaderModel
from lumbar_ray.metrics import metric_optimal, score_arrays


def _independent_floor(readers: ReaderModel, n_studies: int, seed: int) -> dict[str, float]:
    """The floor from the model's definition alone: own sampling, own posterior, own metric (no grading code).

    Reader's reading = sqrt(1 - rho) * z + sqrt(rho) * e, cut at the real cumulative class frequencies; a wrong label
    is a draw from the class frequencies; the prediction is w * P(class | sqrt(1 - rho) * z), renormalised.
    """
    normal = NormalDist()
    rng = np.random.default_rng(seed)
    groups = [
        "spinal" if t.startswith("spinal") else "foraminal" if "foraminal" in t else "subarticular" for t in TARGETS
    ]
    rho = np.array([readers.noise_share[g] for g in groups])
    freq = np.array([grading.REAL_CLASS_FREQUENCIES[t[:-6]][LEVELS.index(t[-5:])] for t in TARGETS], dtype=np.float64)
    freq /= freq.sum(axis=1, keepdims=True)
    cut_low = np.array([normal.inv_cdf(p) for p in freq[:, 0]])
    cut_high = np.array([normal.inv_cdf(min(p, 1 - 1e-9)) for p in freq[:, 0] + freq[:, 1]])
    c = readers.study_correlation
    z = c * rng.standard_normal((n_studies, 1)) + np.sqrt(1 - c * c) * rng.standard_normal((n_studies, 25))
    visible = np.sqrt(1 - rho) * z
    reading = visible + np.sqrt(rho) * rng.standard_normal(z.shape)
    labels = (reading >= cut_low).astype(int) + (reading >= cut_high).astype(int)
    wrong = rng.random(z.shape) < readers.wrong_label_rate
    u = rng.random(z.shape)
    labels = np.where(wrong, (u >= freq[:, 0]).astype(int) + (u >= freq[:, 0] + freq[:, 1]).astype(int), labels)
    cdf = np.vectorize(normal.cdf)
    p_low = cdf((cut_low - visible) / np.sqrt(rho))
    p_high = cdf((cut_high - visible) / np.sqrt(rho))
    post = np.stack([p_low, p_high - p_low, 1 - p_high], axis=-1)
    post = (1 - readers.wrong_label_rate) * post + readers.wrong_label_rate * freq
    weights = np.array([1.0, 2.0, 4.0])
    pred = post * weights / (post * weights).sum(axis=-1, keepdims=True)
    eps = np.finfo(np.float64).eps
    true_p = np.clip(np.take_along_axis(pred, labels[..., None], axis=-1)[..., 0], eps, 1 - eps)
    w = weights[labels]
    terms = {}
    for name in ("spinal", "foraminal", "subarticular"):
        cols = [i for i, g in enumerate(groups) if g == name]
        terms[name] = float((w[:, cols] * -np.log(true_p[:, cols])).sum() / w[:, cols].sum())
    spinal = [i for i, g in enumerate(groups) if g == "spinal"]
    any_severe = (labels[:, spinal] == 2).any(axis=1)
    p_any = np.clip(pred[:, spinal, 2].max(axis=1), eps, 1 - eps)
    w_any = w[:, spinal].max(axis=1)
    terms["any_severe_spinal"] = float((w_any * -np.log(np.where(any_severe, p_any, 1 - p_any))).sum() / w_any.sum())
    terms["total"] = float(np.mean(list(terms.values())))
    return terms


def test_hard_floor_is_reproduced_by_an_independent_monte_carlo():
    printed = grading.bayes_floor(HARD_READERS).to_dict()
    independent = _independent_floor(HARD_READERS, n_studies=100_000, seed=12345)
    assert 0.33 <= printed["total"] <= 0.36
    for term, value in printed.items():
        assert abs(value - independent[term]) < 0.01, (term, value, independent[term])
    # The real ordering of the groups: spinal easiest, subarticular hardest.
    assert printed["spinal"] < printed["foraminal"] < printed["subarticular"]


def test_reader_labels_keep_the_real_class_frequencies():
    rng = np.random.default_rng(0)
    severity = grading.severity_units(grading.sample_latents(rng, 40_000, 0.5), HARD_READERS)
    labels = grading.read_labels(rng, severity, HARD_READERS)
    observed = np.stack([np.bincount(labels[:, t], minlength=3) / len(labels) for t in range(len(TARGETS))])
    np.testing.assert_allclose(observed, grading.class_frequencies(), atol=0.008)


def test_posterior_matches_the_labels_it_claims_to_predict():
    rng = np.random.default_rng(1)
    severity = grading.severity_units(grading.sample_latents(rng, 40_000, 0.5), HARD_READERS)
    labels = grading.read_labels(rng, severity, HARD_READERS)
    post = grading.posterior(severity, HARD_READERS)
    # Within bins of the predicted P(severe), the observed share of severe labels agrees (a calibration check).
    p_severe, is_severe = post[..., 2].ravel(), (labels == 2).ravel()
    for low, high in [(0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0)]:
        chosen = (p_severe >= low) & (p_severe < high)
        assert chosen.sum() > 500
        assert abs(p_severe[chosen].mean() - is_severe[chosen].mean()) < 0.02, (low, high)


def test_the_metric_rewards_the_weighted_posterior_over_the_plain_one():
    rng = np.random.default_rng(2)
    severity = grading.severity_units(grading.sample_latents(rng, 20_000, 0.5), HARD_READERS)
    labels = grading.read_labels(rng, severity, HARD_READERS)
    post = grading.posterior(severity, HARD_READERS)
    plain = score_arrays(labels, post).total
    weighted = score_arrays(labels, metric_optimal(post)).total
    assert weighted < plain - 0.01


def test_noiseless_readers_have_a_floor_near_zero():
    readers = ReaderModel(noise_share={"spinal": 1e-6, "foraminal": 1e-6, "subarticular": 1e-6})
    assert grading.bayes_floor(readers, n_studies=5000).total < 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_share": {"spinal": 0.1}},
        {"noise_share": {"spinal": 1.0, "foraminal": 0.1, "subarticular": 0.1}},
        {"noise_share": {"spinal": 0.0, "foraminal": 0.1, "subarticular": 0.1}},
        {"noise_share": {"spinal": 0.1, "foraminal": 0.1, "subarticular": 0.1}, "wrong_label_rate": 1.5},
    ],
)
def test_reader_model_refuses_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        ReaderModel(**kwargs)
