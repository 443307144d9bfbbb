"""The official competition score, submission validation and conversions."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics

from lumbar_ray import metrics
from lumbar_ray.constants import IGNORE_INDEX, SEVERITIES, SUBMISSION_COLUMNS, TARGETS, target_index
from lumbar_ray.data import grading
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.labels import decode_labels, encode_labels
from lumbar_ray.metrics import (
    ScoreResult,
    labels_to_submission,
    score_arrays,
    score_submission,
    submission_to_probs,
    validate_submission,
)

REFERENCE = {
    "spinal": 0.27830,
    "foraminal": 0.48027,
    "subarticular": 0.54465,
    "any_severe_spinal": 0.27537,
    "total": 0.39465,
}


@pytest.fixture(scope="module")
def solution(real_rsna_dir: Path) -> pd.DataFrame:
    return load_rsna(real_rsna_dir).train


@pytest.fixture(scope="module")
def reference_submission(shared_dir: Path) -> pd.DataFrame:
    return pd.read_csv(shared_dir / "reference" / "oof_4th_place_yu4u_avg.csv")


def _kaggle_score(solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
    """A direct transcription of the Kaggle metric (solution rows = scored rows only, sklearn's log_loss)."""
    long = solution.melt(id_vars="study_id", var_name="target", value_name="severity").dropna()
    long["row_id"] = long["study_id"].astype(str) + "_" + long["target"].astype(str)
    merged = long.merge(submission, on="row_id", how="inner")  # missing predictions dropped from the solution
    onehot = pd.get_dummies(merged["severity"].astype(str)).reindex(columns=list(SEVERITIES), fill_value=False)
    onehot = onehot.to_numpy(dtype=float)
    merged["sample_weight"] = onehot @ np.array([1.0, 2.0, 4.0])
    merged["condition"] = merged["target"].astype(str).str.extract(r"(spinal|foraminal|subarticular)")[0]
    losses = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reference rows sum to 1 only to 6 decimals
        for condition in ("spinal", "foraminal", "subarticular"):
            rows = (merged["condition"] == condition).to_numpy()
            losses[condition] = sklearn.metrics.log_loss(
                onehot[rows],
                merged.loc[rows, list(SUBMISSION_COLUMNS)].to_numpy(),
                sample_weight=merged.loc[rows, "sample_weight"].to_numpy(),
            )
        spinal = merged[merged["condition"] == "spinal"].assign(is_severe=onehot[merged["condition"] == "spinal", 2])
        grouped = spinal.groupby("study_id")
        losses["any_severe_spinal"] = sklearn.metrics.log_loss(
            grouped["is_severe"].max().to_numpy(),
            grouped["severe"].max().to_numpy(),
            sample_weight=grouped["sample_weight"].max().to_numpy(),
            labels=[0, 1],
        )
    losses["total"] = float(np.mean(list(losses.values())))
    return losses


# --- reference


def test_reference_figures(solution: pd.DataFrame, reference_submission: pd.DataFrame) -> None:
    result = score_submission(solution, reference_submission, missing="drop")
    for name, expected in REFERENCE.items():
        assert round(getattr(result, name), 5) == expected, name
        assert getattr(result, name) == pytest.approx(expected, abs=5e-6)
    assert result.to_dict() == pytest.approx(REFERENCE, abs=5e-6)


def test_matches_sklearn_transcription(solution: pd.DataFrame, reference_submission: pd.DataFrame) -> None:
    result = score_submission(solution, reference_submission, missing="drop").to_dict()
    expected = _kaggle_score(solution, reference_submission)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name


def test_missing_predictions_error(solution: pd.DataFrame, reference_submission: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"46 scored row\(s\) have no prediction: '64092030_left_subarticular"):
        score_submission(solution, reference_submission)


def test_array_and_frame_apis_agree(solution: pd.DataFrame, reference_submission: pd.DataFrame) -> None:
    study_ids, labels = encode_labels(solution)
    probs = submission_to_probs(reference_submission, study_ids, missing="nan")
    unpredicted = np.isnan(probs).any(axis=2)
    labels = np.where(unpredicted, IGNORE_INDEX, labels)
    from_arrays = score_arrays(labels, probs)
    assert from_arrays.to_dict() == pytest.approx(
        score_submission(solution, reference_submission, missing="drop").to_dict(), abs=1e-12
    )


# --- hand-computed cases


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3)[np.where(labels == IGNORE_INDEX, 0, labels)]


def test_perfect_predictions_score_zero() -> None:
    labels = np.random.default_rng(0).integers(0, 3, size=(4, 25))
    result = score_arrays(labels, _one_hot(labels))
    assert result.total == pytest.approx(0.0, abs=1e-12)
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in result.to_dict().values())


