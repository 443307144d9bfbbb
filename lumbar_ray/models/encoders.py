"""Per-slice image encoders: timm models, plus a tiny built-in CNN for CPU tests and the quickstart.

Every encoder maps ``(N, in_chans, H, W)`` to ``(N, num_features)`` (global average pooled, no classifier), so
the slice pooling and heads of :class:`lumbar_ray.models.net.SeverityNet` never depend on the backbone.
"""

from __future__ import annotations

import logging

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

logger = logging.getLogger(__name__)

TINY_CNN = "tiny_cnn"
"""Encoder name of the built-in :class:`TinyCNN` (not a timm model)."""


class TinyCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks then global average pooling.

    Exists because the smallest timm ``test_*`` models still cost ~0.2-0.4 s for a quickstart-sized batch
    (1000 images of 32 px) on a laptop CPU; this one is several times faster and trains well on the synthetic
    data.

    Args:
        in_chans: input channels.
        widths: output channels of the blocks; the last one is :attr:`num_features`.
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 48, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, num_features)``."""
        return self.features(images).mean(dim=(2, 3))


def has_pretrained_weights(name: str) -> bool:
    """Whether timm has pretrained weights for ``name`` (a timm model name, with or without a ``.tag``), with a
    place to fetch them from; :data:`TINY_CNN` and timm names without a pretrained tag have none."""
    if name == TINY_CNN or not timm.is_model_pretrained(name):
        return False
    source = get_pretrained_cfg(name)
    return bool(source and (source.hf_hub_id or source.url or source.file))


def create_encoder(name: str, pretrained: bool, in_chans: int, pretrained_file: str | None = None) -> nn.Module:
    """Build a headless encoder with a ``num_features`` attribute.

    Args:
        name: :data:`TINY_CNN` or a timm model name (see ``timm.list_models``).
        pretrained: load timm's pretrained weights (downloads unless cached; ignored by the tiny CNN). timm
            adapts the first convolution to ``in_chans`` by summing/repeating the RGB filters.
        in_chans: image channels (adjacent slices) per encoder input.
        pretrained_file: with ``pretrained``, load the weights from this local file instead of timm's source
            (same keys as timm's own weights; the first convolution is adapted to ``in_chans`` as usual).

    Raises:
        ValueError: if ``name`` is neither the tiny CNN nor a known timm model, or if ``pretrained`` is asked of
            a timm model without pretrained weights.
    """
    if name == TINY_CNN:
        if pretrained:
            logger.warning("encoder %r has no pretrained weights; starting from scratch", TINY_CNN)
        return TinyCNN(in_chans=in_chans)
    if not timm.is_model(name):
        raise ValueError(f"unknown encoder {name!r}: neither {TINY_CNN!r} nor a timm model name")
    if pretrained and not has_pretrained_weights(name):
        # timm would only log a warning and start from random weights: a GPU run would train from scratch unnoticed.
        raise ValueError(f"encoder {name!r} has no pretrained weights in timm (timm.list_pretrained() lists them)")
    overlay = {"file": str(pretrained_file)} if pretrained and pretrained_file else None
    # num_classes=0 removes the classifier: the output is the pooled feature vector of size num_features.
    return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                             pretrained_cfg_overlay=overlay)  # fmt: skip
