"""Typed configuration: embedded defaults, a YAML file, then ``key.sub=value`` overrides.

The defaults are the quickstart (synthetic data, CPU, minutes); ``configs/*.yaml`` override them. Every model
forbids unknown keys, so a typo in a YAML file or an override is an error that names the key instead of a
silently ignored setting. The resolved config is what gets logged and saved next to every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lumbar_ray.constants import SERIES_TYPES

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def absolute_location(value: str | None) -> str | None:
    """A local path made absolute (the Ray workers and Tune trials run in other working directories, and an id
    hashed from the location must not depend on the driver's); a URI (``s3://...``) or None stays as given."""
    return value if value is None or "://" in value else str(Path(value).expanduser().resolve())


class _Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """The built-in synthetic RSNA-format dataset (DICOM phantoms with planted severities)."""

    train_studies: int = Field(150, ge=1, description="studies written under train_images/")
    test_studies: int = Field(4, ge=0, description="studies written under test_images/")
    seed: int = Field(0, description="everything in the dataset is a function of this seed")
    preset: Literal["easy", "hard"] = Field(
        "easy",
        description="easy: separable planted severities (floor near 0); hard: reader noise (floor about 0.34), "
        "curved and varied anatomy, varied acquisition, annotation noise (lumbar_ray.data.spine)",
    )
    image_sizes: list[int] = Field([128, 144, 160], min_length=1, description="in-plane sizes drawn per series")
    missing_series_rate: float = Field(0.02, ge=0, le=1, description="studies lacking one series type")
    extra_axial_rate: float = Field(0.15, ge=0, le=1, description="studies with a second Axial T2 series")
    tilted_axial_rate: float = Field(0.1, ge=0, le=1, description="axial series made of tilted per-level blocks")
    shuffled_instances_rate: float = Field(0.1, ge=0, le=1, description="series whose numbers ignore space")
    empty_label_rate: float = Field(0.01, ge=0, le=1, description="label cells left empty")
    signal_strength: float = Field(1.0, ge=0, description="0 removes the planted lesions (pure prior)")
    noise: float = Field(0.06, ge=0, description="Gaussian noise as a fraction of the tissue range")
    masks: bool = Field(
        False,
        description="also write a label volume per sagittal series (segmentation/<split>_images/<study>/<series>.npz, "
        "values in lumbar_ray.segment.labels); the DICOM files are the same bytes either way",
    )


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

    @field_validator("cache")
    @classmethod
    def _absolute_cache(cls, value: str | None) -> str | None:
        return absolute_location(value)

    workers: int = Field(2, ge=1, description="actor pool size: series decoded in parallel")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per preprocessing actor")
    strict: bool = Field(False, description="exit non-zero when any series failed")


class CropConfig(_Strict):
    """2.5D crops around each target's level point (one crop per target and view: 25 or 50 per study)."""

    size: int = Field(32, ge=8, description="output side of every crop slice, pixels")
    region: int = Field(48, ge=8, description="side of the square cut from the cache grid (cache pixels)")
    region_mm: float | None = Field(
        None,
        gt=0,
        description="side of the square cut in millimetres instead (overrides region): converted to cache pixels "
        "with each point's own slice's pixel spacing, so a crop shows the same anatomy at any field of view",
    )
    slices: int = Field(5, ge=1, description="slices per crop, centred on the point's slice (odd)")
    second_view: bool = Field(
        False,
        description="a second crop per target from the level's axial slices (spinal canal between the two "
        "subarticular points, each foramen at its side's subarticular point; subarticular has none): items hold "
        "25 x 2 crops, and the network fuses each target's views before its heads",
    )

    @field_validator("slices")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("crop.slices must be odd so that the point's slice is the centre")
        return value

    @property
    def views(self) -> int:
        """Crops per target in a study item: 2 with ``second_view``, else 1 (its crops are ``25 * views``)."""
        return 2 if self.second_view else 1


class AugmentConfig(_Strict):
    """Training augmentations; every strength is tunable and 0 switches that augmentation off."""

    jitter_px: float = Field(
        6.0, ge=0, description="uniform in-plane shift of the point, +- cache pixels (also with crop.region_mm)"
    )
    jitter_slices: int = Field(1, ge=0, description="uniform shift of the centre slice, +- slices")
    jitter_px_by_series: dict[str, float] | None = Field(
        None,
        description="series type (Sagittal T1, Sagittal T2/STIR, Axial T2) -> jitter_px of the targets read on it, "
        "e.g. the localiser's measured error (lumbar_ray.localize.evaluate.jitter_from_errors); types left out "
        "keep jitter_px",
    )
    jitter_slices_by_series: dict[str, int] | None = Field(
        None, description="series type -> jitter_slices of the targets read on it; types left out keep jitter_slices"
    )
    jitter_measured: bool = Field(
        True,
        description="train with the jitter this config's localiser calls for: before a CV, the pipeline sets "
        "jitter_px_by_series and jitter_slices_by_series (where not given) from the detectors' errors on their "
        "held-out fold (lumbar-ray localize; lumbar_ray.localize.evaluate.jitter_values), so training points stray "
        "as far as the points inference will cut at; without an evaluated localisation, jitter_px/jitter_slices",
    )
    rotate_deg: float = Field(10.0, ge=0, description="uniform in-plane rotation, +- degrees")
    scale: float = Field(0.1, ge=0, lt=1, description="uniform zoom, 1 +- scale")
    brightness: float = Field(0.1, ge=0, description="additive shift, +- fraction of the intensity range")
    contrast: float = Field(0.15, ge=0, lt=1, description="multiplicative contrast, 1 +- contrast")
    gamma: float = Field(0.15, ge=0, lt=1, description="gamma, exp(+- gamma)")
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a left/right flip (swaps sided targets)")

    @field_validator("jitter_px_by_series", "jitter_slices_by_series")
    @classmethod
    def _series_types(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(value or {}) - set(SERIES_TYPES))
        if unknown:
            raise ValueError(f"unknown series types {unknown}: use {list(SERIES_TYPES)}")
        negative = sorted(key for key, v in (value or {}).items() if v < 0)
        if negative:
            raise ValueError(f"a jitter is a non-negative bound; negative for {negative}")
        return value


class ModelConfig(_Strict):
    """The classifier: a timm encoder per slice, pooling over slices, 25 x 3 logits."""

    arch: str = Field("tiny", description="a name of lumbar_ray.models.ARCHITECTURES")
    encoder: str | None = Field(None, description="timm model name overriding the architecture's encoder")
    pretrained: bool = Field(False, description="timm pretrained weights (needs network or a local cache)")
    pretrained_file: str | None = Field(
        None,
        description="a local copy of the encoder's timm weights (.safetensors/.pth) on the driver, for clusters "
        "without internet: read there and shipped to every training worker's node",
    )
    in_chans: int = Field(1, ge=1, description="adjacent slices fed to the encoder as channels, per slice")
    pool: Literal["attention", "lstm", "mean"] | None = Field(None, description="slice pooling; None = arch's")
    dropout: float = Field(0.1, ge=0, lt=1)
    tta_flip: bool = Field(
        True,
        description="test-time flip in eval mode (validation, registered model): the mean of the softmax of the crops"
        " and of their left/right mirror, sided targets swapped back",
    )


class LossConfig(_Strict):
    """Class-weighted cross-entropy (the metric's weights), an any-severe-spinal term, an auxiliary slice term."""

    class_weights: tuple[float, float, float] = Field((1.0, 2.0, 4.0), description="by true class, as the metric")
    any_severe_weight: float = Field(1.0, ge=0, description="weight of the any-severe-spinal BCE term")
    aux_slice_weight: float = Field(
        0.5,
        ge=0,
        description="weight of the cross-entropy training the slice attention to point at the labelled slice "
        "(added to the severity loss); 0 = off; needs an attention pool (attention or lstm)",
    )


class TrainConfig(_Strict):
    """k-fold training on Ray Train."""

    run_id: str | None = Field(None, description="stable id of the CV run; None = a hash of the resolved config")
    folds: list[int] | None = Field(None, description="subset of folds to train; None = all")
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=1, description="studies per step per worker")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine decay")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP processes) per fold")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    amp: Literal["off", "bf16", "fp16"] = Field("bf16", description="autocast dtype on GPU (ignored on CPU)")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the weights, updated every step (warmed up);"
        " > 0: validation, OOF and registered weights come from it; 0 = off",
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")
    max_failures: int = Field(2, ge=0, description="worker restarts from the latest checkpoint, per fold")
    parallel_folds: int = Field(
        1,
        ge=1,
        description="folds trained at once, each TorchTrainer launched from a "
        "zero-CPU driver task (Ray schedules what the cluster holds); 1 = one after another",
    )
    storage: str | None = Field(None, description="Ray Train storage path or URI; None = <workdir>/ray_results")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each training worker also asks for (e.g. {gpu_node: 1} to keep workers on "
        "nodes that carry it)",
    )
    node_cache: str | None = Field(
        None,
        description="node-local folder that a remote cache (preprocess.cache a URI) is copied into, once per node, "
        "for the folds to read; None = lumbar_ray_cache under the node's temporary directory",
    )

    @field_validator("node_cache")
    @classmethod
    def _local_node_cache(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError(f"train.node_cache must be a local folder on every node, not a URI: {value}")
        return absolute_location(value)

    seed: int = 0


class CalibrateConfig(_Strict):
    """Post-hoc calibration fitted out of fold after a CV (or an ensemble), stored in the registered model."""

    temperature: bool = Field(
        True,
        description="fit a temperature per condition group on the out-of-fold predictions (the last epoch's when "
        "kept), report the cross-fitted CV beside the uncalibrated one, and apply them in the registered model",
    )


MODEL_NAME = "lumbar_ray_ensemble"
"""The registered model's name by default: the production model."""
QUICKSTART_MODEL_NAME = "lumbar_ray_quickstart"
"""The name the quickstart registers under instead of :data:`MODEL_NAME`, so that it never takes a production alias."""


class TrackingConfig(_Strict):
    """MLflow: where runs go and how the fold ensemble is registered."""

    tracking_uri: str | None = Field(None, description="None = $MLFLOW_TRACKING_URI, else sqlite under workdir")
    experiment: str = "lumbar_ray"
    model_name: str = Field(
        MODEL_NAME, description=f"registered model name (the quickstart registers as {QUICKSTART_MODEL_NAME!r})"
    )
    alias: str = Field(
        "champion",
        description="alias moved to a new version when its CV score is better than the holder's on the same "
        "training data (the versions' lumbar_ray.data_digest tags)",
    )
    register_model: bool = Field(True, description="log and register the fold ensemble after the CV")
    register_without_detectors: bool = Field(
        False,
        description="register a model without level detectors (it can then only predict from given points); "
        "false = finding no trained detectors is an error",
    )
    system_metrics: bool = Field(
        True,
        description="sample CPU, memory, disk, network (and GPU) of the rank-0 worker's machine into each fold's "
        "run while it trains (MLflow's system/* metrics)",
    )
    system_metrics_interval: float = Field(
        10.0, gt=0, description="seconds between system metrics samples ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins)"
    )


class CVConfig(_Strict):
    """Cross-validation folds, grouped by study and stratified on the labels."""

    n_folds: int = Field(3, ge=2)
    seed: int = 42
    predicted_points: str | None = Field(
        None,
        description="a parquet of predicted points (the cache's POINTS columns) of the training studies, each from "
        "detectors that never saw its fold (benchmarks/recipe.py --predicted-points writes one): each fold's last "
        "epoch also predicts its held-out studies at these points (the honest CV at predicted points)",
    )

    @field_validator("predicted_points")
    @classmethod
    def _absolute_points(cls, value: str | None) -> str | None:
        return absolute_location(value)


class SearchDim(_Strict):
    """One searched setting: a distribution over the values of one config key.

    ``uniform`` / ``loguniform`` (floats) and ``int`` (inclusive) need ``low`` < ``high``; ``choice`` needs
    ``values``.
    """

    dist: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDim:
        if self.dist == "choice":
            if not self.values:
                raise ValueError("a 'choice' needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a '{self.dist}' needs low < high (got low={self.low}, high={self.high})")
        elif self.dist == "loguniform" and self.low <= 0:
            raise ValueError("a 'loguniform' needs low > 0")
        return self


def _default_space() -> dict[str, SearchDim]:
    # No class weights: the metric's 1/2/4 in the loss already give the metric's optimum (docs in the README).
    return {
        "loss.any_severe_weight": SearchDim(dist="uniform", low=0.0, high=2.0),
        "loss.aux_slice_weight": SearchDim(dist="uniform", low=0.0, high=1.0),
        "augment.jitter_px": SearchDim(dist="uniform", low=0.0, high=10.0),
        "augment.rotate_deg": SearchDim(dist="uniform", low=0.0, high=20.0),
        "train.lr": SearchDim(dist="loguniform", low=5e-4, high=5e-3),
    }


class TuneConfig(_Strict):
    """Ray Tune + Optuna over the k-fold CV: the search space, the budget, early stopping and storage."""

    name: str = Field("tune", description="experiment name: names the Tune run folder and the MLflow parent run")
    num_samples: int = Field(2, ge=1, description="trials in all (a resumed run completes the same number)")
    space: dict[str, SearchDim] = Field(
        default_factory=_default_space, description="config key (a list item by index: a.b.1) -> distribution"
    )
    folds: list[int] | None = Field([0], description="folds each trial trains; None = all (cv.n_folds)")
    grace_period: int = Field(1, ge=1, description="ASHA: folds every trial completes before it may be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the best 1/reduction_factor at each rung")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = cluster resources / trial's")
    seed: int = Field(0, description="OptunaSearch (TPE) seed")
    storage: str | None = Field(None, description="Tune storage path; None = $LUMBAR_RAY_STORAGE or <workdir>")
    optuna_storage: str | None = Field(None, description="e.g. sqlite:///optuna.db: keep the Optuna study")
    trial_max_failures: int = Field(1, ge=0, description="retries of a failed trial")


LOCALIZE_RESOURCE_FIELDS = frozenset({"num_cpus", "num_gpus", "resources", "workers", "conf"})
"""LocalizeConfig fields that do not change the trained detectors (left out of the run ids that hash it)."""


class LocalizeConfig(_Strict):
    """Level localisation: one ultralytics YOLO detector per sagittal series type, or a U-Net (``method``; see
    :mod:`lumbar_ray.localize`)."""

    method: Literal["yolo", "unet"] = Field(
        "yolo",
        description="the sagittal localiser: one ultralytics YOLO detector per series type, or the U-Net of "
        "`lumbar-ray segment` (section `segment`) read through its masks or level maps",
    )
    model: str = Field(
        "yolov8n.yaml", description="ultralytics model: a .yaml builds from scratch (no download), a .pt loads weights"
    )
    width: float | None = Field(
        0.125,
        gt=0,
        le=1.5,
        description="width multiple overriding a .yaml model's scale (small = fast on CPU); None = keep (a .pt: must)",
    )
    imgsz: int = Field(128, ge=32, description="detector input side (pixels); the cached slice is resized to it")
    epochs: int = Field(20, ge=1)
    batch: int = Field(8, ge=1)
    lr0: float = Field(0.003, gt=0, description="AdamW learning rate")
    box_fraction: float = Field(0.08, gt=0, lt=1, description="training box side as a fraction of the image side")
    box_mm: float | None = Field(
        None,
        gt=0,
        description="training box side in millimetres, from each slice's pixel spacing (overrides box_fraction): "
        "boxes that keep their size on the anatomy when fields of view differ",
    )
    val_fold: int = Field(0, ge=0, description="the CV fold whose studies validate the detector")
    conf: float = Field(0.05, ge=0, le=1, description="minimum detection confidence kept at prediction")
    num_cpus: float = Field(2.0, gt=0, description="CPUs the Ray training task asks for")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the Ray training task asks for (1 on a GPU cluster)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources the training task also asks for"
    )
    workers: int = Field(0, ge=0, description="ultralytics dataloader workers")
    seed: int = 0
    subarticular_fraction: float = Field(
        0.4, ge=0, le=1, description="subarticular point: this fraction of the way from the canal to the foramen"
    )

    @property
    def from_weights(self) -> bool:
        """Whether ``model`` names pretrained weights (a ``.pt``) to fine-tune rather than a yaml to build."""
        return not self.model.lower().endswith((".yaml", ".yml"))

    @model_validator(mode="after")
    def _width_needs_a_yaml(self) -> LocalizeConfig:
        # Weights fix the width they were trained at: a width override could only be ignored or drop the weights.
        if self.from_weights and self.width is not None:
            raise ValueError(
                f"localize.width={self.width} rescales a model built from its yaml; {self.model!r} names weights,"
                " which keep their own width: set localize.width: null"
            )
        return self


