"""Sampled values of the search space (``tune.space``) applied to a config: pure, no Ray (the Ray Tune domains are
built in :mod:`lumbar_ray.tune.run`).

Keys are config paths (``train.lr``); an item of a list setting is addressed by its index (``loss.class_weights.2``
is the Severe class weight), so the space can search the Moderate and Severe weights relative to Normal/Mild.

The shipped spaces do not search the class weights: with the metric's own weights (1, 2, 4) in the loss the optimal
prediction is already the metric's, and any other weights miscalibrate where the classes overlap, as they do on
real data (``docs/recipe-evidence.md``). A space that searches them still runs, with a warning
(:func:`warn_if_class_weights_searched`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from lumbar_ray.config import Config, ConfigError, set_path

logger = logging.getLogger(__name__)

CLASS_WEIGHTS_KEY = "loss.class_weights"
CLASS_WEIGHTS_WARNING = "class weights other than the metric's miscalibrate; see recipe-evidence"


def miscalibrating_keys(keys: Iterable[str]) -> list[str]:
    """The searched keys that set the loss's class weights (``loss.class_weights`` or one of its items)."""
    return [key for key in keys if key == CLASS_WEIGHTS_KEY or key.startswith(CLASS_WEIGHTS_KEY + ".")]


def warn_if_class_weights_searched(keys: Iterable[str]) -> list[str]:
    """Log a warning when a search space searches the class weights (allowed, never advised); returns those keys."""
    searched = miscalibrating_keys(keys)
    if searched:
        logger.warning("tune.space searches %s: %s", ", ".join(searched), CLASS_WEIGHTS_WARNING)
    return searched


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
