"""The digest of the training data: the CSVs' contents and the preprocessing, not where the folder lies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lumbar_ray.config import PreprocessConfig, cache_settings
from lumbar_ray.data.lineage import TRAINING_FILES, DataDigest, data_digest, normalised_bytes

SETTINGS = cache_settings(PreprocessConfig())
TRAIN = "study_id,spinal_canal_stenosis_l1_l2\n1,Normal/Mild\n2,Severe\n"
SERIES = "study_id,series_id,series_description\n1,10,Sagittal T1\n2,20,Sagittal T1\n"
COORDINATES = "study_id,series_id,instance_number,condition,level,x,y\n1,10,3,Spinal Canal Stenosis,L1/L2,5.0,6.0\n"


def _folder(root: Path, train: str = TRAIN, newline: str = "\n") -> Path:
    root.mkdir(parents=True)
    for name, text in zip(TRAINING_FILES, (train, SERIES, COORDINATES), strict=True):
        (root / name).write_bytes(text.replace("\n", newline).encode())
    (root / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n")
    return root


def test_same_contents_elsewhere_give_the_same_digest(tmp_path: Path) -> None:
    first = data_digest(_folder(tmp_path / "a"), SETTINGS)
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(tmp_path / "a", copy)
    (copy / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n9,9,Axial T2\n")
    again = data_digest(copy, SETTINGS)
    assert again.digest == first.digest and again.root != first.root
    assert first.digest.startswith("data-") and len(first.digest) == len("data-") + 16
    assert str(first) == first.digest and DataDigest.from_json(first.to_json()) == first
    assert set(first.to_json()["files"]) == set(TRAINING_FILES)


def test_line_endings_do_not_matter(tmp_path: Path) -> None:
    unix = data_digest(_folder(tmp_path / "unix"), SETTINGS)
    windows = data_digest(_folder(tmp_path / "windows", newline="\r\n"), SETTINGS)
    assert windows.digest == unix.digest
    assert normalised_bytes(b"a\r\nb\rc\n\n") == b"a\nb\nc"


def test_one_changed_label_changes_the_digest(tmp_path: Path) -> None:
    before = data_digest(_folder(tmp_path / "a"), SETTINGS)
    after = data_digest(_folder(tmp_path / "b", train=TRAIN.replace("2,Severe", "2,Moderate")), SETTINGS)
    assert after.digest != before.digest
    assert after.files[TRAINING_FILES[1]] == before.files[TRAINING_FILES[1]]  # only train.csv differs


def test_other_preprocessing_changes_the_digest(tmp_path: Path) -> None:
    root = _folder(tmp_path / "a")
    other = cache_settings(PreprocessConfig(image_size=128))
    assert data_digest(root, other).digest != data_digest(root, SETTINGS).digest
    # resources of the preprocessing are not settings of the cache: same digest
    assert data_digest(root, cache_settings(PreprocessConfig(workers=7))).digest == data_digest(root, SETTINGS).digest


def test_a_missing_training_file_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "a")
    (root / TRAINING_FILES[2]).unlink()
    with pytest.raises(FileNotFoundError, match="train_label_coordinates.csv"):
        data_digest(root, SETTINGS)
