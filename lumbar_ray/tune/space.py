"""The search space: distributions from the config's ``tune.space``, and sampled values applied to a config.

Keys are config paths (``train.lr``); an item of a list setting is addressed by its index (``loss.class_weights.2``
is the Severe class weight), so the space can search the Moderate and Severe weights relative to Normal/Mild.
"""

from __future__ import annotations

from typing import Any

from lumbar_ray.config import Config, ConfigError, SearchDim


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at the dotted ``key`` of a nested dict/list tree (list items by index), in place."""
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A new config with the sampled ``params`` (dotted key -> value) set; validated like any config.

    Raises:
        ConfigError: if a value does not fit its setting.
    """
    tree = cfg.model_dump(mode="json")  # tuples become lists: indexable and assignable
    for key, value in params.items():
        set_key(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValueError as exc:
        raise ConfigError(f"tuned parameters {params} do not fit the config: {exc}") from exc


def tune_domain(dim: SearchDim) -> Any:
    """The Ray Tune domain of one searched setting (OptunaSearch converts it to an Optuna distribution)."""
    from ray import tune

    if dim.dist == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.dist == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.dist == "int":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # randint's upper bound is exclusive
    return tune.choice(list(dim.values))


def search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """``tune.space`` as a flat Ray Tune ``param_space`` (dotted key -> domain)."""
    return {key: tune_domain(dim) for key, dim in space.items()}
