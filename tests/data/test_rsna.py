"""Loading, validation, label encoding and the data report of RSNA-format folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import IGNORE_INDEX, SERIES_TYPES, TARGETS, target_index
from lumbar_ray.data.rsna import (
    RsnaFormatError,
    build_report,
    load_rsna,
)
from lumbar_ray.labels import decode_labels, encode_labels


@pytest.fixture(scope="module")
def real_data(real_rsna_dir: Path):
    return load_rsna(real_rsna_dir)


@pytest.fixture(scope="module")
def real_report(real_data):
    return build_report(real_data)


# --- real files + report


def test_real_tables_are_typed(real_data) -> None:
    assert real_data.train is not None and real_data.train_series is not None
    assert list(real_data.train.columns) == ["study_id", *TARGETS]
    assert real_data.train["study_id"].dtype == np.int64
    assert real_data.train_series["series_id"].dtype == np.int64
    assert real_data.coordinates is None  # not shipped in shared/rsna
    assert real_data.test_series is not None and len(real_data.test_series) == 3
    assert real_data.sample_submission is not None and len(real_data.sample_submission) == 25
    assert real_data.sample_submission["severe"].dtype == np.float64
    assert real_data.train_images_dir is None


def test_real_report_figures(real_report) -> None:
    report = real_report
    assert report.n_studies == 1975
    assert report.empty_label_cells == 572
    assert report.studies_with_empty_labels == 185
    assert report.n_series == 6294
    assert report.series_by_type == {"Sagittal T1": 1980, "Sagittal T2/STIR": 1974, "Axial T2": 2340}
    assert len(report.studies_missing_series["Sagittal T1"]) == 2
    assert len(report.studies_missing_series["Sagittal T2/STIR"]) == 1
    assert report.studies_missing_series["Axial T2"] == []
    assert report.studies_with_multiple_series["Axial T2"] == 335
    assert report.multi_series_counts["Axial T2"] == {2: 306, 3: 28, 4: 1}
    assert report.multi_series_counts["Sagittal T1"] == {2: 7}
    assert report.studies_without_series == [] and report.series_without_study == []
    assert report.any_severe_spinal_studies == 365
    spinal = report.class_frequencies["spinal"]
    assert spinal["Normal/Mild"] == pytest.approx(0.878, abs=1e-3)
    assert spinal["Severe"] == pytest.approx(0.048, abs=1e-3)
    assert report.n_test_studies == 1 and report.n_test_series == 3
    assert report.missing_image_series is None


def test_real_report_text_and_dict(real_report) -> None:
    text = real_report.format()
    assert "1,975 studies" in text
    assert "572 empty label cells in 185 studies" in text
    assert "series: 6,294" in text
    assert "studies without Sagittal T1: 2 (" in text
    assert "studies without Sagittal T2/STIR: 1 (" in text
    assert "studies with more than one Axial T2 series: 335" in text
    as_dict = json.loads(json.dumps(real_report.to_dict()))
    assert as_dict["n_studies"] == 1975
    assert as_dict["studies_with_multiple_series"]["Axial T2"] == 335


def test_report_checks_image_folders(tmp_path: Path, real_rsna_dir: Path) -> None:
    series = pd.read_csv(real_rsna_dir / "train_series_descriptions.csv").head(6)
    series.to_csv(tmp_path / "train_series_descriptions.csv", index=False)
    present = series.iloc[:4]
    for study, series_id in zip(present["study_id"], present["series_id"], strict=True):
        (tmp_path / "train_images" / str(study) / str(series_id)).mkdir(parents=True)
    report = build_report(load_rsna(tmp_path), check_images=True)
    expected = [(int(s), int(r)) for s, r in zip(series["study_id"][4:], series["series_id"][4:], strict=True)]
    assert report.missing_image_series == {"train_images": sorted(expected)}
    assert "series folders missing under train_images/: 2" in report.format()


def test_report_flags_orphans(tmp_path: Path, real_rsna_dir: Path) -> None:
    train = pd.read_csv(real_rsna_dir / "train.csv").head(3)
    series = pd.read_csv(real_rsna_dir / "train_series_descriptions.csv")
    studies = train["study_id"].tolist()
    kept = series[series["study_id"].isin(studies[:2])]
    orphan = pd.DataFrame({"study_id": [1], "series_id": [2], "series_description": ["Axial T2"]})
    train.to_csv(tmp_path / "train.csv", index=False)
    pd.concat([kept, orphan]).to_csv(tmp_path / "train_series_descriptions.csv", index=False)
    report = build_report(load_rsna(tmp_path))
    assert report.studies_without_series == [studies[2]]
    assert report.series_without_study == [2]
    assert all(studies[2] in report.studies_missing_series[kind] for kind in SERIES_TYPES)


def test_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_rsna(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_rsna(tmp_path)


def test_test_only_folder(tmp_path: Path, real_rsna_dir: Path) -> None:
    for name in ("test_series_descriptions.csv", "sample_submission.csv"):
        shutil.copy(real_rsna_dir / name, tmp_path / name)
    data = load_rsna(tmp_path)
    assert data.train is None and data.train_series is None and data.coordinates is None
    assert data.test_series is not None
    report = build_report(data)
    assert report.n_studies == 0 and report.n_test_studies == 1


# --- label arrays


def test_encode_labels_shape_order_and_ignore(real_data) -> None:
    study_ids, labels = encode_labels(real_data.train)
    assert study_ids.dtype == np.int64 and labels.dtype == np.int64
    assert labels.shape == (1975, 25)
    assert (labels == IGNORE_INDEX).sum() == 572
    assert set(np.unique(labels)) == {IGNORE_INDEX, 0, 1, 2}
    # Second real row: 4646740, spinal L4/L5 Severe, spinal L3/L4 Moderate, left subarticular L4/L5 Severe.
    row = int(np.flatnonzero(study_ids == 4646740)[0])
    assert labels[row, target_index("spinal_canal_stenosis", "l4_l5")] == 2
    assert labels[row, target_index("spinal_canal_stenosis", "l3_l4")] == 1
    assert labels[row, target_index("left_subarticular_stenosis", "l4_l5")] == 2
    assert labels[row, target_index("spinal_canal_stenosis", "l1_l2")] == 0
    # The same from a raw read (strings and NaN instead of categoricals).
    raw_ids, raw_labels = encode_labels(pd.read_csv(Path(real_data.root) / "train.csv"))
    np.testing.assert_array_equal(raw_ids, study_ids)
    np.testing.assert_array_equal(raw_labels, labels)


def test_decode_round_trip(real_data, tmp_path: Path) -> None:
    study_ids, labels = encode_labels(real_data.train)
    frame = decode_labels(study_ids, labels)
    assert list(frame.columns) == ["study_id", *TARGETS]
    assert frame.iloc[:, 1:].isna().sum().sum() == 572
    frame.to_csv(tmp_path / "train.csv", index=False)
    again = load_rsna(tmp_path).train
    np.testing.assert_array_equal(encode_labels(again)[1], labels)
    with pytest.raises(ValueError, match="class id"):
        decode_labels(study_ids[:1], np.full((1, 25), 3))


def test_encode_rejects_unknown_severity() -> None:
    frame = decode_labels(np.array([1]), np.zeros((1, 25), dtype=np.int64))
    frame.loc[0, TARGETS[3]] = "Severely"
    with pytest.raises(ValueError, match="Severely"):
        encode_labels(frame)


# --- validation errors


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def train_lines(real_rsna_dir: Path) -> list[str]:
    """Header and first four rows of the real train.csv."""
    return (real_rsna_dir / "train.csv").read_text().splitlines()[:5]


@pytest.fixture
def series_lines(real_rsna_dir: Path) -> list[str]:
    """Header and first six rows of the real series descriptions (studies 4003253 and 4646740)."""
    return (real_rsna_dir / "train_series_descriptions.csv").read_text().splitlines()[:7]


def _assert_error(error: pytest.ExceptionInfo, file: str, line: int, value: str) -> None:
    message = str(error.value)
    assert file in message
    assert f"line {line}:" in message
    assert value in message
    assert error.value.line == line and error.value.file.name == file


def test_train_missing_column(tmp_path: Path, train_lines: list[str]) -> None:
    frame = pd.DataFrame([line.split(",") for line in train_lines[1:]], columns=train_lines[0].split(","))
    frame.drop(columns=["left_subarticular_stenosis_l2_l3"]).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 1, "left_subarticular_stenosis_l2_l3")
    assert "missing column" in str(error.value)


def test_train_unknown_label_column(tmp_path: Path, train_lines: list[str]) -> None:
    lines = [train_lines[0] + ",spinal_canal_stenosis_l6_l7"] + [line + ",Moderate" for line in train_lines[1:]]
    _write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 1, "spinal_canal_stenosis_l6_l7")


def test_train_unknown_severity(tmp_path: Path, train_lines: list[str]) -> None:
    lines = list(train_lines)
    cells = lines[3].split(",")
    cells[7] = "Moderat"
    lines[3] = ",".join(cells)
    _write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 4, "'Moderat'")
    assert "unknown severity" in str(error.value)


def test_train_duplicate_study(tmp_path: Path, train_lines: list[str]) -> None:
    _write(tmp_path / "train.csv", "\n".join([*train_lines, train_lines[2]]) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 6, train_lines[2].split(",")[0])
    assert "duplicate study row (first at line 3)" in str(error.value)


def test_train_non_integer_id(tmp_path: Path, train_lines: list[str]) -> None:
    lines = list(train_lines)
    lines[2] = "46467x40" + lines[2][len("4646740") :]
    _write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 3, "46467x40")
    assert "non-integer study_id" in str(error.value)


def test_blank_lines_keep_line_numbers(tmp_path: Path, train_lines: list[str]) -> None:
    lines = [
        train_lines[0],
        train_lines[1],
        "",
        train_lines[2],
        train_lines[3].replace("Normal/Mild", "normal", 1),
    ]
    _write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train.csv", 5, "'normal'")


def test_series_unknown_description(tmp_path: Path, series_lines: list[str]) -> None:
    lines = list(series_lines)
    lines[2] = lines[2].rsplit(",", 1)[0] + ",Sagittal T3"
    _write(tmp_path / "train_series_descriptions.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train_series_descriptions.csv", 3, "'Sagittal T3'")
    assert "unknown series description" in str(error.value)


def test_series_duplicate(tmp_path: Path, series_lines: list[str]) -> None:
    _write(tmp_path / "train_series_descriptions.csv", "\n".join([*series_lines, series_lines[1]]) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train_series_descriptions.csv", 8, series_lines[1].split(",")[1])
    assert "duplicate series row (first at line 2)" in str(error.value)


def test_series_non_integer_series_id(tmp_path: Path, series_lines: list[str]) -> None:
    lines = list(series_lines)
    study, _, description = lines[4].split(",")
    lines[4] = f"{study},12.5,{description}"
    _write(tmp_path / "test_series_descriptions.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "test_series_descriptions.csv", 5, "'12.5'")
    assert "non-integer series_id" in str(error.value)


def test_series_missing_column(tmp_path: Path) -> None:
    _write(tmp_path / "train_series_descriptions.csv", "study_id,series_id\n1,2\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "train_series_descriptions.csv", 1, "series_description")


# Coordinates of study 4003253; series 702807833 is its Sagittal T2/STIR in the real series descriptions.
_COORDINATES = (
    "study_id,series_id,instance_number,condition,level,x,y\n"
    "4003253,702807833,8,Spinal Canal Stenosis,L1/L2,322.83,227.96\n"
    "4003253,702807833,8,Spinal Canal Stenosis,L2/L3,320.57,295.33\n"
    "4003253,702807833,8,Spinal Canal Stenosis,L3/L4,323.03,371.76\n"
)


def _coordinates_folder(tmp_path: Path, series_lines: list[str], text: str) -> Path:
    _write(tmp_path / "train_series_descriptions.csv", "\n".join(series_lines) + "\n")
    _write(tmp_path / "train_label_coordinates.csv", text)
    return tmp_path


def test_coordinates_valid(tmp_path: Path, series_lines: list[str]) -> None:
    data = load_rsna(_coordinates_folder(tmp_path, series_lines, _COORDINATES))
    coordinates = data.coordinates
    assert coordinates is not None and len(coordinates) == 3
    assert coordinates["instance_number"].dtype == np.int64 and coordinates["x"].dtype == np.float64
    assert build_report(data).n_coordinates == 3


def test_coordinates_unknown_condition(tmp_path: Path, series_lines: list[str]) -> None:
    text = _COORDINATES.replace("Spinal Canal Stenosis,L2/L3", "Spinal Stenosis,L2/L3")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(_coordinates_folder(tmp_path, series_lines, text))
    _assert_error(error, "train_label_coordinates.csv", 3, "'Spinal Stenosis'")
    assert "unknown condition" in str(error.value)


def test_coordinates_unknown_level(tmp_path: Path, series_lines: list[str]) -> None:
    text = _COORDINATES.replace("L3/L4", "L3-L4")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(_coordinates_folder(tmp_path, series_lines, text))
    _assert_error(error, "train_label_coordinates.csv", 4, "'L3-L4'")
    assert "unknown level" in str(error.value)


def test_coordinates_unknown_series(tmp_path: Path, series_lines: list[str]) -> None:
    # 3201256954 is a real series, but of study 4646740, not 4003253.
    text = _COORDINATES.replace(
        "4003253,702807833,8,Spinal Canal Stenosis,L2/L3", "4003253,3201256954,8,Spinal Canal Stenosis,L2/L3"
    )
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(_coordinates_folder(tmp_path, series_lines, text))
    _assert_error(error, "train_label_coordinates.csv", 3, "3201256954")
    assert "not listed for study 4003253" in str(error.value)


def test_coordinates_non_integer_instance(tmp_path: Path, series_lines: list[str]) -> None:
    text = _COORDINATES.replace(
        "702807833,8,Spinal Canal Stenosis,L3/L4", "702807833,eight,Spinal Canal Stenosis,L3/L4"
    )
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(_coordinates_folder(tmp_path, series_lines, text))
    _assert_error(error, "train_label_coordinates.csv", 4, "'eight'")


def test_coordinates_missing_column(tmp_path: Path, series_lines: list[str]) -> None:
    text = "\n".join(line.rsplit(",", 1)[0] for line in _COORDINATES.splitlines()) + "\n"
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(_coordinates_folder(tmp_path, series_lines, text))
    _assert_error(error, "train_label_coordinates.csv", 1, "'y'")


def test_sample_submission_malformed_row_id(tmp_path: Path, real_rsna_dir: Path) -> None:
    lines = (real_rsna_dir / "sample_submission.csv").read_text().splitlines()
    lines[7] = lines[7].replace("_l", "_L", 1)
    _write(tmp_path / "sample_submission.csv", "\n".join(lines) + "\n")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(tmp_path)
    _assert_error(error, "sample_submission.csv", 8, lines[7].split(",")[0])