class SegmentConfig(_Strict):
    """The 2.5D segmentation U-Net (``lumbar-ray segment``, :mod:`lumbar_ray.segment`): MONAI's ``UNet`` over a
    cached sagittal slice and its neighbours, trained on Ray Train like the classifier (``train.num_workers``,
    ``train.use_gpu``, ``train.cpus_per_worker``, ``train.resources``, ``train.max_failures``) and validated on the
    studies of ``localize.val_fold``, the fold the YOLO detectors are measured on."""

    source: Literal["masks", "points", "spider"] = Field(
        "masks",
        description="targets: masks = the anatomy masks beside the data (the synthetic generator's, synth.masks); "
        "points = level maps drawn around the points of train_label_coordinates.csv (the only option on RSNA data); "
        "spider = the SPIDER dataset in spider_dir",
    )
    spider_dir: str | None = Field(None, description="the SPIDER folder (images/, masks/) of source=spider")

    @field_validator("spider_dir")
    @classmethod
    def _absolute_spider_dir(cls, value: str | None) -> str | None:
        return absolute_location(value)

    image_size: int = Field(64, ge=16, description="the U-Net's input side: each cached slice is resized to it")
    in_slices: int = Field(3, ge=1, description="2.5D: the slice and its neighbours as channels (odd; edges clamped)")
    channels: tuple[int, ...] = Field((8, 16, 32), min_length=2, description="features per U-Net level")
    strides: tuple[int, ...] | None = Field(
        None, description="downsampling between levels (one fewer than channels); None = 2 each"
    )
    num_res_units: int = Field(1, ge=0, description="residual units per U-Net block")
    epochs: int = Field(10, ge=1)
    batch: int = Field(16, ge=1, description="slices per optimiser step over all workers (each takes batch/workers)")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (cosine decay over the epochs)")
    weight_decay: float = Field(1e-4, ge=0)
    radius_px: float = Field(
        8.0, gt=0, description="source=points: radius of the disc drawn around each label point, in cache pixels"
    )
    empty_fraction: float = Field(
        0.1, ge=0, le=1, description="share of the training slices without any foreground kept (seeded)"
    )
    seed: int = 0

    @field_validator("in_slices")
    @classmethod
    def _odd_slices(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("segment.in_slices must be odd so that the segmented slice is the centre")
        return value

    @model_validator(mode="after")
    def _strides_fit(self) -> SegmentConfig:
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"segment.strides needs {len(self.channels) - 1} values (one fewer than channels "
                             f"{list(self.channels)}), got {list(self.strides)}")  # fmt: skip
        if self.image_size % math.prod(self.unet_strides):
            raise ValueError(f"segment.image_size {self.image_size} is not divisible by the U-Net's total "
                             f"downsampling {math.prod(self.unet_strides)}")  # fmt: skip
        return self

    @property
    def unet_strides(self) -> tuple[int, ...]:
        """``strides``, or 2 between every pair of levels."""
        return self.strides if self.strides is not None else (2,) * (len(self.channels) - 1)


