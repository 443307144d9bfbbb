"""Named architectures: a default encoder, a default slice pooling and a note for each.

``ModelConfig.arch`` picks an entry; ``ModelConfig.encoder`` and ``ModelConfig.pool`` override its defaults, so
any timm backbone can be tried without a new entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lumbar_ray.config import CropConfig, ModelConfig
from lumbar_ray.constants import SEVERITIES
from lumbar_ray.models.encoders import TINY_CNN, create_encoder
from lumbar_ray.models.net import DEFAULT_CLASS_PRIOR, SeverityNet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """One named architecture.

    Attributes:
        encoder: timm model name (or :data:`lumbar_ray.models.encoders.TINY_CNN`).
        pool: default slice pooling: ``attention``, ``lstm`` or ``mean``.
        notes: what the entry is for.
        has_weights: whether ``encoder`` has pretrained weights (``ModelConfig.pretrained``). Every real
            backbone must: a timm name without a pretrained tag (``efficientnetv2_s``) silently starts from
            random weights. Only the built-in CPU quickstart CNN goes without.
    """

    encoder: str
    pool: str
    notes: str
    has_weights: bool = True


ARCHITECTURES: dict[str, ArchSpec] = {
    "tiny": ArchSpec(
        encoder=TINY_CNN,
        pool="attention",
        notes="built-in 4-block CNN (~40k parameters); CPU tests and the synthetic quickstart",
        has_weights=False,
    ),
    "resnet18d": ArchSpec(
        encoder="resnet18d",
        pool="attention",
        notes="timm ResNet18-D (11M); a cheap real baseline on GPU, 64-128 px crops",
    ),
    "convnext_nano": ArchSpec(
        encoder="convnext_nano",
        pool="lstm",
        notes="timm ConvNeXt-nano (15M); the competition's ConvNeXt family at a single-GPU size",
    ),
    # The TensorFlow port: timm's own ``efficientnetv2_s`` has no pretrained weights at all.
    "tf_efficientnetv2_s": ArchSpec(
        encoder="tf_efficientnetv2_s",
        pool="lstm",
        notes="timm EfficientNetV2-S (20M, ImageNet-21k then 1k); the strongest single backbones used this family,"
        " 96-128 px crops",
    ),
}
"""Known values of ``ModelConfig.arch``."""


def resolved_pool(arch: str, pool: str | None) -> str:
    """The slice pooling a model gets: ``pool`` when set, else the architecture's default.

    Raises:
        ValueError: on an unknown ``arch``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; known architectures: {sorted(ARCHITECTURES)}")
    return pool or ARCHITECTURES[arch].pool


def build_model(
    model: ModelConfig, crop: CropConfig, class_prior: tuple[float, ...] = DEFAULT_CLASS_PRIOR
) -> nn.Module:
    """Build the classifier described by ``model`` for crops shaped by ``crop``.

    Args:
        model: architecture name, optional encoder/pool overrides, pretrained flag, in_chans, dropout, test-time
            flip.
        crop: the crop geometry: its views (``crop.second_view``) set the network's; the rest is only logged (the
            network accepts any S and H = W >= 32).
        class_prior: class frequencies the heads' biases start at (log), so a fresh model predicts the prior.

    Returns:
        A :class:`SeverityNet`: ``(B, 25 * crop.views, S, H, W)`` float32 crops -> ``(B, 25, 3)`` logits.

    Raises:
        ValueError: on an unknown ``model.arch`` (the message lists the known ones) or encoder name.
    """
    pool = resolved_pool(model.arch, model.pool)  # first: it names an unknown architecture
    if len(class_prior) != len(SEVERITIES):
        raise ValueError(f"class_prior needs {len(SEVERITIES)} values, got {len(class_prior)}")
    encoder_name = model.encoder or ARCHITECTURES[model.arch].encoder
    encoder = create_encoder(encoder_name, pretrained=model.pretrained, in_chans=model.in_chans,
                             pretrained_file=model.pretrained_file)  # fmt: skip
    net = SeverityNet(
        encoder,
        feature_dim=int(encoder.num_features),
        in_chans=model.in_chans,
        pool=pool,
        dropout=model.dropout,
        class_prior=class_prior,
        tta_flip=model.tta_flip,
        views=crop.views,
    )
    logger.info(
        "model %s: encoder %s (pretrained=%s, in_chans=%d), pool %s, %.2fM parameters, crops %d slices x %d px, "
        "%d view(s)%s",
        model.arch,
        encoder_name,
        model.pretrained,
        model.in_chans,
        pool,
        sum(p.numel() for p in net.parameters()) / 1e6,
        crop.slices,
        crop.size,
        crop.views,
        ", test-time flip" if model.tta_flip else "",
    )
    return net
