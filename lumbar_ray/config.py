"""Typed configuration: embedded defaults, a YAML file, then ``key.sub=value`` overrides.

The defaults are the quickstart (synthetic data, CPU, minutes); ``configs/*.yaml`` override them. Every model
forbids unknown keys, so a typo in a YAML file or an override is an error that names the key instead of a
silently ignored setting. The resolved config is what gets logged and saved next to every run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class _Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """The built-in synthetic RSNA-format dataset (DICOM phantoms with planted severities)."""

    train_studies: int = Field(48, ge=1, description="studies written under train_images/")
    test_studies: int = Field(4, ge=0, description="studies written under test_images/")
    seed: int = Field(0, description="everything in the dataset is a function of this seed")
    image_sizes: list[int] = Field([128, 144, 160], min_length=1, description="in-plane sizes drawn per series")
    missing_series_rate: float = Field(0.02, ge=0, le=1, description="studies lacking one series type")
    extra_axial_rate: float = Field(0.15, ge=0, le=1, description="studies with a second Axial T2 series")
    tilted_axial_rate: float = Field(0.1, ge=0, le=1, description="axial series made of tilted per-level blocks")
    shuffled_instances_rate: float = Field(0.1, ge=0, le=1, description="series whose numbers ignore space")
    empty_label_rate: float = Field(0.01, ge=0, le=1, description="label cells left empty")
    signal_strength: float = Field(1.0, ge=0, description="0 removes the planted lesions (pure prior)")
    noise: float = Field(0.06, ge=0, description="Gaussian noise as a fraction of the tissue range")


class DataConfig(_Strict):
    """Where the RSNA-format folder is."""

    root: str | None = Field(None, description="RSNA-format folder; None = synthetic dataset under workdir")


class PreprocessConfig(_Strict):
    """DICOM -> cache: what the cached volumes look like, and how the Ray Data job is sized.

    Only ``image_size``, ``clip_percentiles`` and the cache format version define the cache key; the resources
    do not change a single cached byte.
    """

    image_size: int = Field(256, ge=16, description="in-plane size (square) of every cached slice")
    clip_percentiles: tuple[float, float] = Field((0.5, 99.5), description="intensity window per series")
    cache: str | None = Field(None, description="cache folder or URI (s3://...); None = <workdir>/cache")
    workers: int = Field(2, ge=1, description="actor pool size: series decoded in parallel")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per preprocessing actor")
    strict: bool = Field(False, description="exit non-zero when any series failed")


class CVConfig(_Strict):
    """Cross-validation folds, grouped by study and stratified on the labels."""

    n_folds: int = Field(5, ge=2)
    seed: int = 42


class Config(_Strict):
    """The whole resolved configuration of a run."""

    workdir: str = Field("lumbar_ray_work", description="cache, checkpoints and the local MLflow store")
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    cv: CVConfig = CVConfig()

    def to_yaml(self) -> str:
        """Render the resolved config as YAML (what is logged and saved with runs)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-typed value.

    Raises:
        ConfigError: if there is no ``=`` or the key is empty.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"config key {key!r}: {item['msg']} (got {item.get('input')!r})")
    return f"invalid config from {source}: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the resolved config: embedded defaults <- YAML file <- ``key.sub=value`` overrides.

    Args:
        path: optional YAML file; its keys must all exist in :class:`Config`.
        overrides: CLI-style overrides such as ``synth.train_studies=150``; values are parsed as YAML.

    Raises:
        ConfigError: on a missing file, malformed YAML, an unknown key (named) or a value of the wrong type.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        tree, source = loaded, str(path)
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
    if overrides:
        source += f" + overrides {list(overrides)}"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    logger.info("resolved config written to %s", path)
    return path
