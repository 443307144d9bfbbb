"""Figures of a CV run: the numbers behind them, their panels, and rendering without pyplot."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from lumbar_ray import plots
from lumbar_ray.constants import IGNORE_INDEX, SEVERITY_WEIGHTS, target_index
from lumbar_ray.metrics import score_arrays


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(40, 25))
    labels[rng.random(labels.shape) < 0.1] = IGNORE_INDEX
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=(40, 25))
    return labels, probs


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_confusion_counts_by_hand() -> None:
    labels = np.full((2, 25), IGNORE_INDEX)
    probs = np.zeros((2, 25, 3))
    probs[..., 0] = 1.0
    spinal, left_sub = (
        target_index("spinal_canal_stenosis", "l1_l2"),
        target_index("left_subarticular_stenosis", "l5_s1"),
    )
    labels[0, spinal], probs[0, spinal] = 2, [0.1, 0.2, 0.7]  # severe predicted severe
    labels[1, spinal] = 1  # moderate predicted normal
    labels[1, left_sub], probs[1, left_sub] = 0, [0.2, 0.5, 0.3]  # normal predicted moderate
    counts = plots.confusion_counts(labels, probs)
    assert counts.shape == (5, 3, 3)
    assert counts[0, 2, 2] == 1 and counts[0, 1, 0] == 1 and counts[0].sum() == 2
    assert counts[3, 0, 1] == 1 and counts[3].sum() == 1
    assert counts.sum() == 3  # IGNORE_INDEX cells are not counted


def test_confusion_matrices_panels(arrays) -> None:
    labels, probs = arrays
    figure = plots.confusion_matrices(labels, probs)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 5
    counts = plots.confusion_counts(labels, probs)
    # colours are row-normalised: each row of a panel's image sums to 1
    image = figure.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(image).sum(axis=1), 1.0)
    assert sum(int(text.get_text()) for text in figure.axes[0].texts) == counts[0].sum() == (labels[:, :5] >= 0).sum()
    assert _png(figure).startswith(b"\x89PNG")


def test_level_scores_match_direct_computation(arrays) -> None:
    labels, probs = arrays
    weights = np.asarray(SEVERITY_WEIGHTS)
    expected = np.empty(25)
    for t in range(25):
        scored = labels[:, t] != IGNORE_INDEX
        true = labels[scored, t]
        p = probs[scored, t, true]
        expected[t] = np.sum(weights[true] * -np.log(p)) / np.sum(weights[true])
    figure = plots.level_score_heatmap(labels, probs)
    assert len(figure.axes) == 2  # the map and its colour bar
    np.testing.assert_allclose(np.asarray(figure.axes[0].images[0].get_array()), expected.reshape(5, 5), rtol=1e-12)
    np.testing.assert_allclose(plots.level_scores(labels, probs), expected.reshape(5, 5), rtol=1e-12)


def test_level_score_equals_metric_term_for_a_single_scored_target(arrays) -> None:
    labels, probs = arrays
    only = np.full_like(labels, IGNORE_INDEX)
    column = target_index("spinal_canal_stenosis", "l3_l4")
    only[:, column] = labels[:, column]
    scores = plots.level_scores(only, probs)
    assert scores[0, 2] == pytest.approx(score_arrays(only, probs).spinal, rel=1e-12)
    assert np.isnan(scores).sum() == 24  # targets without a scored cell are NaN, not 0


def test_level_scores_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected labels"):
        plots.level_scores(np.zeros((3, 24), int), np.zeros((3, 24, 3)))


def test_training_curves() -> None:
    history = [
        {"epoch": 0, "train_loss": 1.0, "val_loss": 0.9, "val_score": 0.8},
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.8, "val_score": 0.6},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.85, "val_score": 0.7},
    ]
    figure = plots.training_curves(history)
    assert len(figure.axes) == 2
    loss_ax, score_ax = figure.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    np.testing.assert_allclose(lines["val_loss"].get_ydata(), [0.9, 0.8, 0.85])
    np.testing.assert_allclose(score_ax.get_lines()[0].get_ydata(), [0.8, 0.6, 0.7])
    best = [line for line in score_ax.get_lines() if line.get_label().startswith("best")]
    assert best and best[0].get_xdata()[0] == 1  # the best epoch is marked
    assert _png(figure).startswith(b"\x89PNG")
    assert _png(plots.training_curves([])).startswith(b"\x89PNG")  # a fold resumed with no epoch left


def test_import_does_not_touch_pyplot() -> None:
    code = "import sys, lumbar_ray.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
