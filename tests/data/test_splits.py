"""Study-grouped, label-stratified folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.splits import load_folds, make_folds, save_folds
from lumbar_ray.labels import encode_labels


@pytest.fixture(scope="module")
def real_labels(real_rsna_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_rsna(real_rsna_dir)
    return encode_labels(data.train)


def test_every_study_in_exactly_one_fold(real_labels) -> None:
    study_ids, labels = real_labels
    folds = make_folds(study_ids, labels, n_folds=5, seed=42)
    assert list(folds.columns) == ["study_id", "fold"]
    assert len(folds) == len(study_ids)
    assert folds["study_id"].is_unique
    assert set(folds["study_id"]) == set(study_ids.tolist())
    assert set(folds["fold"]) == {0, 1, 2, 3, 4}
    assert folds["fold"].dtype == np.int64


def test_deterministic_and_seeded(real_labels) -> None:
    study_ids, labels = real_labels
    first = make_folds(study_ids, labels, seed=7)
    pd.testing.assert_frame_equal(first, make_folds(study_ids, labels, seed=7))
    other = make_folds(study_ids, labels, seed=8)
    assert (first["fold"] != other["fold"]).mean() > 0.5
    # Independent of the input order.
    order = np.random.default_rng(0).permutation(len(study_ids))
    pd.testing.assert_frame_equal(first, make_folds(study_ids[order], labels[order], seed=7))


def test_folds_are_balanced(real_labels) -> None:
    study_ids, labels = real_labels
    folds = make_folds(study_ids, labels, n_folds=5, seed=42)
    fold = folds.set_index("study_id")["fold"].reindex(study_ids).to_numpy()
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1
    any_severe_spinal = (labels[:, :5] == 2).any(axis=1)
    n_severe = (labels == 2).sum(axis=1)
    n_moderate = (labels == 1).sum(axis=1)
    for k in range(5):
        held_out = fold == k
        assert any_severe_spinal[held_out].mean() == pytest.approx(any_severe_spinal.mean(), abs=0.015)
        assert n_severe[held_out].mean() == pytest.approx(n_severe.mean(), abs=0.1)
        assert n_moderate[held_out].mean() == pytest.approx(n_moderate.mean(), abs=0.15)


def test_small_and_degenerate_inputs() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 0, 0, 1, 2, IGNORE_INDEX], size=(12, 25))
    folds = make_folds(np.arange(100, 112), labels, n_folds=3, seed=0)
    assert sorted(np.bincount(folds["fold"])) == [4, 4, 4]
    with pytest.raises(ValueError, match="unique"):
        make_folds(np.array([1, 1, 2]), np.zeros((3, 25), dtype=int), n_folds=2)
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(np.arange(3), np.zeros((3, 25), dtype=int), n_folds=4)
    with pytest.raises(ValueError, match="shape"):
        make_folds(np.arange(3), np.zeros((3, 24), dtype=int), n_folds=2)


def test_save_load_round_trip(tmp_path: Path, real_labels) -> None:
    study_ids, labels = real_labels
    folds = make_folds(study_ids, labels)
    path = save_folds(folds, tmp_path / "sub" / "folds.csv")
    pd.testing.assert_frame_equal(load_folds(path), folds)
    pd.DataFrame({"study_id": [1, 1], "fold": [0, 1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="twice"):
        load_folds(tmp_path / "bad.csv")
    pd.DataFrame({"study_id": [1]}).to_csv(tmp_path / "nofold.csv", index=False)
    with pytest.raises(ValueError, match="fold"):
        load_folds(tmp_path / "nofold.csv")
