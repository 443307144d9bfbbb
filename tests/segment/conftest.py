"""Small synthetic datasets with masks, written once per module that asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumbar_ray.config import SynthConfig
from lumbar_ray.data import synthetic


def write_masked(folder: Path, preset: str = "easy", size: int = 96) -> Path:
    """Two training studies and one test study with masks, every series' instance numbers shuffled."""
    cfg = SynthConfig(preset=preset, train_studies=2, test_studies=1, seed=4, image_sizes=[size],
                      missing_series_rate=0, shuffled_instances_rate=1.0, masks=True)  # fmt: skip
    return synthetic.write_dataset(folder, cfg).root


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory) -> Path:
    """An easy-preset dataset with masks."""
    return write_masked(tmp_path_factory.mktemp("masked") / "rsna")