def test_uniform_predictions_by_hand() -> None:
    # Study A has a severe spinal level (any-severe weight 4), study B is all normal/mild (weight 1).
    labels = np.zeros((2, 25), dtype=np.int64)
    labels[0, target_index("spinal_canal_stenosis", "l4_l5")] = 2
    labels[0, target_index("left_neural_foraminal_narrowing", "l5_s1")] = 1
    result = score_arrays(labels, np.full((2, 25, 3), 1 / 3))
    assert result.spinal == pytest.approx(math.log(3), abs=1e-12)
    assert result.foraminal == pytest.approx(math.log(3), abs=1e-12)
    assert result.subarticular == pytest.approx(math.log(3), abs=1e-12)
    any_severe = (4 * math.log(3) + 1 * math.log(3 / 2)) / 5
    assert result.any_severe_spinal == pytest.approx(any_severe, abs=1e-12)
    assert result.total == pytest.approx((3 * math.log(3) + any_severe) / 4, abs=1e-12)


def test_weights_follow_the_true_class() -> None:
    labels = np.zeros((1, 25), dtype=np.int64)
    labels[0, :5] = [0, 1, 2, 0, 0]
    probs = np.full((1, 25, 3), 1 / 3)
    probs[0, :5] = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]
    losses = -np.log([0.5, 0.3, 0.6, 0.9, 0.8])
    weights = np.array([1, 2, 4, 1, 1])
    result = score_arrays(labels, probs)
    assert result.spinal == pytest.approx(np.sum(weights * losses) / weights.sum(), abs=1e-12)
    # any severe: label 1, P = max severe = 0.6, weight 4 (the only row is the study's) -> -log 0.6.
    assert result.any_severe_spinal == pytest.approx(-math.log(0.6), abs=1e-12)


def test_any_severe_weight_and_max() -> None:
    labels = np.zeros((2, 25), dtype=np.int64)
    labels[0, :5] = [0, 1, 0, 0, 0]  # no severe, largest weight 2
    labels[1, :5] = [2, 0, 0, 0, 0]  # severe, weight 4
    probs = np.full((2, 25, 3), 1 / 3)
    probs[0, :5, 2] = [0.1, 0.2, 0.3, 0.05, 0.0]
    probs[1, :5, 2] = [0.1, 0.6, 0.2, 0.0, 0.0]
    expected = (2 * -math.log(1 - 0.3) + 4 * -math.log(0.6)) / 6
    assert score_arrays(labels, probs).any_severe_spinal == pytest.approx(expected, abs=1e-12)


def test_any_severe_uses_only_scored_spinal_rows() -> None:
    labels = np.zeros((2, 25), dtype=np.int64)
    labels[0, :5] = [IGNORE_INDEX, 0, 0, 0, 0]
    labels[1, :5] = IGNORE_INDEX  # no scored spinal row: no any-severe row for this study
    probs = np.full((2, 25, 3), 1 / 3)
    probs[0, :5, 2] = [0.99, 0.1, 0.2, 0.1, 0.1]  # the unscored row's 0.99 must not count
    probs[1, :5] = np.nan  # unscored cells are never read
    result = score_arrays(labels, probs)
    assert result.any_severe_spinal == pytest.approx(-math.log(1 - 0.2), abs=1e-12)


def test_rows_are_clipped_not_renormalised() -> None:
    labels = np.zeros((1, 25), dtype=np.int64)
    probs = np.full((1, 25, 3), 1 / 3)
    probs[0, 0] = [0.5, 0.5, 0.5]  # sums to 1.5: renormalising would give 1/3
    probs[0, 1] = [2.0, 0.0, 0.0]  # clipped to 1 - eps
    spinal_losses = [-math.log(0.5), -math.log(1 - np.finfo(np.float64).eps), *[math.log(3)] * 3]
    assert score_arrays(labels, probs).spinal == pytest.approx(np.mean(spinal_losses), abs=1e-12)
    probs[0, 2] = [1.0, 0.0, 0.0]
    probs[0, 2, 0] = 0.0  # true class gets 0 -> clipped to eps, finite loss
    assert np.isfinite(score_arrays(labels, probs).spinal)


def test_score_arrays_rejects_bad_input() -> None:
    labels = np.zeros((1, 25), dtype=np.int64)
    probs = np.full((1, 25, 3), 1 / 3)
    with pytest.raises(ValueError, match="shape"):
        score_arrays(labels, probs[:, :24])
    with pytest.raises(ValueError, match="class id"):
        score_arrays(np.full((1, 25), 3), probs)
    bad = probs.copy()
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        score_arrays(labels, bad)
    with pytest.raises(ValueError, match="no scored"):
        score_arrays(np.full((1, 25), IGNORE_INDEX), probs)


