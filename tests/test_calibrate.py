"""Temperatures and blend weights fitted on the official score, out of fold: the maths on synthetic numbers, the
gains on the 4th-place team's real out-of-fold predictions (``docs/recipe-evidence.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lumbar_ray.calibrate import (
    GROUP_COLUMNS,
    Calibration,
    CrossFit,
    apply_blend,
    apply_group_temperatures,
    apply_temperature,
    calibrate_out_of_fold,
    cross_fit,
    cross_fit_calibration,
    fit_blend_weights,
    fit_calibration,
    fit_group_temperatures,
    target_temperatures,
)
from lumbar_ray.constants import IGNORE_INDEX, TARGETS
from lumbar_ray.metrics import metric_optimal, score_arrays
from tests.real_oof import REAL_OOF_FOLDER, RealOof, load_real_oof, scored_where_predicted

SPINAL = GROUP_COLUMNS["spinal"]


def _random_probs(rng: np.random.Generator, n: int, concentration: tuple[float, ...] = (2.0, 0.6, 0.3)) -> np.ndarray:
    return rng.dirichlet(concentration, size=(n, len(TARGETS)))


def _sample_labels(rng: np.random.Generator, truth: np.ndarray) -> np.ndarray:
    """One class per cell drawn from ``truth`` ``(n, 25, 3)``."""
    cumulative = truth.cumsum(axis=-1)
    return (rng.random(truth.shape[:-1])[..., None] > cumulative[..., :-1]).sum(axis=-1)


def _overconfident_problem(n: int, seed: int, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from known class probabilities, the metric-optimal prediction, and it sharpened by T < 1."""
    rng = np.random.default_rng(seed)
    truth = _random_probs(rng, n)
    optimal = metric_optimal(truth)
    return _sample_labels(rng, truth), optimal, apply_temperature(optimal, temperature)


def _total(labels: np.ndarray, probs: np.ndarray) -> float:
    return score_arrays(labels, probs).total


def _cross_fit_temperatures(labels: np.ndarray, probs: np.ndarray, fold_of: np.ndarray) -> CrossFit:
    return cross_fit(
        labels,
        fold_of,
        fit=lambda train_labels, rows: fit_group_temperatures(train_labels, probs[rows]),
        apply=lambda temperatures, rows: apply_group_temperatures(probs[rows], temperatures),
    )


def _cross_fit_blend(labels: np.ndarray, parts: list[np.ndarray], fold_of: np.ndarray) -> CrossFit:
    return cross_fit(
        labels,
        fold_of,
        fit=lambda train_labels, rows: fit_blend_weights(train_labels, [part[rows] for part in parts]),
        apply=lambda weights, rows: apply_blend([part[rows] for part in parts], weights),
    )


# --- apply_temperature


def test_temperature_one_is_the_identity_and_rows_sum_to_one() -> None:
    probs = _random_probs(np.random.default_rng(0), 50)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)
    for temperature in (0.5, 0.85, 1.3, 2.0):
        np.testing.assert_allclose(apply_temperature(probs, temperature).sum(axis=-1), 1.0, atol=1e-12)


def test_a_temperature_below_one_sharpens_and_above_one_flattens() -> None:
    probs = _random_probs(np.random.default_rng(1), 50)
    top = probs.max(axis=-1)
    assert (apply_temperature(probs, 0.7).max(axis=-1) > top).all()
    assert (apply_temperature(probs, 1.5).max(axis=-1) < top).all()


def test_temperatures_compose_and_keep_zeros_and_nan() -> None:
    probs = _random_probs(np.random.default_rng(2), 20)
    np.testing.assert_allclose(apply_temperature(apply_temperature(probs, 0.8), 1.5), apply_temperature(probs, 1.2))
    probs[0, 0] = [1.0, 0.0, 0.0]
    probs[1, 3] = np.nan
    rescaled = apply_temperature(probs, 0.6)
    np.testing.assert_array_equal(rescaled[0, 0], [1.0, 0.0, 0.0])
    assert np.isnan(rescaled[1, 3]).all() and np.isfinite(np.delete(rescaled, 1, axis=0)).all()


