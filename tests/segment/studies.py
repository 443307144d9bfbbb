"""Small synthetic datasets with masks, cached at 96 px with their label points and ground-truth label volumes:
what the post-processing and measurement tests run the localiser's rules on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lumbar_ray.config import SynthConfig
from lumbar_ray.data.cache import CachedSeries, SeriesCache
from lumbar_ray.data.rsna import RsnaData
from lumbar_ray.data.synthetic import StudySpec, plan_study, write_dataset
from lumbar_ray.localize.study import SAG_T1, SAG_T2, study_series
from lumbar_ray.segment.masks import dataset_masks
from tests.localize.conftest import build_cache


@dataclass
class MaskedStudies:
    """A cached synthetic dataset with its ground truth.

    Attributes:
        root: the RSNA-format folder.
        cfg: what wrote it.
        cache: its sagittal series at 96 px.
        points: the label points in cache pixels.
        data: the RSNA tables.
        series: study id -> its cached series by type (as :func:`localise_study` takes them; sagittal only).
        labels: ``(study_id, series_id)`` -> the label volume on the cache grid.
    """

    root: Path
    cfg: SynthConfig
    cache: SeriesCache
    points: pd.DataFrame
    data: RsnaData
    series: dict[int, dict[str, list[CachedSeries]]]
    labels: dict[tuple[int, int], np.ndarray]

    def plan(self, study_id: int) -> StudySpec:
        """The generator's plan of a study (its anatomy without the annotators' noise), drawn again."""
        from lumbar_ray.data import synthetic

        cfg = self.cfg
        master = np.random.default_rng(cfg.seed if cfg.preset == "easy" else [cfg.seed, 1])
        total = cfg.train_studies + cfg.test_studies
        study_ids, series_ids = synthetic._draw_ids(master, total), synthetic._draw_ids(master, 4 * total)
        index = study_ids.index(study_id)
        rng = np.random.default_rng([cfg.seed, index])
        return plan_study(study_ids[index], series_ids[4 * index : 4 * index + 4], rng, cfg)


def masked_studies(folder: Path, preset: str, studies: int, seed: int = 11) -> MaskedStudies:
    """Write ``studies`` training studies with masks (both sagittal types in every study, the other quirks at
    their defaults) and cache their sagittal series at 96 px without Ray."""
    cfg = SynthConfig(train_studies=studies, test_studies=0, seed=seed, preset=preset, image_sizes=[112, 128],
                      missing_series_rate=0.0, masks=True)  # fmt: skip
    root = write_dataset(folder / "rsna", cfg).root
    cache, points, data = build_cache(root, folder / "cache", sagittal_only=True)
    keys = cache.cached_keys()
    by_study, labels = {}, {}
    for study_id in sorted(data.train_series["study_id"].unique()):
        series = study_series(cache, data.train_series, int(study_id), keys)
        by_study[int(study_id)] = {d: series[d] for d in (SAG_T2, SAG_T1) if series.get(d)}
        for entry in (e for entries in by_study[int(study_id)].values() for e in entries):
            labels[(int(study_id), int(entry.meta.series_id))] = dataset_masks(root, entry)
    return MaskedStudies(root, cfg, cache, points, data, by_study, labels)