class PredictConfig(_Strict):
    """Inference with a registered ensemble (``lumbar-ray predict``): Ray Data batch inference over studies."""

    model: str = Field(f"models:/{MODEL_NAME}@champion", description="MLflow model URI of a fold ensemble")
    data: str | None = Field(None, description="RSNA-format folder; None = data.root (or the synthetic one)")
    split: Literal["test", "train"] = Field("test", description="whose series are predicted")
    study_ids: list[int] | None = Field(None, description="only these studies; None = every study of the split")
    out: str | None = Field(None, description="submission CSV path; None = <workdir>/predict/submission.csv")
    fold: int | None = Field(None, description="one fold's model only (its held-out studies); None = the ensemble")
    actors: int = Field(1, ge=1, description="inference actors (each loads the model once)")
    batch_size: int = Field(4, ge=1, description="studies per Ray Data batch")
    use_gpu: bool = Field(False, description="one GPU per actor")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor")


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the study replicas (``serve.autoscaling``; None there = a fixed replica count)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim at")


class ServeConfig(_Strict):
    """``lumbar-ray serve``: the registered study-level model behind a Ray Serve HTTP application."""

    model: str = Field("models:/lumbar_ray_ensemble@champion", description="MLflow model URI (an alias is resolved "
                       "to its version once, at start: every replica serves the same version)")  # fmt: skip
    host: str = Field("127.0.0.1", description="HTTP host (0.0.0.0 to listen on every interface)")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    name: str = Field("lumbar_ray", description="the Serve application's name")
    num_replicas: int = Field(1, ge=1, description="replicas when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    use_gpu: bool = Field(False, description="one GPU per replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica takes at once (the rest queue)")
    max_batch_size: int = Field(4, ge=1, description="studies scored together (Serve request batching)")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    max_upload_mb: float = Field(512.0, gt=0, description="largest upload (and uncompressed study) in MiB")
    max_files: int = Field(4000, ge=1, description="most files in one study upload")
    series_map: dict[str, str] = Field(default_factory=dict, description="SeriesDescription regex -> series type, "
                                       "tried before the built-in patterns")  # fmt: skip
    upload_dir: str | None = Field(None, description="where uploads are unpacked (a private folder each, removed "
                                   "after reading); None = the system's temporary folder")  # fmt: skip


class Config(_Strict):
    """The whole resolved configuration of a run."""

    workdir: str = Field(
        "lumbar_ray_work", description="cache, checkpoints and the local MLflow store", validate_default=True
    )

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: str) -> str:
        # Ray workers and Tune trials run in other working directories: a relative path would point elsewhere there.
        return str(Path(value).expanduser().resolve())

    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    cv: CVConfig = CVConfig()
    crop: CropConfig = CropConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    localize: LocalizeConfig = LocalizeConfig()
    segment: SegmentConfig = SegmentConfig()
    predict: PredictConfig = PredictConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _aux_slice_needs_attention(self) -> Config:
        # Only an explicit pool is known here; the architecture's default pool is checked when the model is built.
        if self.loss.aux_slice_weight > 0 and self.model.pool == "mean":
            raise ValueError(
                "loss.aux_slice_weight > 0 trains the slice attention, but model.pool 'mean' has none: "
                "use model.pool attention or lstm, or loss.aux_slice_weight=0"
            )
        return self

    @model_validator(mode="after")
    def _space_keys_exist(self) -> Config:
        tree = self.model_dump(mode="python", exclude={"tune"})
        for key in self.tune.space:
            try:
                node = get_path(tree, key)
            except KeyError:
                raise ValueError(f"tune.space names an unknown config key {key!r}") from None
            if isinstance(node, dict):
                raise ValueError(f"tune.space key {key!r} is a section, not a setting")
        return self

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