def test_group_temperatures_reach_only_their_group() -> None:
    probs = _random_probs(np.random.default_rng(3), 10)
    per_target = target_temperatures({"spinal": 0.8})
    assert per_target.shape == (len(TARGETS),) and set(per_target[SPINAL]) == {0.8}
    rescaled = apply_group_temperatures(probs, {"spinal": 0.8})
    others = np.setdiff1d(np.arange(len(TARGETS)), SPINAL)
    np.testing.assert_allclose(rescaled[:, others], probs[:, others], atol=1e-12)
    np.testing.assert_allclose(rescaled[:, SPINAL], apply_temperature(probs[:, SPINAL], 0.8))


def test_bad_temperatures_are_refused() -> None:
    probs = _random_probs(np.random.default_rng(4), 2)
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="finite and positive"):
            apply_temperature(probs, bad)
    with pytest.raises(KeyError, match="unknown condition group"):
        target_temperatures({"lumbar": 1.0})


# --- fitting on synthetic numbers


def test_an_overconfident_prediction_gets_a_temperature_above_one_that_helps_held_out() -> None:
    labels, optimal, overconfident = _overconfident_problem(800, seed=5, temperature=0.6)
    fitting, held_out = np.arange(400), np.arange(400, 800)
    temperatures = fit_group_temperatures(labels[fitting], overconfident[fitting])
    # Sharpened by 0.6, the prediction is undone by 1 / 0.6 = 1.67; each group sees 2,000-4,000 cells.
    assert all(1.3 < t < 2.0 for t in temperatures.values()), temperatures
    before = _total(labels[held_out], overconfident[held_out])
    after = _total(labels[held_out], apply_group_temperatures(overconfident[held_out], temperatures))
    floor = _total(labels[held_out], optimal[held_out])
    assert after < before - 0.02, f"held-out total {before:.4f} -> {after:.4f} (T {temperatures})"
    assert after - floor < 0.3 * (before - floor), f"held-out {after:.4f}, the known optimum {floor:.4f}"


def test_a_calibrated_prediction_keeps_a_temperature_near_one() -> None:
    labels, optimal, _ = _overconfident_problem(800, seed=6, temperature=0.6)
    temperatures = fit_group_temperatures(labels, optimal)
    assert all(0.8 < t < 1.25 for t in temperatures.values()), temperatures


def test_blend_weights_favour_the_informative_part_and_help_held_out() -> None:
    labels, optimal, _ = _overconfident_problem(800, seed=7, temperature=1.0)
    noise = metric_optimal(_random_probs(np.random.default_rng(8), 800))
    fitting, held_out = np.arange(400), np.arange(400, 800)
    weights = fit_blend_weights(labels[fitting], [noise[fitting], optimal[fitting]])
    for group, w in weights.items():
        assert w.shape == (2,) and np.isclose(w.sum(), 1.0) and (w >= 0).all(), (group, w)
        assert w[1] > 0.75, f"{group}: weights {w}"
    parts = [noise[held_out], optimal[held_out]]
    mean = _total(labels[held_out], (parts[0] + parts[1]) / 2)
    assert _total(labels[held_out], apply_blend(parts, weights)) < mean - 0.02


def test_a_part_that_lacks_a_group_gets_weight_zero_there() -> None:
    labels, optimal, _ = _overconfident_problem(300, seed=9, temperature=1.0)
    noise = metric_optimal(_random_probs(np.random.default_rng(10), 300))
    spinal_only = np.full_like(optimal, np.nan)
    spinal_only[:, SPINAL] = optimal[:, SPINAL]
    weights = fit_blend_weights(labels, [noise, spinal_only])
    assert weights["foraminal"].tolist() == [1.0, 0.0] and weights["subarticular"].tolist() == [1.0, 0.0]
    assert weights["spinal"][1] > 0.75, weights["spinal"]
    assert np.isfinite(apply_blend([noise, spinal_only], weights)).all()


def test_a_part_that_covers_a_group_partly_is_refused() -> None:
    labels, optimal, _ = _overconfident_problem(50, seed=10, temperature=1.0)
    partial = optimal.copy()
    partial[0, SPINAL[0]] = np.nan
    with pytest.raises(ValueError, match="predicts 249 of the 250 scored spinal cells"):
        fit_blend_weights(labels, [optimal, partial])
    with pytest.raises(ValueError, match="shape"):
        apply_blend([optimal, optimal[:-1]], {"spinal": np.array([0.5, 0.5])})


# --- cross_fit


