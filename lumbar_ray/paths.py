"""Where every stage's outputs live: one function per place, so stages find each other's outputs here and never
read each other's code.

Roots: ``<workdir>`` (``Config.workdir``, absolute) for what one machine keeps, and the shared storage named by
``$LUMBAR_RAY_STORAGE`` (``cluster.yaml`` sets it on every node: an ``s3://`` prefix or a shared mount) for what
every node must see (the preprocessing cache, Ray Train checkpoints)::

    <workdir>/data/synthetic/                 the built-in synthetic dataset (data.root = null)
    <workdir>/cache/   or  $LUMBAR_RAY_STORAGE/cache/              preprocess.cache = null
    <workdir>/ray_results/  or  $LUMBAR_RAY_STORAGE/ray_results/   train.storage = null
    <workdir>/runs/<cv run id>/               a CV's folds.csv, fold<k>.pt, oof.csv, config.yaml, data_digest.json
                                              (an ensemble's members are found here by their run ids)
    <workdir>/localize/<localize key>/<series slug>/detector.pt    the level detectors of a config
    <workdir>/localize/ultralytics/           ultralytics' private settings of the driver (YOLO_CONFIG_DIR)
    <workdir>/segment/<segment key>/unet.pt   the segmentation U-Net of a config (lumbar-ray segment)
    <workdir>/ray_tune/  or  $LUMBAR_RAY_STORAGE/ray_tune/         tune.storage = null
    <workdir>/tune/<tune.name>/               a tuning run's trials.csv and best.yaml
    <workdir>/predict/submission.csv          predict.out = null
    <workdir>/mlflow.db                       tracking.tracking_uri = null and no $MLFLOW_TRACKING_URI

Ids derived from settings (the CV run id, the localisation and segmentation keys) hash only what changes the
result, never the resources a run is given, so the same model trained on more workers finds its earlier folds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumbar_ray.config import LOCALIZE_RESOURCE_FIELDS, Config, cache_settings, settings_hash
from lumbar_ray.constants import DETECTED_SERIES_TYPES, series_slug

STORAGE_ENV = "LUMBAR_RAY_STORAGE"
DETECTOR_WEIGHTS = "detector.pt"
UNET_WEIGHTS = "unet.pt"

# Settings that change how fast or where a CV runs, not what it learns: left out of the run id.
# Settings added after run ids were first published: at their defaults they change no id (existing runs are found).
_ADDED_AFTER_IDS: dict[tuple[str, str], Any] = {
    ("synth", "preset"): "easy",
    ("model", "pretrained_file"): None,
    ("localize", "box_mm"): None,
    ("model", "tta_flip"): False,
    ("train", "ema_decay"): 0.0,
    ("loss", "aux_slice_weight"): 0.0,
    ("cv", "predicted_points"): None,
    ("crop", "region_mm"): None,
    ("augment", "jitter_px_by_series"): None,
    ("augment", "jitter_slices_by_series"): None,
    ("calibrate", "temperature"): False,
    ("augment", "jitter_measured"): False,
    ("crop", "second_view"): False,
    ("synth", "masks"): False,
    ("localize", "method"): "yolo",
}
_CV_RESOURCE_KEYS: dict[str, set[str] | None] = {
    "workdir": None,
    "preprocess": {"cache", "workers", "num_cpus", "strict"},
    "train": {
        "run_id",
        "folds",
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "loader_workers",
        "max_failures",
        "storage",
        "parallel_folds",
        "resources",
        "node_cache",
    },
    "tracking": None,
    "tune": None,
    # The detectors ship with the registered ensemble, so their settings are part of the run; not their resources.
    "localize": set(LOCALIZE_RESOURCE_FIELDS),
    "predict": None,
    "serve": None,
    # The segmentation U-Net is its own stage (segment_key); the classifier does not use it. When localize.method=unet
    # ships it with the registered model, its settings enter the CV's id (cv_run_id), as the detectors' do.
    "segment": None,
    # The masks are written beside the same DICOM bytes: the data the classifier learns is the same with or without.
    "synth": {"masks"},
}


def shared_storage(name: str) -> str | None:
    """``$LUMBAR_RAY_STORAGE/<name>`` when the shared-storage root is set, else None."""
    root = os.environ.get(STORAGE_ENV)
    return f"{root.rstrip('/')}/{name}" if root else None


def data_root_for(cfg: Config) -> Path:
    """The RSNA-format folder a config points at: ``data.root``, or the synthetic one of its preset under the
    workdir (``data/synthetic``, ``data/synthetic-hard``)."""
    if cfg.data.root:
        return Path(cfg.data.root)
    return Path(cfg.workdir) / "data" / ("synthetic" if cfg.synth.preset == "easy" else f"synthetic-{cfg.synth.preset}")


def _data_identity(cfg: Config) -> dict[str, str]:
    """What tells the data apart in the run ids, beyond the settings hashed already: nothing for the built-in easy
    dataset (ids made before the presets existed stay valid), else its preset or ``data.root``."""
    if cfg.data.root:
        return {"data_root": str(cfg.data.root)}
    return {} if cfg.synth.preset == "easy" else {"synth_preset": cfg.synth.preset}


def cache_root_for(cfg: Config) -> str:
    """The preprocessing cache root: ``preprocess.cache``, else ``$LUMBAR_RAY_STORAGE/cache``, else
    ``<workdir>/cache``."""
    return cfg.preprocess.cache or shared_storage("cache") or str(Path(cfg.workdir) / "cache")


def ray_storage_for(cfg: Config) -> str:
    """Ray Train's storage path: ``train.storage``, else ``$LUMBAR_RAY_STORAGE/ray_results``, else
    ``<workdir>/ray_results`` (absolute, as Ray requires)."""
    return cfg.train.storage or shared_storage("ray_results") or str((Path(cfg.workdir) / "ray_results").resolve())


def with_resolved_storage(cfg: Config) -> Config:
    """``cfg`` with ``train.storage`` resolved here (:func:`ray_storage_for`): what to hand a Ray task that builds a
    ``TorchTrainer`` on another node, whose ``$LUMBAR_RAY_STORAGE`` and working directory may not be the driver's."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage": ray_storage_for(cfg)})})


