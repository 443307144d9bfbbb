"""SeverityLoss is the competition metric in differentiable form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lumbar_ray.config import LossConfig
from lumbar_ray.constants import IGNORE_INDEX, TARGETS
from lumbar_ray.losses import PART_NAMES, LossOutput, SeverityLoss
from lumbar_ray.metrics import score_arrays

N_TARGETS = len(TARGETS)


def _random_case(n: int, seed: int, ignore_rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=(n, N_TARGETS))
    labels = rng.integers(0, 3, size=(n, N_TARGETS))
    labels[rng.random((n, N_TARGETS)) < ignore_rate] = IGNORE_INDEX
    return labels, probs


def _loss(labels: np.ndarray, probs: np.ndarray, cfg: LossConfig | None = None) -> LossOutput:
    logits = torch.tensor(np.log(probs), dtype=torch.float64)
    return SeverityLoss(cfg or LossConfig())(logits, torch.tensor(labels, dtype=torch.int64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_and_total_match_the_metric(seed: int) -> None:
    labels, probs = _random_case(24, seed)
    expected = score_arrays(labels, probs)
    output = _loss(labels, probs)
    assert set(output.parts) == set(PART_NAMES) == {"spinal", "foraminal", "subarticular", "any_severe", "aux_slice"}
    assert output.parts["aux_slice"] == 0.0  # off by default
    for part, metric_name in [
        ("spinal", "spinal"),
        ("foraminal", "foraminal"),
        ("subarticular", "subarticular"),
        ("any_severe", "any_severe_spinal"),
    ]:
        assert output.parts[part] == pytest.approx(getattr(expected, metric_name), abs=1e-5)
    assert float(output.total) == pytest.approx(expected.total, abs=1e-5)


def test_any_severe_uses_the_max_over_labelled_levels_only() -> None:
    labels = np.zeros((1, N_TARGETS), dtype=np.int64)
    probs = np.tile([0.8, 0.15, 0.05], (1, N_TARGETS, 1))
    # Spinal level 0 is unlabelled but has a high P(severe): the metric must not read it, nor may the loss.
    labels[0, 0] = IGNORE_INDEX
    probs[0, 0] = [0.1, 0.1, 0.8]
    labels[0, 2] = 2  # a severe spinal level -> target 1, weight 4
    probs[0, 2] = [0.3, 0.3, 0.4]
    output = _loss(labels, probs)
    assert output.parts["any_severe"] == pytest.approx(-math.log(0.4), abs=1e-6)
    assert output.parts["any_severe"] == pytest.approx(score_arrays(labels, probs).any_severe_spinal, abs=1e-6)


def test_ignored_cells_do_not_change_the_loss() -> None:
    labels, probs = _random_case(8, 3)
    base = _loss(labels, probs)
    changed = probs.copy()
    changed[labels == IGNORE_INDEX] = [0.001, 0.001, 0.998]
    assert float(_loss(labels, changed).total) == pytest.approx(float(base.total), abs=1e-6)


def test_group_without_labels_drops_out_of_the_total() -> None:
    labels, probs = _random_case(8, 4, ignore_rate=0.0)
    labels[:, 15:] = IGNORE_INDEX  # no subarticular label at all
    output = _loss(labels, probs)
    expected = score_arrays(labels, probs)  # nanmean over the remaining three terms
    assert output.parts["subarticular"] == 0.0
    assert float(output.total) == pytest.approx(expected.total, abs=1e-5)


def test_all_ignored_batch_gives_zero_with_grad() -> None:
    logits = torch.randn(3, N_TARGETS, 3, requires_grad=True)
    labels = torch.full((3, N_TARGETS), IGNORE_INDEX, dtype=torch.int64)
    output = SeverityLoss(LossConfig())(logits, labels)
    assert float(output.total.detach()) == 0.0
    assert output.total.requires_grad
    output.total.backward()
    assert torch.isfinite(logits.grad).all()
    assert all(value == 0.0 for value in output.parts.values())


def test_class_weights_change_the_value() -> None:
    labels, probs = _random_case(8, 5)
    weighted = _loss(labels, probs)
    unweighted = _loss(labels, probs, LossConfig(class_weights=(1.0, 1.0, 1.0)))
    assert weighted.parts["spinal"] != pytest.approx(unweighted.parts["spinal"], abs=1e-4)
    # With equal weights a group term is the plain mean NLL over its labelled cells.
    columns = list(range(5, 15))
    group_labels = labels[:, columns]
    scored = group_labels != IGNORE_INDEX
    nll = -np.log(np.take_along_axis(probs[:, columns][scored], group_labels[scored][:, None], axis=1))
    assert unweighted.parts["foraminal"] == pytest.approx(float(nll.mean()), abs=1e-5)


def test_any_severe_weight_zero_removes_the_term() -> None:
    labels, probs = _random_case(8, 6)
    output = _loss(labels, probs, LossConfig(any_severe_weight=0.0))
    groups = [output.parts[name] for name in ("spinal", "foraminal", "subarticular")]
    assert float(output.total) == pytest.approx(sum(groups) / 3, abs=1e-6)
    doubled = _loss(labels, probs, LossConfig(any_severe_weight=2.0))
    assert float(doubled.total) == pytest.approx((sum(groups) + 2 * output.parts["any_severe"]) / 5, abs=1e-6)


def test_gradients_are_finite_even_for_extreme_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 80.0]] * N_TARGETS, [[80.0, 0.0, -80.0]] * N_TARGETS], requires_grad=True)
    labels = torch.zeros((2, N_TARGETS), dtype=torch.int64)
    labels[1, 3] = 2
    output = SeverityLoss(LossConfig())(logits, labels)
    value = float(output.total.detach())
    assert math.isfinite(value)
    assert value > 10  # confidently wrong predictions cost a lot, not NaN or a clipped 0
    output.total.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="logits"):
        SeverityLoss(LossConfig())(torch.zeros(2, 24, 3), torch.zeros(2, 24, dtype=torch.int64))


# --- the auxiliary slice term


def _slice_case(batch: int, slices: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention logits ``(B, 25, S)`` and slice targets with some unknown (IGNORE_INDEX) ones."""
    generator = torch.Generator().manual_seed(seed)
    slice_logits = torch.randn(batch, N_TARGETS, slices, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, slices, (batch, N_TARGETS), generator=generator)
    targets[torch.rand(batch, N_TARGETS, generator=generator) < 0.3] = IGNORE_INDEX
    return slice_logits, targets