def test_cross_fit_fits_without_the_fold_it_applies_to() -> None:
    labels = np.arange(12)[:, None] * np.ones((1, len(TARGETS)), dtype=np.int64)
    fold_of = np.array([0, 1, 2] * 4)
    seen = {}

    def fit(train_labels: np.ndarray, rows: np.ndarray) -> set[int]:
        np.testing.assert_array_equal(train_labels, labels[rows])
        return set(rows.tolist())

    def apply(fitted_rows: set[int], rows: np.ndarray) -> np.ndarray:
        assert fitted_rows.isdisjoint(rows.tolist()) and len(fitted_rows) + len(rows) == len(labels)
        seen.update({row: len(fitted_rows) for row in rows.tolist()})
        return np.full((len(rows), 2), float(rows.min()))

    result = cross_fit(labels, fold_of, fit, apply)
    assert sorted(seen) == list(range(12)) and set(result.params) == {0, 1, 2}
    assert result.probs.shape == (12, 2) and np.isfinite(result.probs).all()
    np.testing.assert_array_equal(result.probs[:, 0], [0, 1, 2] * 4)


def test_cross_fit_refuses_one_fold_and_misaligned_outputs() -> None:
    labels = np.zeros((6, len(TARGETS)), dtype=np.int64)
    with pytest.raises(ValueError, match="at least two folds"):
        cross_fit(labels, np.zeros(6), lambda y, rows: None, lambda p, rows: rows)
    with pytest.raises(ValueError, match="entries for 6 studies"):
        cross_fit(labels, np.zeros(5), lambda y, rows: None, lambda p, rows: rows)
    with pytest.raises(ValueError, match="apply returned 1 rows"):
        cross_fit(labels, np.arange(6) % 2, lambda y, rows: None, lambda p, rows: rows[:1])


def test_cross_fitted_temperatures_help_held_out_synthetic_folds() -> None:
    labels, _, overconfident = _overconfident_problem(600, seed=11, temperature=0.7)
    result = _cross_fit_temperatures(labels, overconfident, np.arange(600) % 3)
    assert all(1.15 < t < 1.8 for params in result.params.values() for t in params.values()), result.params
    assert _total(labels, result.probs) < _total(labels, overconfident) - 0.01


# --- Calibration: the blend then the temperatures, as a registered model applies it


def test_a_calibration_is_the_blend_then_the_temperatures_and_round_trips_through_json() -> None:
    import json

    rng = np.random.default_rng(12)
    parts = [_random_probs(rng, 20), _random_probs(rng, 20)]
    weights = {"spinal": np.array([0.3, 0.7]), "foraminal": np.array([1.0, 0.0]), "subarticular": np.array([0.5, 0.5])}
    calibration = Calibration(weights, {"spinal": 0.85, "foraminal": 1.1, "subarticular": 1.0})
    expected = apply_group_temperatures(apply_blend(parts, weights), calibration.temperatures)
    np.testing.assert_allclose(calibration.apply(parts), expected, atol=1e-15)
    stored = json.loads(json.dumps(calibration.to_json()))  # what a contract holds
    assert Calibration.from_json(stored | {"fitted_on": "last epoch"}) == calibration and calibration.parts == 2
    with pytest.raises(ValueError, match="blends 2 parts, got 1"):
        calibration.apply(parts[:1])
    with pytest.raises(ValueError, match="every group"):
        Calibration.from_json({"weights": {"spinal": [1.0]}, "temperatures": None})


def test_one_part_without_temperatures_is_the_identity() -> None:
    probs = _random_probs(np.random.default_rng(13), 10)
    np.testing.assert_array_equal(Calibration.identity().apply([probs]), probs)
    labels, _, _ = _overconfident_problem(10, seed=13, temperature=1.0)
    assert fit_calibration(labels, [probs], temperature=False) == Calibration.identity()


def test_temperatures_fitted_out_of_fold_lower_the_held_out_score_of_an_overconfident_model() -> None:
    """What ``calibrate.temperature`` reports: each fold calibrated by temperatures fitted on the other folds (none
    of its own labels) scores better than the model as it is; the registered fit uses every fold."""
    labels, _, overconfident = _overconfident_problem(600, seed=14, temperature=0.7)
    fold_of = np.arange(600) % 3
    result = calibrate_out_of_fold(labels, fold_of, [overconfident], temperature=True)
    assert list(result.scores) == ["uncalibrated", "calibrated"]
    assert result.scores["uncalibrated"].total == pytest.approx(_total(labels, overconfident))
    assert result.scores["calibrated"].total < result.scores["uncalibrated"].total - 0.01 and result.gain < -0.01
    assert result.scores["calibrated"].total == pytest.approx(_total(labels, result.probs))
    crossed = cross_fit_calibration(labels, fold_of, [overconfident], temperature=True)
    np.testing.assert_allclose(result.probs, crossed.probs)  # the reported figure is the cross-fitted one
    assert all(1.15 < t < 1.8 for t in result.calibration.temperatures.values()), result.calibration
    assert result.calibration == fit_calibration(labels, [overconfident], temperature=True)


