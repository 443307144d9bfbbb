"""The 2.5D severity classifier: a shared per-slice encoder, pooling over slices, per-condition-group heads.

Input: the 25 crops of a study, ``(B, 25, S, H, W)`` float32 in [0, 1] (one crop of ``S`` slices per target, in
:data:`lumbar_ray.constants.TARGETS` order), or with ``views = 2`` its 50 crops ``(B, 50, S, H, W)``: those 25, then
each target's second view in the same order (``crop.second_view``, :mod:`lumbar_ray.data.crops`). Output:
``(B, 25, 3)`` logits.

Per target crop:

1. Slice windows. With ``in_chans = 1`` every slice is one grey image. With ``in_chans = c > 1`` slice ``s`` is
   encoded together with its neighbours as a ``c``-channel image: the window holds slices
   ``s - (c - 1) // 2 ... s + c // 2`` (a sliding window, stride 1, so there are still ``S`` windows), and indices
   outside ``0 .. S - 1`` are clamped, i.e. the end slices are repeated (replicate padding).
2. Encoder (shared by all targets and slices) -> one feature vector per window.
3. Pooling over the ``S`` windows: ``attention`` (learned scores softmaxed over slices), ``lstm`` (a
   bidirectional LSTM, then attention) or ``mean``. The attention pools can also return their scores (the
   logits over the ``S`` slices, before the softmax): ``forward(crops, return_attention=True)``, which the
   auxiliary slice loss trains to point at the labelled slice (see :mod:`lumbar_ray.losses`).
4. Views (``views = 2`` only): each view's pooled feature gets a learned view embedding added, and the views of
   a target are fused by their mean over the views that are *present*. A view is present iff its crop is not all
   zeros: the data pipeline gives a view without a point (a subarticular target's second view, a missing series
   or point) an all-zero crop and nothing else is all-zero, and an all-zero crop carries no information, so masking
   it out is exact. A missing view is left out of the mean (its features are never used, whatever they are), not
   zeroed into it, so a target seen once is read as it is, not diluted towards zero. In training mode, layers
   with batch statistics (BatchNorm) still see every crop of the batch, as they see a one-view model's missing
   targets. A target with no view at all gets the zero vector here; its output is ignored (the loss masks it,
   prediction fills it with the prior) as with one view.
5. A learned target embedding (one per of the 25 targets) is added to the pooled (fused) feature, so the shared
   encoder's output is read knowing the condition and level (the severity prior differs a lot by level).
6. LayerNorm, dropout, then one linear head per condition group (spinal / foraminal / subarticular). The left
   and right targets of a condition share their group's head, because the left/right flip augmentation swaps
   them: a head per side would only learn what the embedding already can.

The heads' biases start at ``log(class_prior)`` and their weights near zero, so a fresh model predicts about
the class prior instead of a uniform 1/3 (which costs the weighted log loss a lot in the first steps).

Test-time flip (``tta_flip``, eval mode only): the prediction is the mean of the softmax probabilities of the crops
and of their left/right mirror, the mirror's sided targets swapped back (:func:`flip_tta`, with the training
flip's own rule :func:`lumbar_ray.data.augment.mirror_crops`). It lives in the network, so the validation (OOF)
predictions and the registered model, which both run the network in eval mode, apply it alike. The output is then
the log of those probabilities: valid logits (``softmax(log p) = p``), so every caller's softmax still holds.
With two views the mirror flips both blocks of 25 crops alike (the sided targets swap within each block).

With ``views = 1`` (the default) the network, its parameters and its outputs are exactly those of before views
existed: checkpoints of one-view models load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lumbar_ray.constants import (
    CONDITION_GROUPS,
    CONDITIONS,
    LEVELS,
    MAX_VIEWS,
    SEVERITIES,
    TARGETS,
    condition_group,
)
from lumbar_ray.data.augment import flip_permutation, mirror_crops

DEFAULT_CLASS_PRIOR: tuple[float, float, float] = (0.75, 0.18, 0.07)
"""Rough frequencies of Normal/Mild, Moderate and Severe in the RSNA 2024 training labels."""

POOLS: tuple[str, ...] = ("attention", "lstm", "mean")
"""Known slice poolings."""

# Head weights start this small (times 1/sqrt(dim)) so the initial logits are the log prior plus ~0.05 noise.
_HEAD_INIT_SCALE = 0.05
_MAX_ATTENTION_HIDDEN = 128
_MAX_LSTM_HIDDEN = 256


def slice_windows(stacks: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Group each slice with its neighbours as channels (sliding window, stride 1, replicate padding).

    Args:
        stacks: ``(N, S, H, W)``.
        in_chans: window length ``c``; the window of slice ``s`` holds slices ``s - (c-1)//2 .. s + c//2``,
            clamped to the stack.

    Returns:
        ``(N, S, c, H, W)``.
    """
    if in_chans == 1:
        return stacks.unsqueeze(2)
    n_slices = stacks.shape[1]
    before = (in_chans - 1) // 2
    offsets = torch.arange(-before, in_chans - before, device=stacks.device)
    index = (torch.arange(n_slices, device=stacks.device)[:, None] + offsets[None, :]).clamp(0, n_slices - 1)
    # Advanced indexing with an (S, c) index on dim 1 yields (N, S, c, H, W) directly.
    return stacks[:, index]