def _child(node: Any, part: str) -> Any:
    """``node[part]`` of a dict, or of a list/tuple by index; KeyError when there is none."""
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise KeyError(part)


def get_path(tree: Any, key: str) -> Any:
    """The value at dotted ``key`` of a nested dict/list tree (list items by index, ``loss.class_weights.2``).

    Raises:
        KeyError: if a part of the key does not exist.
    """
    node = tree
    for part in key.split("."):
        node = _child(node, part)
    return node


def set_path(tree: dict[str, Any], key: str, value: Any, create: bool = False) -> None:
    """Set ``value`` at dotted ``key`` of a nested dict/list tree, in place (list items by index).

    Args:
        tree: the tree.
        key: dotted path.
        value: what to put there.
        create: make missing sections (an override of a config file that lacks the section).

    Raises:
        ConfigError: if a part of the path is a value, not a section (or, without ``create``, is missing).
    """
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        if create and isinstance(node, dict) and part not in node:
            node[part] = {}
        try:
            node = _child(node, part)
        except KeyError:
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: depth + 1])!r} does not exist") from None
        if not isinstance(node, dict | list):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"cannot set {key!r}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"config key {key!r}: {item['msg']} (got {item.get('input')!r})")
    return f"invalid config from {source}: " + "; ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> Config:
    """Build the resolved config: embedded defaults <- YAML file <- ``values`` <- ``key.sub=value`` overrides.

    Args:
        path: optional YAML file; its keys must all exist in :class:`Config`.
        overrides: CLI-style overrides such as ``synth.train_studies=150``; values are parsed as YAML.
        values: dotted key -> value set as given, not parsed (a command's typed options: a path with ``#`` or
            ``:`` in it stays a path).

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
    for key, value in (values or {}).items():
        set_path(tree, key, str(value) if isinstance(value, Path) else value, create=True)
    for text in overrides:
        key_path, value = parse_override(text)
        set_path(tree, ".".join(key_path), value, create=True)
    if values:
        source += f" + options {values}"
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


def cache_settings(cfg: PreprocessConfig) -> dict[str, Any]:
    """The preprocessing settings that change cached bytes (and so define the cache version)."""
    return {"image_size": cfg.image_size, "clip_percentiles": list(cfg.clip_percentiles), "dtype": "uint8"}


def settings_hash(payload: Any, prefix: str, length: int = 12) -> str:
    """``prefix`` + a short SHA-256 of ``payload`` as sorted JSON: the one rule behind every settings-derived id
    (cache versions, CV run ids, localisation folders), so equal settings always give equal ids."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]
    return f"{prefix}{digest}"