def test_aux_slice_is_the_mean_cross_entropy_of_known_slices_added_to_the_total() -> None:
    labels, probs = _random_case(6, 7)
    logits = torch.tensor(np.log(probs))
    slice_logits, targets = _slice_case(6, 5, seed=0)
    plain = SeverityLoss(LossConfig())(logits, torch.tensor(labels))
    output = SeverityLoss(LossConfig(aux_slice_weight=0.5))(logits, torch.tensor(labels), slice_logits, targets)
    known = targets != IGNORE_INDEX
    log_p = torch.log_softmax(slice_logits, dim=-1)[known].gather(1, targets[known][:, None])
    expected = float(-log_p.mean())
    assert output.parts["aux_slice"] == pytest.approx(expected, abs=1e-6) and expected > 0
    assert float(output.total) == pytest.approx(float(plain.total) + 0.5 * expected, abs=1e-6)
    for name in ("spinal", "foraminal", "subarticular", "any_severe"):
        assert output.parts[name] == pytest.approx(plain.parts[name], abs=1e-9)  # the severity terms are untouched
    # Unknown slices do not count, whatever their logits.
    changed = slice_logits.clone()
    changed[~known] = 50.0 * torch.randn_like(changed[~known])
    again = SeverityLoss(LossConfig(aux_slice_weight=0.5))(logits, torch.tensor(labels), changed, targets)
    assert again.parts["aux_slice"] == pytest.approx(output.parts["aux_slice"], abs=1e-7)


def test_aux_slice_off_or_without_known_slices_adds_nothing() -> None:
    labels, probs = _random_case(4, 8)
    logits, labels = torch.tensor(np.log(probs)), torch.tensor(labels)
    slice_logits, targets = _slice_case(4, 3, seed=1)
    plain = SeverityLoss(LossConfig())(logits, labels)
    off = SeverityLoss(LossConfig(aux_slice_weight=0.0))(logits, labels, slice_logits, targets)
    assert float(off.total) == float(plain.total) and off.parts["aux_slice"] == 0.0
    unknown = torch.full_like(targets, IGNORE_INDEX)
    nothing = SeverityLoss(LossConfig(aux_slice_weight=1.0))(logits, labels, slice_logits, unknown)
    assert float(nothing.total) == pytest.approx(float(plain.total), abs=1e-12) and nothing.parts["aux_slice"] == 0.0
    # Evaluation passes probabilities only: the term is left out, not an error.
    assert float(SeverityLoss(LossConfig(aux_slice_weight=1.0))(logits, labels).total) == float(plain.total)


def test_aux_slice_rejects_missing_or_impossible_targets() -> None:
    labels = torch.zeros((2, N_TARGETS), dtype=torch.int64)
    logits = torch.zeros((2, N_TARGETS, 3))
    loss_fn = SeverityLoss(LossConfig(aux_slice_weight=1.0))
    slice_logits = torch.zeros((2, N_TARGETS, 3))
    with pytest.raises(ValueError, match="slice_targets"):
        loss_fn(logits, labels, slice_logits)
    with pytest.raises(ValueError, match="slice_targets must be IGNORE_INDEX or in 0..2"):
        loss_fn(logits, labels, slice_logits, torch.full((2, N_TARGETS), 3))
    with pytest.raises(ValueError, match="slice_logits"):
        loss_fn(logits, labels, torch.zeros((2, 24, 3)), torch.zeros((2, 24), dtype=torch.int64))