def present_views(crops: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` boolean: whether each of the ``N`` crops holds anything (a crop that is all zeros is a missing
    view, see the module docstring), from ``(B, N, S, H, W)`` crops."""
    return crops.flatten(start_dim=2).ne(0).any(dim=-1)


def flip_tta(logits_of: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    """The test-time left/right flip: log of the mean softmax of the crops and of their mirror image.

    The mirrored studies go through ``logits_of`` in the same batch as the originals; their outputs are for the
    mirrored targets (left foramen where the right one was), so they are swapped back with
    :func:`~lumbar_ray.data.augment.flip_permutation` (an involution) before averaging. Mirroring the input
    therefore swaps the output's left and right targets, exactly up to rounding.

    Args:
        logits_of: ``(B, 25 * views, S, H, W)`` crops -> ``(B, 25, 3)`` logits.
        crops: ``(B, 25 * views, S, H, W)``.

    Returns:
        ``(B, 25, 3)`` float32 log-probabilities.
    """
    batch = len(crops)
    log_probs = torch.log_softmax(logits_of(torch.cat([crops, mirror_crops(crops)])).float(), dim=-1)
    order = torch.as_tensor(flip_permutation(), device=crops.device)
    pair = torch.stack([log_probs[:batch], log_probs[batch:].index_select(1, order)])
    return torch.logsumexp(pair, dim=0) - math.log(2.0)  # log of the mean of the two probabilities, stably


class AttentionPool(nn.Module):
    """Attention over slices: ``softmax_s(w . tanh(V x_s))`` weights, then the weighted sum of ``x_s``."""

    has_attention = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = min(_MAX_ATTENTION_HIDDEN, dim)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, D)``."""
        return self.forward_with_scores(features)[0]

    def forward_with_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, S, D)`` -> the pooled ``(N, D)`` and the attention logits ``(N, S)`` (before the softmax)."""
        scores = self.score(features)
        weights = torch.softmax(scores, dim=1)
        return (weights * features).sum(dim=1), scores.squeeze(-1)


class MeanPool(nn.Module):
    """Plain mean over slices."""

    has_attention = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, D)``."""
        return features.mean(dim=1)


class LSTMPool(nn.Module):
    """A bidirectional LSTM over the slices (context from both sides), then attention pooling."""

    has_attention = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = min(_MAX_LSTM_HIDDEN, max(8, dim // 2))
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.attention = AttentionPool(2 * hidden)
        self.out_dim = 2 * hidden

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, S, D)`` -> ``(N, out_dim)``."""
        return self.forward_with_scores(features)[0]

    def forward_with_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, S, D)`` -> the pooled ``(N, out_dim)`` and the attention logits ``(N, S)``."""
        sequence, _ = self.lstm(features)
        return self.attention.forward_with_scores(sequence)


def pool_has_attention(name: str) -> bool:
    """Whether the slice pooling called ``name`` has attention logits (what the auxiliary slice loss trains)."""
    return bool(make_pool(name, 8).has_attention)


def make_pool(name: str, dim: int) -> nn.Module:
    """The slice pooling called ``name`` for ``dim``-wide features.

    Every pool has an ``out_dim`` and a ``has_attention`` attribute; those with attention also have
    ``forward_with_scores`` (the pooled features and the attention logits over the slices).

    Raises:
        ValueError: on an unknown name.
    """
    pools = {"attention": AttentionPool, "lstm": LSTMPool, "mean": MeanPool}
    if name not in pools:
        raise ValueError(f"unknown pool {name!r}; expected one of {POOLS}")
    return pools[name](dim)


class SeverityNet(nn.Module):
    """Crops ``(B, 25 * views, S, H, W)`` -> logits ``(B, 25, 3)``; see the module docstring for the recipe.

    Args:
        encoder: maps ``(N, in_chans, H, W)`` to ``(N, feature_dim)``.
        feature_dim: width of the encoder's output.
        in_chans: adjacent slices per encoder input (see :func:`slice_windows`).
        pool: ``attention``, ``lstm`` or ``mean``.
        dropout: before the heads.
        class_prior: class frequencies the heads start at.
        tta_flip: in eval mode, predict with the test-time flip (:func:`flip_tta`).
        views: crops per target (1, or 2 with ``crop.second_view``); more than one adds the view embedding.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        in_chans: int = 1,
        pool: str = "attention",
        dropout: float = 0.1,
        class_prior: tuple[float, ...] = DEFAULT_CLASS_PRIOR,
        tta_flip: bool = False,
        views: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= views <= MAX_VIEWS:
            raise ValueError(f"views must be 1 to {MAX_VIEWS}, got {views}")
        self.tta_flip = tta_flip
        self.views = views
        self.encoder = encoder
        self.in_chans = in_chans
        self.pool = make_pool(pool, feature_dim)
        dim = self.pool.out_dim
        self.target_embedding = nn.Embedding(len(TARGETS), dim)
        nn.init.normal_(self.target_embedding.weight, std=0.02)
        if views > 1:  # a one-view model keeps exactly its former parameters (old checkpoints load)
            self.view_embedding = nn.Embedding(views, dim)
            nn.init.normal_(self.view_embedding.weight, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({group: nn.Linear(dim, len(SEVERITIES)) for group in CONDITION_GROUPS})
        self.reset_heads(class_prior)
        groups = [condition_group(CONDITIONS[t // len(LEVELS)]) for t in range(len(TARGETS))]
        order = [t for group in CONDITION_GROUPS for t in range(len(TARGETS)) if groups[t] == group]
        # Heads run group by group; `inverse` puts their concatenated outputs back into TARGETS order.
        for group in CONDITION_GROUPS:
            indices = torch.tensor([t for t in order if groups[t] == group], dtype=torch.long)
            self.register_buffer(f"_targets_{group}", indices, persistent=False)
        self.register_buffer("_inverse", torch.argsort(torch.tensor(order)), persistent=False)

    def reset_heads(self, class_prior: tuple[float, ...]) -> None:
        """Near-zero head weights and ``log(prior)`` biases: a fresh model predicts the (normalised) prior."""
        prior = torch.tensor(class_prior, dtype=torch.float32)
        if prior.shape != (len(SEVERITIES),) or (prior <= 0).any():
            raise ValueError(f"class_prior must be {len(SEVERITIES)} positive values, got {class_prior}")
        log_prior = torch.log(prior / prior.sum())
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=_HEAD_INIT_SCALE / math.sqrt(head.in_features))
            with torch.no_grad():
                head.bias.copy_(log_prior)

    @property
    def has_slice_attention(self) -> bool:
        """Whether the slice pooling has attention logits (``forward(..., return_attention=True)`` works)."""
        return bool(self.pool.has_attention)

    def forward(
        self, crops: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, 25 * views, S, H, W)`` float crops -> ``(B, 25, 3)`` logits (with ``tta_flip``, in eval mode, the
        log-probabilities of :func:`flip_tta`; training never sees the test-time flip).

        A keyword of ``forward`` rather than a method of its own, so that a DDP-wrapped model (Ray Train) still
        goes through DDP's forward, which prepares the gradient synchronisation. Prediction (the registered model)
        calls ``model(crops)``: the default output is the logits alone.

        Args:
            crops: the study crops.
            return_attention: also return the slice pooling's attention logits ``(B, 25, S)`` of each target's
                own crop (the first view; before the softmax over the ``S`` slices), as ``(logits, attention)``;
                never with the test-time flip.

        Raises:
            ValueError: if ``crops`` is not 5-d with 25 crops per view, or attention is asked of a pool without it.
        """
        n_crops = len(TARGETS) * self.views
        if crops.ndim != 5 or crops.shape[1] != n_crops:
            raise ValueError(f"crops must have shape (B, {n_crops}, S, H, W) ({self.views} view(s) of the "
                             f"{len(TARGETS)} targets), got {tuple(crops.shape)}")  # fmt: skip
        if return_attention and not self.has_slice_attention:
            raise ValueError(f"the slice pooling {type(self.pool).__name__} has no attention to return")
        if self.tta_flip and not self.training and not return_attention:
            return flip_tta(self.logits, crops)
        return self.logits(crops, return_attention)

    def logits(
        self, crops: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The network itself, without the test-time flip (see :meth:`forward` for the arguments)."""
        batch, n_crops, n_slices, height, width = crops.shape
        stacks = crops.reshape(batch * n_crops, n_slices, height, width)
        present = present_views(crops) if self.views > 1 else None
        if present is not None and present.any():
            # Only the crops that exist are encoded: a two-view study has 10 second views that never do (the
            # subarticular targets), and batch-statistics layers must not learn from empty crops eval never fuses.
            keep = present.reshape(-1)
            encoded = self.encode(stacks[keep])
            sequence = encoded.new_zeros((len(stacks), *encoded.shape[1:])).index_put((keep,), encoded)
        else:
            sequence = self.encode(stacks)
        if return_attention:
            pooled, attention = self.pool.forward_with_scores(sequence)
        else:
            pooled, attention = self.pool(sequence), None
        pooled = pooled.reshape(batch, n_crops, -1)
        if present is not None:
            pooled = self.fuse_views(pooled, present)
        hidden = self.dropout(self.norm(pooled + self.target_embedding.weight))
        logits = [head(hidden[:, getattr(self, f"_targets_{group}")]) for group, head in self.heads.items()]
        logits = torch.cat(logits, dim=1)[:, self._inverse]
        if attention is None:
            return logits
        return logits, attention.reshape(batch, n_crops, n_slices)[:, : len(TARGETS)]

    def encode(self, stacks: torch.Tensor) -> torch.Tensor:
        """``(N, S, H, W)`` crops -> ``(N, S, D)``: each slice's window (:func:`slice_windows`) through the encoder."""
        n_stacks, n_slices, height, width = stacks.shape
        windows = slice_windows(stacks, self.in_chans)
        return self.encoder(windows.reshape(-1, self.in_chans, height, width)).reshape(n_stacks, n_slices, -1)

    def fuse_views(self, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Each target's views, view embedding added, averaged over the views that are present.

        Args:
            pooled: ``(B, 25 * views, D)`` pooled features, view-major.
            present: ``(B, 25 * views)`` whether each view is present (:func:`present_views`).

        Returns:
            ``(B, 25, D)``; zero for a target without any view.
        """
        batch = len(pooled)
        views = pooled.reshape(batch, self.views, len(TARGETS), -1) + self.view_embedding.weight[None, :, None, :]
        present = present.reshape(batch, self.views, len(TARGETS), 1)
        # `where`, not a product: a missing view's features never reach the sum, even as 0 * inf = nan.
        total = torch.where(present, views, torch.zeros((), dtype=views.dtype, device=views.device)).sum(dim=1)
        return total / present.sum(dim=1).clamp_min(1).to(views.dtype)