def test_two_parts_are_blended_then_calibrated_out_of_fold() -> None:
    labels, optimal, _ = _overconfident_problem(600, seed=15, temperature=1.0)
    noise = metric_optimal(_random_probs(np.random.default_rng(16), 600))
    sharp = apply_temperature(optimal, 0.7)
    result = calibrate_out_of_fold(labels, np.arange(600) % 3, [noise, sharp], temperature=True)
    assert list(result.scores) == ["uncalibrated", "blended", "calibrated"]
    totals = {name: score.total for name, score in result.scores.items()}
    assert totals["uncalibrated"] == pytest.approx(_total(labels, (noise + sharp) / 2))
    assert totals["calibrated"] < totals["blended"] < totals["uncalibrated"], totals
    assert all(weights[1] > 0.6 for weights in result.calibration.weights.values()), result.calibration.weights
    with pytest.raises(ValueError, match="no part"):
        calibrate_out_of_fold(labels, np.arange(600) % 3, [], temperature=True)


# --- the real out-of-fold predictions of the 4th-place team


@pytest.fixture(scope="module")
def real(shared_dir: Path) -> RealOof:
    if not (shared_dir / REAL_OOF_FOLDER).is_dir():
        pytest.skip(f"the real out-of-fold predictions are not under {shared_dir / REAL_OOF_FOLDER}")
    return load_real_oof(shared_dir)


@dataclass(frozen=True)
class BackboneBlend:
    """CNN + Swin-T, scored where both predict: the CNN alone, their plain mean and their fitted blend."""

    labels: np.ndarray
    cnn: np.ndarray
    mean: np.ndarray
    blend: CrossFit


@pytest.fixture(scope="module")
def backbone_blend(real: RealOof) -> BackboneBlend:
    labels = scored_where_predicted(real.labels, real.cnn, real.swint)
    blend = _cross_fit_blend(labels, [real.cnn, real.swint], real.fold_of)
    return BackboneBlend(labels, real.cnn, (real.cnn + real.swint) / 2, blend)


def test_the_loader_reproduces_the_readme_figures(real: RealOof) -> None:
    """The three CNN files 0.4020, their per-row mean with Swin-T 0.3946 (``real-oof/README.md``)."""
    assert real.labels.shape == (1975, 25) and np.bincount(real.fold_of).tolist() == [395] * 5
    labels = scored_where_predicted(real.labels, real.cnn, real.swint)
    # The READMEs' 46 scored rows without a prediction (the one study without spinal rows has no spinal label).
    assert ((labels == IGNORE_INDEX) & (real.labels != IGNORE_INDEX)).sum() == 46
    cnn, mean = score_arrays(labels, real.cnn), score_arrays(labels, (real.cnn + real.swint) / 2)
    assert abs(cnn.total - 0.4020) < 1e-4 and abs(cnn.spinal - 0.2869) < 1e-4, str(cnn)
    assert abs(mean.total - 0.39465) < 1e-5 and abs(mean.any_severe_spinal - 0.27537) < 1e-5, str(mean)


def test_blending_two_backbones_out_of_fold_beats_one(backbone_blend: BackboneBlend) -> None:
    """Recipe evidence: the mean of two backbones is 0.007 better than one; a fitted blend gets the same."""
    labels, weights = backbone_blend.labels, backbone_blend.blend.params
    cnn, mean = _total(labels, backbone_blend.cnn), _total(labels, backbone_blend.mean)
    fitted = _total(labels, backbone_blend.blend.probs)
    cnn_weights = {fold: {g: round(float(w[0]), 3) for g, w in p.items()} for fold, p in weights.items()}
    figures = (
        f"CNN {cnn:.5f}, mean {mean:.5f} ({mean - cnn:+.5f}), fitted out of fold {fitted:.5f} "
        f"({fitted - cnn:+.5f} vs CNN, {fitted - mean:+.5f} vs mean); CNN weight per fold {cnn_weights}"
    )
    assert -0.012 < fitted - cnn < -0.004, figures
    # Two near-equal backbones: out of fold, fitted weights cannot be expected to beat the plain mean by much.
    assert abs(fitted - mean) < 0.001, figures
    assert all(0.3 < w[0] < 0.7 for p in weights.values() for w in p.values()), figures


