"""Sampled values of the search space (``tune.space``) applied to a config: pure, no Ray (the Ray Tune domains are
built in :mod:`lumbar_ray.tune.run`).

Keys are config paths (``train.lr``); an item of a list setting is addressed by its index (``loss.class_weights.2``
is the Severe class weight), so the space can search the Moderate and Severe weights relative to Normal/Mild.
"""

from __future__ import annotations

from typing import Any

from lumbar_ray.config import Config, ConfigError, set_path


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
