"""Fixtures of the localisation tests: synthetic series cached at 96 px with their label points and folds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lumbar_ray.config import PreprocessConfig
from lumbar_ray.data.cache import SeriesCache
from lumbar_ray.data.crops import points_from_coordinates
from lumbar_ray.data.preprocess import cache_settings, manifest_row, process_row, series_items
from lumbar_ray.data.rsna import load_rsna


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