def test_score_result_to_dict() -> None:
    result = ScoreResult(total=0.5, spinal=0.1, foraminal=0.2, subarticular=0.3, any_severe_spinal=1.4)
    assert result.to_dict("val/") == {
        "val/total": 0.5,
        "val/spinal": 0.1,
        "val/foraminal": 0.2,
        "val/subarticular": 0.3,
        "val/any_severe_spinal": 1.4,
    }


# --- conversions


def test_submission_round_trip_and_order() -> None:
    study_ids = np.array([7, 3])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 25))
    submission = labels_to_submission(study_ids, probs)
    assert list(submission.columns) == ["row_id", *SUBMISSION_COLUMNS]
    assert submission["row_id"].iloc[0] == f"7_{TARGETS[0]}"
    assert submission["row_id"].iloc[24] == f"7_{TARGETS[24]}"
    assert submission["row_id"].iloc[25] == f"3_{TARGETS[0]}"
    shuffled = submission.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(submission_to_probs(shuffled, study_ids), probs)
    with pytest.raises(ValueError, match="missing"):
        submission_to_probs(submission.iloc[1:], study_ids)


def test_score_submission_matches_arrays() -> None:
    rng = np.random.default_rng(3)
    study_ids = np.array([11, 12, 13])
    labels = rng.integers(0, 3, size=(3, 25))
    labels[0, 17] = IGNORE_INDEX
    probs = rng.dirichlet(np.ones(3), size=(3, 25))
    solution = decode_labels(study_ids, labels)
    submission = labels_to_submission(study_ids, probs)
    assert score_submission(solution, submission) == score_arrays(labels, probs)
    # Dropping a scored row: error by default, or scored as if the label were empty.
    cut = submission.drop(index=[30])
    with pytest.raises(ValueError, match=f"12_{TARGETS[5]}"):
        score_submission(solution, cut)
    dropped = labels.copy()
    dropped[1, 5] = IGNORE_INDEX
    assert score_submission(solution, cut, missing="drop") == score_arrays(dropped, probs)
    # The row of an unscored cell may be absent.
    assert score_submission(solution, submission.drop(index=[17])) == score_arrays(labels, probs)


# --- validation


@pytest.fixture
def uniform_submission() -> pd.DataFrame:
    return labels_to_submission(np.array([1, 2]), np.full((2, 25, 3), 1 / 3))


def test_validate_accepts_good_submission(uniform_submission: pd.DataFrame, real_rsna_dir: Path) -> None:
    clean = validate_submission(uniform_submission, study_ids=[1, 2])
    pd.testing.assert_frame_equal(clean, uniform_submission)
    sample = pd.read_csv(real_rsna_dir / "sample_submission.csv")
    assert len(validate_submission(sample, study_ids=[44036939])) == 25


def test_validate_columns(uniform_submission: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="columns"):
        validate_submission(uniform_submission.drop(columns=["severe"]))
    with pytest.raises(ValueError, match="columns"):
        validate_submission(uniform_submission.assign(extra=0.0))


def test_validate_malformed_row_id(uniform_submission: pd.DataFrame) -> None:
    bad = uniform_submission.copy()
    bad.loc[3, "row_id"] = "1_spinal_canal_stenosis_l6_l7"
    bad.loc[4, "row_id"] = "x_spinal_canal_stenosis_l1_l2"
    with pytest.raises(ValueError, match=r"malformed row_id.*'1_spinal_canal_stenosis_l6_l7', 'x_spinal"):
        validate_submission(bad)


def test_validate_duplicate_row_id(uniform_submission: pd.DataFrame) -> None:
    bad = pd.concat([uniform_submission, uniform_submission.iloc[[5]]])
    with pytest.raises(ValueError, match=f"duplicate row_id: '1_{TARGETS[5]}'"):
        validate_submission(bad)


def test_validate_missing_and_unexpected_rows(uniform_submission: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=f"1 row\\(s\\) missing from the submission: '2_{TARGETS[3]}'"):
        validate_submission(uniform_submission.drop(index=[28]), study_ids=[1, 2])
    with pytest.raises(ValueError, match="25 row\\(s\\) missing"):
        validate_submission(uniform_submission, study_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=f"not asked for: '2_{TARGETS[0]}'"):
        validate_submission(uniform_submission, study_ids=[1])


