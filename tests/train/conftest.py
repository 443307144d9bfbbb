"""Fixtures of the training tests: the config of a CV small enough to train in seconds on 2 CPU cores, and a
small cache of synthetic studies whose folds train without Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import Config
from lumbar_ray.train.steps import FoldPayload


def make_small_config(workdir: Path, **train) -> Config:
    """24 studies, 2 folds, the tiny model on 16 px crops of 3 slices, 2 DDP workers; ``train`` overrides. A CV
    without a localisation (so its jitter is the configured one, not measured) and without temperatures (so the
    registered model predicts exactly its folds' out-of-fold probabilities)."""
    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": 24, "test_studies": 1, "image_sizes": [96], "seed": 3},
        "preprocess": {"image_size": 96, "workers": 1},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "augment": {"jitter_measured": False},
        "calibrate": {"temperature": False},
        "train": {"epochs": 2, "batch_size": 4, "num_workers": 2, "warmup_epochs": 0.5} | train,
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "model_name": "test_ensemble",
                     "register_without_detectors": True},
    })  # fmt: skip


@pytest.fixture(scope="session")
def small_config() -> Callable[..., Config]:
    """The factory :func:`make_small_config`."""
    return make_small_config


@dataclass
class SmallCache:
    """12 synthetic studies cached without Ray (64 px), with their labels and label points."""

    cache_root: str
    cache_settings: dict
    points: pd.DataFrame
    study_ids: np.ndarray
    labels: np.ndarray

    def payload(self, held_out: np.ndarray) -> FoldPayload:
        """The fold whose validation studies are ``held_out`` (a boolean mask over :attr:`study_ids`)."""
        from lumbar_ray.baseline import fit_prior

        return FoldPayload(self.cache_root, self.cache_settings, self.points, self.study_ids[~held_out],
                           self.study_ids[held_out], self.labels[~held_out], self.labels[held_out],
                           fit_prior(self.labels[~held_out]))  # fmt: skip


@pytest.fixture(scope="session")
def small_cache(synthetic_dir, tmp_path_factory) -> SmallCache:
    """The first 12 studies of the synthetic fixture dataset, cached once per session."""
    from lumbar_ray.config import PreprocessConfig, cache_settings
    from lumbar_ray.data.cache import SeriesCache, manifest_row
    from lumbar_ray.data.crops import points_from_coordinates
    from lumbar_ray.data.preprocess import process_row, series_items
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.labels import encode_labels

    data = load_rsna(synthetic_dir)
    study_ids, labels = encode_labels(data.train)
    study_ids, labels = study_ids[:12], labels[:12]
    preprocess = PreprocessConfig(image_size=64)
    cache = SeriesCache(tmp_path_factory.mktemp("steps_cache"), cache_settings(preprocess))
    cache.prepare()
    rows = []
    for item in series_items(synthetic_dir, splits=["train"], study_ids=set(study_ids.tolist())):
        assert process_row(item, cache, preprocess)["status"] == "done"
        rows.append(manifest_row(cache.read_meta(item["study_id"], item["series_id"])))
    cache.write_manifest(pd.DataFrame(rows))
    points = points_from_coordinates(data.coordinates, cache, data.train_series).points
    return SmallCache(cache.root, cache_settings(preprocess), points, study_ids, labels)


@pytest.fixture(scope="module")
def small_fold(small_cache: SmallCache) -> FoldPayload:
    """A fold's payload over the 12 cached studies (8 train, 4 validation)."""
    return small_cache.payload(np.arange(12) >= 8)


SMALL_FOLDS = np.arange(12) % 2
"""The fold of each of :class:`SmallCache`'s 12 studies in the small CVs trained without Ray (2 folds of 6)."""


def train_small_cv(cfg: Config, cache: SmallCache, fold_of: np.ndarray = SMALL_FOLDS) -> dict:
    """fold -> :class:`~lumbar_ray.train.worker.FoldOutcome` of one epoch per fold, trained by the plain-torch steps
    the Ray worker runs (:func:`~lumbar_ray.train.steps.build_fold`, :func:`~lumbar_ray.train.steps.run_epoch`)."""
    import torch

    from lumbar_ray.train.steps import build_fold, keep_best, run_epoch
    from lumbar_ray.train.worker import FoldOutcome

    outcomes = {}
    for fold in np.unique(fold_of):
        torch.manual_seed(cfg.train.seed)
        parts = build_fold(cfg, cache.payload(fold_of == fold), torch.device("cpu"))
        epoch = run_epoch(parts, 0)
        state = {"best": keep_best(None, epoch, parts.evaluated), "history": [epoch.metrics],
                 "last": {"epoch": 0, "study_ids": epoch.predictions.study_ids, "probs": epoch.probs}}  # fmt: skip
        outcomes[int(fold)] = FoldOutcome.from_state(int(fold), state)
    return outcomes


