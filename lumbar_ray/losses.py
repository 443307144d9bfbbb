"""The training loss: the competition metric written in differentiable form.

:class:`SeverityLoss` computes, from logits, the same four terms as :func:`lumbar_ray.metrics.score_arrays`:

* ``spinal``, ``foraminal``, ``subarticular``: per condition group, the cross-entropy of every labelled cell,
  weighted by ``class_weights[true class]`` and normalised by the sum of those weights;
* ``any_severe``: per study with at least one labelled spinal level, the binary cross-entropy of
  ``P(any severe) = max over its labelled spinal levels of P(severe)`` against "some labelled level is severe",
  weighted by the largest class weight among its labelled spinal levels (4 if one is severe), normalised by the
  sum of those weights.

``total = (spinal + foraminal + subarticular + any_severe_weight * any_severe) / (3 + any_severe_weight)``, a
weighted mean of the terms: with ``any_severe_weight = 1`` it is the metric's plain mean of the four terms (its
``total``), with 0 the mean of the three group terms. A term without any labelled cell in the batch is left out
of the mean (its weight drops from the denominator, as the metric's ``nanmean``) and reported as 0.0 in
``parts``. A batch without any labelled cell gives a zero ``total`` that is still attached to the graph.

The auxiliary slice term (``aux_slice_weight > 0``; the 1st place of RSNA 2024 measured 0.4259 -> 0.4062 on the
private leaderboard with it): the slice pooling's attention logits over the ``S`` slices of each target's crop
are trained, by a plain cross-entropy averaged over the targets whose labelled slice lies in their crop
(``slice_target``, :data:`IGNORE_INDEX` elsewhere; see :class:`lumbar_ray.data.crops.CropDataset`), to point at
that slice. It is added on top of the severity terms' mean, ``total += aux_slice_weight * aux_slice``, rather
than entering the mean, so switching it on leaves the scale of the severity loss (and the learning rate tuned
for it) alone. Without attention logits (evaluation, where only probabilities exist) or without any usable slice
target in the batch it adds nothing and ``parts["aux_slice"]`` is 0.0. Near the edge of a block of slices a crop
repeats its end slice (the crop never mixes blocks); when the labelled slice is repeated ``k`` times the plain
attention pool gives the copies the same logit, so the term cannot fall below ``log(k)`` for that target, but its
gradient vanishes once the copies share the attention the labelled slice should get: it reads higher, it does not
pull the attention anywhere else.

Unlike the metric the probabilities are not clipped: everything is computed from ``log_softmax``, which is
finite for finite logits, and ``log(1 - P(severe))`` is taken as ``logsumexp`` of the other two classes' log
probabilities instead of ``log1p(-p)``, which would lose all precision as ``p -> 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lumbar_ray.config import LossConfig
from lumbar_ray.constants import CONDITION_GROUPS, GROUP_TARGET_INDICES, IGNORE_INDEX, SEVERITIES, TARGETS

_SEVERE = SEVERITIES.index("Severe")
_GROUP_COLUMNS: dict[str, list[int]] = {group: list(columns) for group, columns in GROUP_TARGET_INDICES.items()}
_SPINAL_COLUMNS = _GROUP_COLUMNS["spinal"]
PART_NAMES: tuple[str, ...] = (*CONDITION_GROUPS, "any_severe", "aux_slice")
"""Keys of :attr:`LossOutput.parts`."""


@dataclass
class LossOutput:
    """What :class:`SeverityLoss` returns.

    Attributes:
        total: scalar tensor to back-propagate.
        parts: the detached value of each term (keys :data:`PART_NAMES`), 0.0 for a term without labels.
    """

    total: torch.Tensor
    parts: dict[str, float]


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """``sum(w * loss) / sum(w)``, or None when there is no row."""
    if losses.numel() == 0:
        return None
    return (weights * losses).sum() / weights.sum()


class SeverityLoss(nn.Module):
    """Class-weighted cross-entropy per condition group, the any-severe-spinal term and the auxiliary slice term
    (see the module docstring).

    Args:
        cfg: ``class_weights`` (by true class; the metric's are 1, 2, 4), ``any_severe_weight`` and
            ``aux_slice_weight``.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.any_severe_weight = float(cfg.any_severe_weight)
        self.aux_slice_weight = float(cfg.aux_slice_weight)
        self.register_buffer("class_weights", torch.tensor(cfg.class_weights, dtype=torch.float32), persistent=False)

    @property
    def uses_slice_attention(self) -> bool:
        """Whether the loss wants the model's slice attention logits (``slice_logits``)."""
        return self.aux_slice_weight > 0

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        slice_logits: torch.Tensor | None = None,
        slice_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        """Loss of ``(B, 25, 3)`` logits against ``(B, 25)`` int64 class ids (:data:`IGNORE_INDEX` = unlabelled).

        Args:
            logits: severity logits.
            labels: class ids.
            slice_logits: ``(B, 25, S)`` attention logits over each crop's slices, for the auxiliary slice term
                (None, or ``aux_slice_weight = 0``: the term is left out).
            slice_targets: ``(B, 25)`` int64 index of the labelled slice in each crop, :data:`IGNORE_INDEX`
                where unknown; required with ``slice_logits``.

        Raises:
            ValueError: on mismatched shapes, or ``slice_logits`` without valid ``slice_targets``.
        """
        if logits.ndim != 3 or logits.shape[1:] != (len(TARGETS), len(SEVERITIES)) or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"expected logits (B, {len(TARGETS)}, {len(SEVERITIES)}) and labels (B, {len(TARGETS)}), "
                f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        weights = self.class_weights.to(log_probs.device)
        terms: dict[str, torch.Tensor | None] = {}
        for group, columns in _GROUP_COLUMNS.items():
            terms[group] = self._group_term(log_probs[:, columns], labels[:, columns], weights)
        terms["any_severe"] = self._any_severe_term(log_probs[:, _SPINAL_COLUMNS], labels[:, _SPINAL_COLUMNS], weights)
        term_weights = {name: 1.0 for name in CONDITION_GROUPS} | {"any_severe": self.any_severe_weight}
        present = [(term_weights[name], value) for name, value in terms.items() if value is not None]
        denominator = sum(weight for weight, _ in present)
        if denominator > 0:
            total = sum(weight * value for weight, value in present) / denominator
        else:
            # Nothing labelled: a zero that still depends on the logits, so backward() and DDP work unchanged.
            total = logits.sum() * 0.0
        terms["aux_slice"] = None
        if self.aux_slice_weight > 0 and slice_logits is not None:
            terms["aux_slice"] = self._aux_slice_term(slice_logits, slice_targets, labels.shape)
            if terms["aux_slice"] is not None:
                total = total + self.aux_slice_weight * terms["aux_slice"]
        parts = {name: float(value.detach()) if value is not None else 0.0 for name, value in terms.items()}
        return LossOutput(total=total, parts=parts)

    @staticmethod
    def _aux_slice_term(
        slice_logits: torch.Tensor, slice_targets: torch.Tensor | None, shape: torch.Size
    ) -> torch.Tensor | None:
        """Mean cross-entropy of the attention logits ``(B, 25, S)`` against the labelled slice of each crop."""
        if slice_targets is None:
            raise ValueError("slice_logits need slice_targets (the labelled slice's index in each crop)")
        if slice_logits.ndim != 3 or slice_logits.shape[:2] != shape or slice_targets.shape != shape:
            raise ValueError(
                f"expected slice_logits (B, {len(TARGETS)}, S) and slice_targets (B, {len(TARGETS)}), "
                f"got {tuple(slice_logits.shape)} and {tuple(slice_targets.shape)}"
            )
        known = slice_targets != IGNORE_INDEX
        if not known.any():
            return None  # cross_entropy's mean over no target would be NaN
        targets = slice_targets[known]
        if (targets < 0).any() or (targets >= slice_logits.shape[2]).any():
            raise ValueError(f"slice_targets must be IGNORE_INDEX or in 0..{slice_logits.shape[2] - 1}")
        return nn.functional.cross_entropy(slice_logits[known].float(), targets)

    @staticmethod
    def _group_term(log_probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """Class-weighted cross-entropy of the labelled cells of one group (``(B, k, 3)``, ``(B, k)``)."""
        scored = labels != IGNORE_INDEX
        true_class = labels[scored]
        nll = -log_probs[scored].gather(1, true_class[:, None])[:, 0]
        return _weighted_mean(nll, weights[true_class])

    @staticmethod
    def _any_severe_term(
        spinal_log_probs: torch.Tensor, spinal_labels: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor | None:
        """Weighted binary cross-entropy of max-over-levels P(severe), one row per study with a spinal label."""
        scored = spinal_labels != IGNORE_INDEX
        studies = scored.any(dim=1)
        scored, spinal_labels, spinal_log_probs = scored[studies], spinal_labels[studies], spinal_log_probs[studies]
        if not studies.any():
            return None
        target = ((spinal_labels == _SEVERE) & scored).any(dim=1)
        # The metric's prediction is the max P(severe) over labelled levels; log is monotonic, so take the
        # argmax level's log probabilities and read both log p and log(1 - p) from that level.
        severe = spinal_log_probs[..., _SEVERE].masked_fill(~scored, float("-inf"))
        level = severe.argmax(dim=1, keepdim=True)
        chosen = spinal_log_probs.gather(1, level[..., None].expand(-1, -1, len(SEVERITIES)))[:, 0]
        log_p = chosen[:, _SEVERE]
        not_severe = [c for c in range(len(SEVERITIES)) if c != _SEVERE]
        log_not_p = torch.logsumexp(chosen[:, not_severe], dim=1)
        nll = -torch.where(target, log_p, log_not_p)
        class_weight = torch.where(scored, weights[spinal_labels.clamp(min=0)], torch.zeros_like(weights[:1]))
        return _weighted_mean(nll, class_weight.max(dim=1).values)