def test_validate_nan_inf_negative(uniform_submission: pd.DataFrame) -> None:
    bad = uniform_submission.copy()
    bad.loc[2, "moderate"] = np.nan
    with pytest.raises(ValueError, match=f"NaN or inf probabilities in row\\(s\\) '1_{TARGETS[2]}'"):
        validate_submission(bad)
    bad = uniform_submission.copy()
    bad.loc[26, "severe"] = np.inf
    with pytest.raises(ValueError, match=f"NaN or inf.*'2_{TARGETS[1]}'"):
        validate_submission(bad)
    bad = uniform_submission.copy()
    bad.loc[0, ["normal_mild", "severe"]] = [1.5, -0.5 - 1 / 3]
    with pytest.raises(ValueError, match=f"negative probabilities in row\\(s\\) '1_{TARGETS[0]}'"):
        validate_submission(bad)
    bad = uniform_submission.copy().astype({"moderate": object})
    bad.loc[1, "moderate"] = "high"
    with pytest.raises(ValueError, match=f"non-numeric moderate.*'1_{TARGETS[1]}'"):
        validate_submission(bad)


def test_validate_bad_sums(uniform_submission: pd.DataFrame) -> None:
    bad = uniform_submission.copy()
    bad.loc[4, list(SUBMISSION_COLUMNS)] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=f"1 row\\(s\\) do not sum to 1.*'1_{TARGETS[4]}'"):
        validate_submission(bad)
    with pytest.warns(UserWarning, match="renormalised"):
        fixed = validate_submission(bad, on_bad_sum="renormalize")
    np.testing.assert_allclose(fixed.loc[4, list(SUBMISSION_COLUMNS)].to_numpy(float), [1 / 3] * 3)
    assert fixed[list(SUBMISSION_COLUMNS)].sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert bad.loc[4, "normal_mild"] == 0.5  # the input is not modified
    kept = validate_submission(bad, on_bad_sum="ignore")
    assert kept.loc[4, "normal_mild"] == 0.5
    bad.loc[5, list(SUBMISSION_COLUMNS)] = [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="summing to 0"):
        validate_submission(bad, on_bad_sum="renormalize")
    # Within tolerance is fine.
    near = uniform_submission.copy()
    near.loc[0, "normal_mild"] += 5e-7
    validate_submission(near)


def test_group_without_scored_rows_is_nan_and_left_out_of_total() -> None:
    labels = np.zeros((1, 25), dtype=np.int64)
    labels[0, 5:15] = IGNORE_INDEX  # no foraminal label at all
    result = score_arrays(labels, np.full((1, 25, 3), 1 / 3))
    assert math.isnan(result.foraminal)
    expected = (2 * math.log(3) + math.log(3 / 2)) / 3
    assert result.total == pytest.approx(expected, abs=1e-12)


def _graded(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn by the hard preset's readers and the exact posterior of each."""
    rng = np.random.default_rng(seed)
    severity = grading.severity_units(grading.sample_latents(rng, n, 0.5), grading.HARD_READERS)
    return grading.read_labels(rng, severity, grading.HARD_READERS), grading.posterior(severity, grading.HARD_READERS)


def test_the_true_posterior_is_calibrated_and_a_flattened_one_is_not():
    labels, posterior = _graded(6000, seed=0)
    weighted = metrics.metric_optimal(posterior)  # as a model trained with the metric's weights predicts
    calibrated = metrics.expected_calibration_error(metrics.calibration_table(labels, weighted))
    assert set(calibrated) == {"spinal", "foraminal", "subarticular"}
    assert max(calibrated.values()) < 0.01, calibrated
    flattened = np.sqrt(weighted) / np.sqrt(weighted).sum(axis=-1, keepdims=True)  # under-confident
    worse = metrics.expected_calibration_error(metrics.calibration_table(labels, flattened))
    assert min(worse.values()) > 0.03, worse


def test_unweighted_undoes_the_metric_weights():
    p = np.array([[0.7, 0.2, 0.1]])
    weighted = metrics.metric_optimal(p)
    np.testing.assert_allclose(weighted, [[0.7, 0.4, 0.4]] / np.float64(1.5))  # 1/2/4 times P, renormalised
    np.testing.assert_allclose(metrics.unweighted(weighted), p)


def test_calibration_table_skips_unscored_cells():
    labels, posterior = _graded(200, seed=1)
    labels[:, :5] = IGNORE_INDEX  # no spinal cell scored
    table = metrics.calibration_table(labels, posterior)
    assert set(table["group"]) == {"foraminal", "subarticular"}
    scored = int((labels[:, 5:15] != IGNORE_INDEX).sum())
    assert table[(table["group"] == "foraminal") & (table["severity"] == "Severe")]["count"].sum() == scored