def finish_small_cv(cfg: Config, outcomes: dict, cache: SmallCache, synthetic_dir: Path, name: str):
    """:func:`~lumbar_ray.train.cv.finish_cv` of ``outcomes`` (trained by :func:`train_small_cv` on
    :data:`SMALL_FOLDS`) as the CV driver finishes a CV: scored, logged to ``cfg``'s MLflow under run ``name``, its
    folder in ``cfg.workdir``. Returns the :class:`~lumbar_ray.train.cv.CVResult`, ready for ``register_cv``."""
    from lumbar_ray.data.lineage import data_digest
    from lumbar_ray.data.rsna import load_rsna
    from lumbar_ray.tracking import Tracker
    from lumbar_ray.train.cv import CVRun, finish_cv
    from lumbar_ray.train.inputs import CVInputs

    folds = pd.DataFrame({"study_id": cache.study_ids, "fold": SMALL_FOLDS})
    inputs = CVInputs(load_rsna(synthetic_dir), cache.study_ids, cache.labels, folds, cache.points, pd.DataFrame(),
                      cache.cache_root, cache.cache_settings)  # fmt: skip
    tracker = Tracker.from_config(cfg)
    parent = tracker.parent_run(name, kind="cv", config=cfg)
    digest = data_digest(synthetic_dir, cache.cache_settings)
    run = CVRun(name, Path(cfg.workdir) / "runs" / name, inputs, tracker, parent, digest)
    run.run_dir.mkdir(parents=True)
    return finish_cv(cfg, run, outcomes, sorted(outcomes), [])


def member_config(workdir: Path, synthetic_dir: Path, cache: SmallCache, crop: dict, model: dict) -> Config:
    """The config of a small CV over :class:`SmallCache`'s studies (2 folds, one epoch) with ``crop`` and ``model``."""
    return Config.model_validate({
        "workdir": str(workdir),
        "data": {"root": str(synthetic_dir)},
        "preprocess": {"image_size": 64, "cache": str(cache.cache_root)},
        "cv": {"n_folds": 2, "seed": 0},
        "crop": crop,
        "model": model,
        "loss": {"aux_slice_weight": 0.0 if model.get("pool") == "mean" else 0.5},  # a mean pool has no attention
        "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.5},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "model_name": "small_ensemble",
                     "register_without_detectors": True},
    })  # fmt: skip


@pytest.fixture(scope="session")
def small_members(small_cache, synthetic_dir, tmp_path_factory) -> dict:
    """Two small CVs of other architectures and crop geometries over the same folds, trained once per session
    without Ray: ``tiny`` (16 px, 3 slices) and timm's ``test_efficientnet`` (32 px, 1 slice) with the test-time
    flip (its network returns log-probabilities). Name -> ``(config, outcomes)``."""
    workdir = tmp_path_factory.mktemp("members")
    effnet = {"arch": "tiny", "encoder": "test_efficientnet", "pool": "mean", "tta_flip": True}
    specs = {"cv-tiny": ({"size": 16, "region": 24, "slices": 3}, {"arch": "tiny"}),
             "cv-effnet": ({"size": 32, "region": 32, "slices": 1}, effnet)}  # fmt: skip
    members = {}
    for name, (crop, model) in specs.items():
        cfg = member_config(workdir, synthetic_dir, small_cache, crop, model)
        members[name] = (cfg, train_small_cv(cfg, small_cache))
    return members


def predict_held_out(loaded, cache: SmallCache, fold: int, fold_of: np.ndarray = SMALL_FOLDS) -> np.ndarray:
    """``(n, 25, 3)``: a loaded registered model's fold ``fold`` on that fold's held-out studies (in
    :attr:`SmallCache.study_ids` order), cropped at their label points once per input of the model, the targets
    without a crop given the model's calibrated fold prior: what the inference path predicts there."""
    from lumbar_ray.baseline import fill_with_prior
    from lumbar_ray.data.cache import SeriesCache
    from lumbar_ray.data.crops import CropDataset

    series_cache = SeriesCache(cache.cache_root, cache.cache_settings)
    held_out = cache.study_ids[fold_of == fold]
    crops, masks = {}, []
    for name, crop in loaded.inputs.items():
        dataset = CropDataset(series_cache, held_out, cache.points, crop)
        items = [dataset[i] for i in range(len(dataset))]
        assert [int(item["study_id"]) for item in items] == held_out.tolist()
        crops[name] = np.stack([item["crops"].numpy() for item in items])
        masks.append(np.stack([item["mask"].numpy() for item in items]))
    mask = np.logical_and.reduce(masks)
    assert mask.any()
    return fill_with_prior(loaded.predict_crops(crops, fold=fold), mask, loaded.calibrated_prior(fold))
