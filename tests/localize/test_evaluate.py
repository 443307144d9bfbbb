"""Localisation errors turned into training jitter: per series type, the bounds that reach the measured errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import load_config
from lumbar_ray.constants import TARGETS
from lumbar_ray.data.augment import jitter_bounds
from lumbar_ray.localize.evaluate import ERROR_COLUMNS, jitter_from_errors, jitter_values


def _errors() -> pd.DataFrame:
    """Hand-made held-out errors: Sagittal T2/STIR 1..10 px with slices 7 x 0, 2 x 1, 1 x 2 off; Axial T2 2 px
    with every point on another stack (no slice error); Sagittal T1 absent."""
    rows = [(1, 0, "Sagittal T2/STIR", "l1_l2", s == 0, float(s), float(px), 0.8 * px, 1.0)
            for px, s in zip(range(1, 11), [0, 0, 0, 0, 0, 0, 0, 1, 1, 2], strict=True)]  # fmt: skip
    rows += [(2, 15, "Axial T2", "l1_l2", True, np.nan, px, 0.4 * px, 0.5) for px in (2.0, 2.0, 2.0, 2.0, np.nan)]
    return pd.DataFrame(rows, columns=list(ERROR_COLUMNS))


def test_bounds_are_the_quantiles_of_the_measured_errors_per_series_type():
    px, slices = jitter_from_errors(_errors())
    assert px == {"Axial T2": 2.0, "Sagittal T2/STIR": pytest.approx(9.1)}  # linear quantile of 1..10
    assert slices == {"Sagittal T2/STIR": 1}  # 90 % are at most 1 slice off; no slice error across stacks
    assert isinstance(slices["Sagittal T2/STIR"], int)
    px_half, slices_half = jitter_from_errors(_errors(), quantile=0.5)
    assert px_half["Sagittal T2/STIR"] == pytest.approx(5.5) and slices_half == {"Sagittal T2/STIR": 0}
    assert jitter_from_errors(_errors(), quantile=1.0)[1] == {"Sagittal T2/STIR": 2}
    with pytest.raises(ValueError, match="quantile"):
        jitter_from_errors(_errors(), quantile=0.0)
    assert jitter_from_errors(_errors().iloc[:0]) == ({}, {})


def test_measured_bounds_become_the_training_jitter_of_their_targets_only():
    cfg = load_config(None, ["augment.jitter_px=6.0", "augment.jitter_slices=1"], values=jitter_values(_errors()))
    px, slices = jitter_bounds(cfg.augment)
    for target, name in enumerate(TARGETS):
        if name.startswith("spinal"):
            assert (px[target], slices[target]) == (pytest.approx(9.1), 1)
        elif "subarticular" in name:
            assert (px[target], slices[target]) == (2.0, 1)  # no measured slice error: jitter_slices stays
        else:  # foraminal (Sagittal T1): nothing measured, the global jitter stays
            assert (px[target], slices[target]) == (6.0, 1)
    assert jitter_values(_errors().iloc[:0]) == {}
