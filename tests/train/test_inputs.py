"""``cv.predicted_points``: the predicted points a CV also scores its held-out folds at."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import POINT_COLUMNS
from lumbar_ray.train.inputs import read_predicted_points


def _points(study_ids: list[int]) -> pd.DataFrame:
    rows = [{"study_id": s, "target": t, "series_id": 7, "slice": 2, "x": 10.5, "y": 11.5}
            for s in study_ids for t in (0, 5)]  # fmt: skip
    return pd.DataFrame(rows)[list(POINT_COLUMNS)]


def test_predicted_points_are_read_and_a_study_without_any_is_logged(tmp_path, caplog):
    path = tmp_path / "points.parquet"
    _points([1, 2, 3]).assign(extra=1).to_parquet(path)
    frame = read_predicted_points(str(path), np.array([1, 2, 3, 4]))
    assert list(frame.columns) == list(POINT_COLUMNS) and len(frame) == 6
    assert "1 studies without a predicted point" in caplog.text and "[4]" in caplog.text


def test_points_of_other_data_or_without_coordinates_are_errors(tmp_path):
    path = tmp_path / "points.parquet"
    _points([1]).to_parquet(path)
    with pytest.raises(ValueError, match="3 of 4 training studies have no predicted point"):
        read_predicted_points(str(path), np.array([1, 2, 3, 4]))
    _points([1, 2]).drop(columns=["x"]).to_parquet(path)
    with pytest.raises(ValueError, match=r"lacks the columns \['x'\]"):
        read_predicted_points(str(path), np.array([1, 2]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_predicted_points(str(tmp_path / "nothing.parquet"), np.array([1]))