def test_temperatures_out_of_fold_on_the_backbone_blend_do_not_hurt(
    real: RealOof, backbone_blend: BackboneBlend
) -> None:
    """Without the axial spinal model the gain is small (about -0.0003, spinal T about 0.91), but no loss."""
    labels, blend = backbone_blend.labels, backbone_blend.blend.probs
    result = _cross_fit_temperatures(labels, blend, real.fold_of)
    before, after = _total(labels, blend), _total(labels, result.probs)
    spinal = [params["spinal"] for params in result.params.values()]
    figures = f"total {before:.5f} -> {after:.5f} ({after - before:+.5f}); spinal T per fold {np.round(spinal, 3)}"
    assert after - before < 0.0, figures
    assert all(0.8 < t < 1.0 for t in spinal), figures


@pytest.fixture(scope="module")
def fused_blend(real: RealOof) -> tuple[np.ndarray, np.ndarray, CrossFit]:
    """CNN + Swin-T + the axial spinal model (late fusion), scored where all three predict; plus the mean of two."""
    labels = scored_where_predicted(real.labels, real.cnn, real.swint)
    axial_missing = ~np.isfinite(real.axial_spinal[:, SPINAL]).all(axis=-1)
    labels[:, SPINAL] = np.where(axial_missing, IGNORE_INDEX, labels[:, SPINAL])
    blend = _cross_fit_blend(labels, [real.cnn, real.swint, real.axial_spinal], real.fold_of)
    return labels, (real.cnn + real.swint) / 2, blend


def test_adding_the_axial_spinal_model_helps_by_about_0_006(fused_blend) -> None:
    labels, mean, blend = fused_blend
    before, after = _total(labels, mean), _total(labels, blend.probs)
    axial = [round(float(params["spinal"][2]), 3) for params in blend.params.values()]
    figures = f"mean of two {before:.5f} -> with axial spinal {after:.5f} ({after - before:+.5f}); axial weight {axial}"
    assert -0.010 < after - before < -0.003, figures
    assert all(params["foraminal"][2] == params["subarticular"][2] == 0 for params in blend.params.values())


def test_a_temperature_per_group_out_of_fold_gains_about_0_002(real: RealOof, fused_blend) -> None:
    """Recipe evidence: -0.002 with spinal T about 0.85; foraminal and subarticular near 1."""
    labels, _, blend = fused_blend
    result = _cross_fit_temperatures(labels, blend.probs, real.fold_of)
    before, after = _total(labels, blend.probs), _total(labels, result.probs)
    temperatures = {g: np.round([p[g] for p in result.params.values()], 3).tolist() for g in GROUP_COLUMNS}
    figures = f"total {before:.5f} -> {after:.5f} ({after - before:+.5f}); T per group per fold {temperatures}"
    assert -0.004 < after - before < -0.0005, figures
    assert all(0.75 < t < 0.92 for t in temperatures["spinal"]), figures
    assert all(0.95 < t < 1.1 for g in ("foraminal", "subarticular") for t in temperatures[g]), figures


def test_what_an_ensemble_registers_is_fitted_out_of_fold_as_the_evidence_measured(
    real: RealOof, backbone_blend: BackboneBlend
) -> None:
    """:func:`calibrate_out_of_fold` (what ``lumbar-ray ensemble`` runs) on the two real backbones: its cross-fitted
    blend is the one measured above, and temperatures fitted with the blend on the other folds do not hurt."""
    labels = backbone_blend.labels
    result = calibrate_out_of_fold(labels, real.fold_of, [real.cnn, real.swint], temperature=True)
    totals = {name: score.total for name, score in result.scores.items()}
    figures = f"{totals}; temperatures {result.calibration.temperatures}"
    assert totals["uncalibrated"] == pytest.approx(_total(labels, backbone_blend.mean), abs=1e-9), figures
    assert totals["blended"] == pytest.approx(_total(labels, backbone_blend.blend.probs), abs=1e-9), figures
    assert totals["calibrated"] < totals["blended"] and result.gain < 0, figures
    assert 0.8 < result.calibration.temperatures["spinal"] < 1.0, figures