def cv_run_id(cfg: Config) -> str:
    """``train.run_id``, else ``cv-`` + a hash of the settings that define the model (not the resources)."""
    if cfg.train.run_id:
        return cfg.train.run_id
    tree = cfg.model_dump(mode="json")
    for (section, key), default in _ADDED_AFTER_IDS.items():
        if tree[section][key] == default:
            del tree[section][key]
            if not tree[section]:  # a section added after the ids, all at its defaults
                del tree[section]
    for section, keys in _CV_RESOURCE_KEYS.items():
        if keys is None:
            tree.pop(section, None)
        else:
            for key in keys:
                tree[section].pop(key, None)
    if cfg.localize.method == "unet":  # the U-Net ships with the registered ensemble, as the detectors do
        tree["segment"] = cfg.segment.model_dump(mode="json")
    if tree["cv"].get("predicted_points") is not None:  # what the folds are scored at, not where the file lies
        tree["cv"]["predicted_points"] = _content_digest(tree["cv"]["predicted_points"])
    return settings_hash(tree, "cv-", length=10)


def _content_digest(path: str) -> str:
    """``sha256:<hex>`` of a local file's bytes (the same points moved or copied keep their runs; new points in the
    same file get new ones); a URI stays as it is.

    Raises:
        FileNotFoundError: if a local path is not a file.
    """
    if "://" in path:
        return path
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"cv.predicted_points: no such file {path}")
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def ensemble_id(cfg: Config, run_ids: list[str] | tuple[str, ...]) -> str:
    """``ens-`` + a hash of the member CV run ids (in order), the calibration settings and the registered model's
    name: a rerun of the same ensemble finds its MLflow run (and registers no twin)."""
    payload = {"members": list(run_ids), "calibrate": cfg.calibrate.model_dump(mode="json"),
               "model_name": cfg.tracking.model_name}  # fmt: skip
    return settings_hash(payload, "ens-", length=10)


RESOLVED_CONFIG = "resolved_config.yaml"
"""The resolved config written beside what a command produced (its workdir, a submission)."""
FOLDS_CSV = "folds.csv"
"""A CV's (or the localisation's) fixed folds: study_id -> fold, written once, reused on resume."""
DATA_DIGEST_JSON = "data_digest.json"
"""A CV's training data digest (:mod:`lumbar_ray.data.lineage`), written when it first starts, checked on resume."""


def fold_outcome_path(run_dir: Path, fold: int) -> Path:
    """``<run_dir>/fold<k>.pt``: a finished fold's outcome; its presence marks the fold done."""
    return Path(run_dir) / f"fold{int(fold)}.pt"


def run_dir_for(cfg: Config, run_id: str) -> Path:
    """Where the driver keeps a CV's folds, finished fold outputs and OOF predictions."""
    return Path(cfg.workdir) / "runs" / run_id


def localize_key(cfg: Config) -> str:
    """Hash of what changes the detectors: their settings (not resources), the cache version and the folds."""
    settings = cfg.localize.model_dump(mode="json", exclude=set(LOCALIZE_RESOURCE_FIELDS))
    for (section, key), default in _ADDED_AFTER_IDS.items():
        if section == "localize" and settings[key] == default:
            del settings[key]
    payload = {
        "localize": settings,
        "cache": cache_settings(cfg.preprocess),
        "cv": cfg.cv.model_dump(mode="json", exclude={"predicted_points"}),
    }
    return settings_hash(payload | _localizer_identity(cfg) | _data_identity(cfg), "loc-")


def _localizer_identity(cfg: Config) -> dict[str, str]:
    """What the localisation depends on beyond its own settings: nothing for the YOLO detectors, so their keys stay
    those existing workdirs hold; under ``localize.method: unet`` the U-Net's :func:`segment_key`, so that the
    localisation follows its U-Net."""
    return {"segment": segment_key(cfg)} if cfg.localize.method == "unet" else {}


