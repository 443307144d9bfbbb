"""Fixtures of the localisation tests: synthetic series cached at 96 px with their label points and folds, and
the private ultralytics settings folder of the session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import PreprocessConfig, cache_settings
from lumbar_ray.data.cache import CachedSeries, SeriesCache, SeriesMeta, SliceTable, StackMeta, manifest_row
from lumbar_ray.data.crops import points_from_coordinates
from lumbar_ray.data.preprocess import process_row, series_items
from lumbar_ray.data.rsna import load_rsna


def fake_series(
    positions,
    orientation,
    spacing=(0.5, 0.8),
    shape=(100, 120),
    scale=(2.0, 2.0),
    series_id: int = 1,
    volume=None,
    dicom=None,
) -> CachedSeries:
    """A cached series of one stack built by hand: one slice per position, all with the same geometry.

    Positions along the normal are filled in as the reader would (projections on ``row x column``); ``volume``
    defaults to a tiny placeholder (the geometry needs only the metadata); ``dicom`` is the series' common tags.
    """
    n = len(positions)
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float))
    slices = SliceTable(
        instance_number=tuple(range(1, n + 1)),
        stack=(0,) * n,
        position=tuple(tuple(float(v) for v in p) for p in positions),
        orientation=(tuple(float(v) for v in orientation),) * n,
        pixel_spacing=(tuple(spacing),) * n,
        original_shape=(tuple(shape),) * n,
        scale=(tuple(scale),) * n,
        resized=(False,) * n,
        position_along_normal=tuple(float(np.dot(p, normal)) for p in positions),
        file_name=tuple(f"{i}.dcm" for i in range(1, n + 1)),
    )
    stack = StackMeta(0, n, tuple(float(v) for v in orientation), tuple(float(v) for v in normal))
    meta = SeriesMeta(96, (0.0, 1.0), (stack,), slices, dict(dicom or {}), (), series_id=series_id)
    return CachedSeries(np.zeros((n, 4, 4), np.uint8) if volume is None else volume, meta)


def build_cache(synthetic_dir: Path, folder: Path, studies=None, sagittal_only: bool = False):
    """Cache the training series (of ``studies``; sagittal ones only if asked) without Ray, at 96 px.

    Returns:
        ``(cache, label points, the RSNA data)``.
    """
    data = load_rsna(synthetic_dir)
    cfg = PreprocessConfig(image_size=96)
    cache = SeriesCache(folder, cache_settings(cfg))
    cache.prepare()
    rows = []
    for item in series_items(synthetic_dir, splits=["train"], study_ids=studies):
        if sagittal_only and not item["series_description"].startswith("Sagittal"):
            continue
        assert process_row(item, cache, cfg)["status"] == "done"
        rows.append(manifest_row(cache.read_meta(item["study_id"], item["series_id"])))
    cache.write_manifest(pd.DataFrame(rows))
    return cache, points_from_coordinates(data.coordinates, cache, data.train_series).points, data


@pytest.fixture(scope="session")
def sagittal_cached(synthetic_dir, tmp_path_factory):
    """The sagittal series of the synthetic dataset in a 96 px cache, their label points and 3 folds."""
    from lumbar_ray.data.rsna import encode_labels
    from lumbar_ray.data.splits import make_folds

    cache, points, data = build_cache(synthetic_dir, tmp_path_factory.mktemp("sagittal_cache"), sagittal_only=True)
    study_ids, labels = encode_labels(data.train)
    return cache, points, make_folds(study_ids, labels, 3, 0)


@pytest.fixture(scope="session")
def ultralytics_dir(tmp_path_factory) -> Path:
    """Ultralytics' settings folder for every detector of the session (never the user's own)."""
    return tmp_path_factory.mktemp("ultralytics")
