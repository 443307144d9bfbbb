"""Sampled values of the search space (``tune.space``) applied to a config: pure, no Ray (the Ray Tune domains are
built in :mod:`lumbar_ray.tune.run`).

Keys are config paths (``train.lr``); an item of a list setting is addressed by its index (``loss.class_weights.2``
is the Severe class weight), so the space can search the Moderate and Severe weights relative to Normal/Mild.

The shipped spaces do not search the class weights: with the metric's own weights (1, 2, 4) in the loss the optimal
prediction is already the metric's, and any other weights miscalibrate where the classes overlap, as they do on
real data (``docs/recipe-evidence.md``). A space that searches them still runs, with a warning
(:func:`warn_if_class_weights_searched`). A space whose trials cannot all build is refused before any trial starts
(:func:`check_space`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from lumbar_ray.config import Config, ConfigError, SearchDim, set_path
from lumbar_ray.models.net import pool_has_attention
from lumbar_ray.models.registry import ARCHITECTURES, resolved_pool

logger = logging.getLogger(__name__)

CLASS_WEIGHTS_KEY = "loss.class_weights"
CLASS_WEIGHTS_WARNING = "class weights other than the metric's miscalibrate; see recipe-evidence"
AUX_SLICE_KEY = "loss.aux_slice_weight"


def miscalibrating_keys(keys: Iterable[str]) -> list[str]:
    """The searched keys that set the loss's class weights (``loss.class_weights`` or one of its items)."""
    return [key for key in keys if key == CLASS_WEIGHTS_KEY or key.startswith(CLASS_WEIGHTS_KEY + ".")]


def warn_if_class_weights_searched(keys: Iterable[str]) -> list[str]:
    """Log a warning when a search space searches the class weights (allowed, never advised); returns those keys."""
    searched = miscalibrating_keys(keys)
    if searched:
        logger.warning("tune.space searches %s: %s", ", ".join(searched), CLASS_WEIGHTS_WARNING)
    return searched


def _candidates(cfg: Config, key: str, current: Any) -> list[Any]:
    """The values a trial can take for ``key``: a choice's values, a range's ends, else the base config's."""
    dim: SearchDim | None = cfg.tune.space.get(key)
    if dim is None:
        return [current]
    return list(dim.values) if dim.dist == "choice" else [dim.low, dim.high]


def check_space(cfg: Config) -> None:
    """Refuse a search whose trials cannot all build, before any starts (each trial would fail alike, late).

    The auxiliary slice loss (on in the base config, or searched above 0) trains the slice pooling's attention, so
    every pooling a trial can get (``model.pool``, else its ``model.arch``'s default; either may be searched) must
    have attention.

    Raises:
        ConfigError: naming the poolings without attention.
    """
    if max(_candidates(cfg, AUX_SLICE_KEY, cfg.loss.aux_slice_weight)) <= 0:
        return
    archs = [a for a in _candidates(cfg, "model.arch", cfg.model.arch) if a in ARCHITECTURES]  # others fail alone
    pools = {resolved_pool(arch, pool) for arch in archs for pool in _candidates(cfg, "model.pool", cfg.model.pool)}
    without = sorted(pool for pool in pools if not pool_has_attention(pool))
    if without:
        raise ConfigError(f"the search can train {AUX_SLICE_KEY} > 0 with the slice pooling {without}, which has no "
                          "attention for it to train: every trial that draws both would fail; search model.pool "
                          f"among attention and lstm, or keep {AUX_SLICE_KEY} at 0")  # fmt: skip


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A new config with the sampled ``params`` (dotted key -> value) set; validated like any config.

    Raises:
        ConfigError: if a value does not fit its setting.
    """
    tree = cfg.model_dump(mode="json")  # tuples become lists: indexable and assignable
    for key, value in params.items():
        set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValueError as exc:
        raise ConfigError(f"tuned parameters {params} do not fit the config: {exc}") from exc
