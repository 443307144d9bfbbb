"""The study pipeline: DICOM files read in memory as the batch path caches them, scored alike, rows with points in
the original images."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from lumbar_ray.config import CropConfig, LocalizeConfig, PreprocessConfig
from lumbar_ray.constants import CONDITION_TITLES, LEVEL_TITLES, TARGETS, target_index
from lumbar_ray.inference.study import (
    ROW_COLUMNS,
    StudyInput,
    StudyScorer,
    read_study,
    series_ids,
    study_files,
    study_id_from_folder,
    study_rows,
)
from lumbar_ray.localize.study import AXIAL, SAG_T1, SAG_T2
from tests.localize.conftest import build_cache

CROP = CropConfig(size=16, region=24, slices=3)
SETTINGS = PreprocessConfig(image_size=96)


class CropMeans:
    """A stand-in fold ensemble: each target's probabilities from its crop's mean intensity (any change in a crop
    changes them), the prior where it has none."""

    def __init__(self) -> None:
        self.inputs = {"crops": CROP}
        self.prior = np.tile([0.7, 0.2, 0.1], (len(TARGETS), 1))

    def predict_crops(self, model_input, fold=None) -> np.ndarray:
        means = torch.from_numpy(np.asarray(model_input["crops"])).mean(dim=(2, 3, 4))  # (B, 25)
        logits = torch.stack([means * 3, -means, means.square()], dim=-1)
        return torch.softmax(logits.double(), dim=-1).numpy()

    def calibrated_prior(self, fold=None) -> np.ndarray:
        return self.prior


class LabelLocator:
    """Stands in for a detector: the labelled points of the series it was made for."""

    def __init__(self, points: pd.DataFrame, series_id: int) -> None:
        self.rows = points[points["series_id"] == series_id]

    def locate(self, volume: np.ndarray, left_first: bool = True) -> pd.DataFrame:
        out = self.rows[["target", "slice", "x", "y"]].astype(float).assign(confidence=0.9, filled=False)
        return out.astype({"target": int})


@pytest.fixture(scope="module")
def complete_study(synthetic_dir, tmp_path_factory):
    """A training study with all three series types and 25 label points, cached by the batch path."""
    from lumbar_ray.data.rsna import load_rsna

    data = load_rsna(synthetic_dir)
    series = data.train_series
    for study_id in sorted(series["study_id"].unique())[:12]:
        types = set(series.loc[series["study_id"] == study_id, "series_description"])
        if {SAG_T1, SAG_T2, AXIAL} <= types and len(series[series["study_id"] == study_id]) == 3:
            cache, points, _ = build_cache(synthetic_dir, tmp_path_factory.mktemp("batch_cache"), [int(study_id)])
            if len(points[points["study_id"] == study_id]) == len(TARGETS):
                folder = synthetic_dir / "train_images" / str(study_id)
                return int(study_id), folder, cache, points[points["study_id"] == study_id], data
    pytest.fail("no complete study among the first synthetic studies")


def test_a_study_read_from_its_files_is_cached_as_the_batch_path_caches_it(complete_study):
    study_id, folder, cache, _, data = complete_study
    study = read_study(study_files(folder), study_id, SETTINGS)
    listed = data.train_series[data.train_series["study_id"] == study_id].sort_values("series_id")
    assert study.series.sort_values("series_id")[["series_id", "series_description"]].values.tolist() == \
        listed[["series_id", "series_description"]].values.tolist()  # fmt: skip
    assert not study.skipped
    for series_id in listed["series_id"]:
        batch, memory = cache.read(study_id, int(series_id)), study.cache.read(study_id, int(series_id))
        np.testing.assert_array_equal(memory.volume, batch.volume)
        assert {**memory.meta.to_json(), "split": None} == {**batch.meta.to_json(), "split": None}


def test_from_memory_and_from_the_cache_a_study_scores_alike_and_its_points_map_back_to_the_labels(complete_study):
    study_id, folder, cache, points, data = complete_study
    study = read_study(study_files(folder), study_id, SETTINGS)
    detectors = {description: LabelLocator(points, int(study.series.loc[study.series["series_description"]
                                                                         == description, "series_id"].iloc[0]))
                 for description in (SAG_T2, SAG_T1)}  # fmt: skip
    scorer = StudyScorer(CropMeans(), detectors, LocalizeConfig())
    listed = data.train_series[data.train_series["study_id"] == study_id]
    from_cache = scorer.score([StudyInput(study_id, cache, listed)])[0]
    from_memory = scorer.score([StudyInput(study_id, study.cache, study.series)])[0]
    np.testing.assert_array_equal(from_memory.probs, from_cache.probs)
    assert from_memory.has_crop.all() and np.allclose(from_memory.probs.sum(axis=1), 1.0)

    rows = study_rows(from_memory, study.cache, study)
    assert list(rows.columns) == list(ROW_COLUMNS) and len(rows) == len(TARGETS)
    uid_of = {}
    for path in folder.rglob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uid_of[(int(path.parent.name), int(header.InstanceNumber))] = str(header.SOPInstanceUID)
    coordinates = data.coordinates[data.coordinates["study_id"] == study_id]
    sagittal = rows[~rows["row_id"].str.contains("subarticular")]
    for row in sagittal.itertuples(index=False):
        assert row.sop_instance_uid == uid_of[(row.series_id, row.instance_number)]
        condition, level = next((c, lv) for c in CONDITION_TITLES for lv in LEVEL_TITLES
                                if row.row_id == f"{study_id}_{c}_{lv}")  # fmt: skip
        label = coordinates[(coordinates["condition"] == CONDITION_TITLES[condition])
                            & (coordinates["level"] == LEVEL_TITLES[level])].iloc[0]  # fmt: skip
        assert row.instance_number == label["instance_number"]
        assert abs(row.column - label["x"]) < 0.02 and abs(row.row - label["y"]) < 0.02
    assert not rows["prior"].any() and not rows["missing_series"].any()


def test_a_missing_series_type_flags_its_targets_and_an_unreadable_file_is_listed(complete_study, tmp_path):
    study_id, folder, _, points, _ = complete_study
    copy = shutil.copytree(folder, tmp_path / str(study_id))
    study = read_study(study_files(copy), study_id, SETTINGS)
    axial = int(study.series.loc[study.series["series_description"] == AXIAL, "series_id"].iloc[0])
    shutil.rmtree(copy / str(axial))
    (copy / "notes.dcm").write_text("not DICOM")
    study = read_study(study_files(copy), study_id, SETTINGS, root=copy)
    assert [item["file"] for item in study.skipped] == ["notes.dcm"]
    detectors = {description: LabelLocator(points, int(study.series.loc[study.series["series_description"]
                                                                         == description, "series_id"].iloc[0]))
                 for description in (SAG_T2, SAG_T1)}  # fmt: skip
    scored = StudyScorer(CropMeans(), detectors, LocalizeConfig()).score([StudyInput(study_id, study.cache,
                                                                                     study.series)])[0]  # fmt: skip
    rows = study_rows(scored, study.cache, study).set_index("row_id")
    subarticular = rows[rows.index.str.contains("subarticular")]
    assert subarticular["missing_series"].all() and subarticular["prior"].all()
    assert subarticular["sop_instance_uid"].isna().all()
    np.testing.assert_allclose(subarticular[["normal_mild", "moderate", "severe"]].to_numpy(),
                               np.tile([0.7, 0.2, 0.1], (10, 1)))  # fmt: skip
    spinal = rows.loc[f"{study_id}_spinal_canal_stenosis_l4_l5"]
    assert not spinal["missing_series"] and not spinal["prior"]
    assert scored.has_crop[target_index("spinal_canal_stenosis", "l4_l5")]


def test_study_and_series_ids_come_from_numeric_folders_else_are_numbered(tmp_path):
    files = [tmp_path / "123" / "7" / "1.dcm", tmp_path / "123" / "9" / "1.dcm"]
    assert study_id_from_folder(tmp_path, files) == 123
    assert study_id_from_folder(tmp_path / "123", [f for f in files]) == 123
    assert study_id_from_folder(tmp_path, [tmp_path / "a" / "1.dcm", tmp_path / "b" / "1.dcm"]) is None
    assert study_id_from_folder(tmp_path, [tmp_path / "7" / "1.dcm"]) is None  # a lone series folder is no study

    class Group:
        def __init__(self, *paths):
            self.files = paths

    groups = [Group(tmp_path / "7" / "1.dcm"), Group(tmp_path / "t2" / "1.dcm"), Group(tmp_path / "1" / "1.dcm"),
              Group(tmp_path / "x" / "1.dcm", tmp_path / "y" / "2.dcm")]  # fmt: skip
    assert series_ids(groups) == [7, 2, 1, 3]