def localize_dir_for(cfg: Config) -> Path:
    """``<workdir>/localize/<key>``: the detectors and the localisation evaluation of this config."""
    return Path(cfg.workdir) / "localize" / localize_key(cfg)


def detector_dir_for(cfg: Config, description: str) -> Path:
    """The folder one series type's detector trains in (its export, ultralytics' output, the weights)."""
    return localize_dir_for(cfg) / series_slug(description)


def trained_detectors(cfg: Config) -> dict[str, Path]:
    """Series type -> weights of this config's sagittal localisers that exist (empty before they were trained): the
    YOLO detectors, or under ``localize.method: unet`` the one U-Net that localises on both series types."""
    if cfg.localize.method == "unet":
        found = dict.fromkeys(DETECTED_SERIES_TYPES, unet_weights_for(cfg))
    else:
        found = {kind: detector_dir_for(cfg, kind) / DETECTOR_WEIGHTS for kind in DETECTED_SERIES_TYPES}
    return {description: path for description, path in found.items() if path.is_file()}


def segment_key(cfg: Config) -> str:
    """Hash of what changes the segmentation U-Net: its settings, the cache version, the folds (its validation
    studies are ``localize.val_fold``'s) and the data; not the resources it trains on (``train.*``)."""
    payload = {
        "segment": cfg.segment.model_dump(mode="json"),
        "cache": cache_settings(cfg.preprocess),
        "cv": cfg.cv.model_dump(mode="json", include={"n_folds", "seed"}),
        "val_fold": cfg.localize.val_fold,
    }
    return settings_hash(payload | _data_identity(cfg), "seg-")


def segment_dir_for(cfg: Config) -> Path:
    """``<workdir>/segment/<key>``: the U-Net of this config."""
    return Path(cfg.workdir) / "segment" / segment_key(cfg)


def unet_weights_for(cfg: Config) -> Path:
    """``<workdir>/segment/<key>/unet.pt``: this config's trained U-Net (its presence marks the stage done)."""
    return segment_dir_for(cfg) / UNET_WEIGHTS


def ultralytics_settings_dir(cfg: Config) -> Path:
    """``<workdir>/localize/ultralytics``: the private ultralytics settings (``YOLO_CONFIG_DIR``) of a workdir's
    detectors, so that the user's own ultralytics settings are never read or changed."""
    return Path(cfg.workdir) / "localize" / "ultralytics"


def tune_storage_for(cfg: Config) -> str:
    """Ray Tune's storage: ``tune.storage``, else ``$LUMBAR_RAY_STORAGE/ray_tune``, else ``<workdir>/ray_tune``."""
    return cfg.tune.storage or shared_storage("ray_tune") or str((Path(cfg.workdir) / "ray_tune").resolve())


def tune_dir_for(cfg: Config) -> Path:
    """``<workdir>/tune/<tune.name>``: a tuning run's trial table and best config."""
    return Path(cfg.workdir) / "tune" / cfg.tune.name


def submission_path_for(cfg: Config) -> Path:
    """``predict.out``, else ``<workdir>/predict/submission.csv``."""
    return Path(cfg.predict.out) if cfg.predict.out else Path(cfg.workdir) / "predict" / "submission.csv"


def tracking_uri_for(cfg: Config) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<workdir>/mlflow.db``.

    The default is absolute, so Ray workers started in other directories log to the same store.
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an error.

    A reader (or a rerun after a crash) sees either the old file or the whole new one, never a partial write:
    the rule behind every "done" marker (finished folds, detector weights, submissions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


SHIPPED_DIR = "lumbar_ray_inputs"
"""The folder under a node's temporary directory where shipped files are written (:meth:`ShippedFile.local_path`)."""


@dataclass(frozen=True)
class ShippedFile:
    """A file of the driver's carried by value to a Ray task or worker on any node: its bytes travel with the task's
    arguments (through the object store), and the receiving node writes them once, under its temporary directory.

    For the inputs a config names by a local path that other nodes need (``model.pretrained_file``, a weights or
    yaml file as ``localize.model``): a path of the driver's means nothing on another node.
    """

    name: str
    sha256: str
    data: bytes

    @classmethod
    def of(cls, path: str | Path) -> ShippedFile:
        """The file at ``path`` (read now, on the driver)."""
        data = Path(path).read_bytes()
        return cls(Path(path).name, hashlib.sha256(data).hexdigest(), data)

    def local_path(self) -> Path:
        """The file on this node: ``<tmp>/lumbar_ray_inputs/<sha256>/<name>`` (the name kept: ultralytics reads a
        model's scale from it), written atomically the first time."""
        target = Path(tempfile.gettempdir()) / SHIPPED_DIR / self.sha256[:32] / self.name
        if not target.is_file():
            with atomic_path(target) as temporary:
                temporary.write_bytes(self.data)
        return target


def ship_if_local(location: str | None) -> ShippedFile | None:
    """``location`` shipped when it names a file here; None for None, a URI, or a name that something else resolves
    where it runs (a timm hub name, an ultralytics ``yolov8n.yaml``)."""
    if location is None or "://" in str(location) or not Path(location).is_file():
        return None
    return ShippedFile.of(location)
