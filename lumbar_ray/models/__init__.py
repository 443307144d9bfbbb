"""Severity classifiers: :func:`build_model` turns a ``ModelConfig`` into a :class:`SeverityNet`."""

from lumbar_ray.models.net import DEFAULT_CLASS_PRIOR, POOLS, SeverityNet
from lumbar_ray.models.registry import ARCHITECTURES, ArchSpec, build_model

__all__ = ["ARCHITECTURES", "DEFAULT_CLASS_PRIOR", "POOLS", "ArchSpec", "SeverityNet", "build_model"]
