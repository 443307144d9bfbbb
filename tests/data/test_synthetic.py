"""The synthetic RSNA-format dataset: valid files, the real quirks, and a planted, measurable signal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lumbar_ray.config import SynthConfig
from lumbar_ray.constants import CONDITION_TITLES, CONDITIONS, LEVEL_TITLES, LEVELS, SEVERITIES
from lumbar_ray.data import grading, synthetic
from lumbar_ray.data.dicom import read_series, read_slice
from lumbar_ray.data.rsna import build_report, load_rsna
from lumbar_ray.labels import encode_labels
from lumbar_ray.segment.labels import (
    CANAL,
    LABEL_TABLE,
    LABELS_JSON,
    LESION_OFFSET,
    MASKS_DIR,
    disc_value,
    foramen_value,
    mask_file,
)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_gives_same_bytes_and_another_seed_differs(tmp_path):
    cfg = SynthConfig(train_studies=2, test_studies=1, seed=3, image_sizes=[96])
    first = synthetic.write_dataset(tmp_path / "a", cfg)
    second = synthetic.write_dataset(tmp_path / "b", cfg)
    other = synthetic.write_dataset(tmp_path / "c", cfg.model_copy(update={"seed": 4}))
    assert first.files == second.files > 0
    assert _tree_digest(first.root) == _tree_digest(second.root)
    assert _tree_digest(first.root) != _tree_digest(other.root)


def test_existing_dataset_is_reused_and_foreign_folder_refused(tmp_path):
    cfg = SynthConfig(train_studies=1, test_studies=0, image_sizes=[96])
    synthetic.write_dataset(tmp_path / "d", cfg)
    assert synthetic.write_dataset(tmp_path / "d", cfg).reused
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="foreign"):
        synthetic.write_dataset(tmp_path / "foreign", cfg)


def test_class_frequencies_match_the_real_ones():
    rng = np.random.default_rng(0)
    labels = np.stack([synthetic.sample_severities(rng) for _ in range(4000)])
    for c_index, condition in enumerate(CONDITIONS):
        for l_index in range(len(LEVELS)):
            column = labels[:, c_index * len(LEVELS) + l_index]
            observed = np.bincount(column, minlength=3) / len(column)
            expected = np.array(synthetic.REAL_CLASS_FREQUENCIES[condition][l_index])
            np.testing.assert_allclose(observed, expected, atol=0.025, err_msg=f"{condition} {l_index}")


@pytest.fixture(params=["easy", "hard"])
def preset_dir(request) -> tuple[Path, SynthConfig]:
    """Both presets' fixture datasets with their configs: checks of the RSNA format hold for each."""
    if request.param == "easy":
        return request.getfixturevalue("synthetic_dir"), request.getfixturevalue("synthetic_config")
    return request.getfixturevalue("hard_dir"), request.getfixturevalue("hard_config")


def test_dataset_round_trips_through_loader_and_reader(preset_dir):
    synthetic_dir, synthetic_config = preset_dir
    data = load_rsna(synthetic_dir)
    study_ids, _ = encode_labels(data.train)
    assert len(study_ids) == synthetic_config.train_studies
    assert set(data.sample_submission["row_id"].str.split("_").str[0].astype(int)) == set(data.test_series["study_id"])
    report = build_report(data, check_images=True)
    assert report.to_dict()["n_studies"] == synthetic_config.train_studies
    for split, frame in (("train", data.train_series), ("test", data.test_series)):
        for row in frame.itertuples():
            series = read_series(synthetic_dir / f"{split}_images" / str(row.study_id) / str(row.series_id))
            assert series.n_slices == series.n_files > 0
            for stack in series.stacks:  # sorted along the normal even when instance numbers are shuffled
                assert np.all(np.diff(stack.positions_along_normal) > 0)


def test_coordinates_point_at_existing_instances_inside_the_image(preset_dir):
    synthetic_dir, _ = preset_dir
    data = load_rsna(synthetic_dir)
    coords = data.coordinates
    assert len(coords) > 0
    for row in coords.itertuples():
        path = synthetic_dir / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert 0 <= row.x < ds.Columns and 0 <= row.y < ds.Rows, row
        expected = {"Spinal": "Sagittal T2/STIR", "Neural": "Sagittal T1", "Subart": "Axial T2"}
        kind = "Spinal" if row.condition.startswith("Spinal") else row.condition.split()[1][:6]
        assert ds.SeriesDescription == expected[kind]


def test_left_foramina_lie_on_the_patients_left(synthetic_dir):
    """Patient left is +x in DICOM LPS: left-foramen slices have a larger x than right-foramen slices."""
    coords = load_rsna(synthetic_dir).coordinates
    foramina = coords[coords["condition"].str.contains("Foraminal")]
    checked = 0
    for (study, series), group in foramina.groupby(["study_id", "series_id"]):
        x_of = {}
        for row in group.itertuples():
            path = synthetic_dir / "train_images" / str(study) / str(series) / f"{row.instance_number}.dcm"
            x_of.setdefault(row.condition.split()[0], []).append(float(pydicom.dcmread(path).ImagePositionPatient[0]))
        if {"Left", "Right"} <= x_of.keys():
            assert min(x_of["Left"]) > max(x_of["Right"])
            checked += 1
    assert checked > 10


def _window_means(root: Path, latent: bool = False) -> pd.DataFrame:
    """Mean of a 3x3 window at each labelled point, scaled by the slice's 99th percentile.

    ``severity`` is the label, or with ``latent`` the hard preset's latent severity of the target.
    """
    data = load_rsna(root)
    study_ids, labels = encode_labels(data.train)
    if latent:
        labels = pd.read_csv(root / synthetic.SEVERITY_NAME).set_index("study_id").loc[study_ids].to_numpy()
    label_of = {sid: row for sid, row in zip(study_ids, labels, strict=True)}
    rows = []
    for row in data.coordinates.itertuples():
        path = root / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm"
        pixels = read_slice(path).pixels
        x, y = round(row.x), round(row.y)
        window = pixels[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        condition = next(c for c, title in CONDITION_TITLES.items() if title == row.condition)
        level = next(lv for lv, title in LEVEL_TITLES.items() if title == row.level)
        target = CONDITIONS.index(condition) * len(LEVELS) + LEVELS.index(level)
        rows.append(
            {
                "group": condition.split("_")[-2] if "subarticular" in condition else condition.split("_")[-1],
                "severity": label_of[row.study_id][target],
                "value": float(window.mean() / np.percentile(pixels, 99)),
            }
        )
    return pd.DataFrame(rows)


def test_planted_severity_is_measurable_at_the_labelled_points(synthetic_dir):
    means = _window_means(synthetic_dir).groupby(["group", "severity"])["value"].agg(["mean", "count"])
    for group in ("stenosis", "narrowing", "subarticular"):
        by_severity = means.loc[group]
        assert list(by_severity.index) == [0, 1, 2], f"{group}: every severity must occur in the fixture"
        values = by_severity["mean"].to_numpy()
        # Lesions replace bright CSF / fat with dark tissue: brightness falls with severity, clearly.
        assert values[0] > values[1] > values[2], (group, by_severity)
        assert values[0] - values[2] > 0.25, (group, by_severity)


@pytest.mark.slow
def test_without_planted_lesions_severity_is_not_visible(tmp_path, synthetic_config):
    """Control: with signal_strength=0 the same windows no longer separate the severities."""
    cfg = synthetic_config.model_copy(update={"signal_strength": 0.0, "train_studies": 25, "test_studies": 0})
    means = _window_means(synthetic.write_dataset(tmp_path / "flat", cfg).root)
    by_group = means.groupby(["group", "severity"])["value"].mean()
    for group in ("stenosis", "narrowing", "subarticular"):
        values = by_group.loc[group]
        assert values.max() - values.min() < 0.1, (group, values)


def test_quirks_appear_when_asked_for(tmp_path):
    cfg = SynthConfig(
        train_studies=4,
        test_studies=0,
        image_sizes=[96],
        extra_axial_rate=1.0,
        tilted_axial_rate=1.0,
        shuffled_instances_rate=1.0,
        missing_series_rate=0.0,
        empty_label_rate=0.0,
    )
    root = synthetic.write_dataset(tmp_path / "quirks", cfg).root
    data = load_rsna(root)
    axial = data.train_series[data.train_series["series_description"] == "Axial T2"]
    assert axial.groupby("study_id").size().eq(2).all()
    first_axial = axial.groupby("study_id").head(1)
    for row in first_axial.itertuples():  # tilted per-level blocks: several orientations in one series
        series = read_series(root / "train_images" / str(row.study_id) / str(row.series_id))
        assert len(series.stacks) > 1
    sagittal = data.train_series[data.train_series["series_description"] == "Sagittal T1"].iloc[0]
    folder = root / "train_images" / str(sagittal.study_id) / str(sagittal.series_id)
    by_instance = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    xs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0]) for p in by_instance]
    assert np.any(np.diff(xs) > 0) and np.any(np.diff(xs) < 0), "instance numbers should ignore space"


def test_missing_series_and_empty_cells_are_reported(tmp_path):
    cfg = SynthConfig(train_studies=6, test_studies=0, image_sizes=[96], missing_series_rate=1.0, empty_label_rate=0.2)
    data = load_rsna(synthetic.write_dataset(tmp_path / "gaps", cfg).root)
    report = build_report(data).to_dict()
    assert report["n_series"] == len(data.train_series)
    missing = sum(len(v) for v in report["studies_missing_series"].values())
    assert missing == 6
    assert report["empty_label_cells"] == int(data.train[list(data.train.columns[1:])].isna().sum().sum()) > 0
    assert set(data.train.iloc[:, 1:].stack().dropna().astype(str).unique()) <= set(SEVERITIES)


def _pixel_digest(root: Path) -> str:
    """Digest of what the pipeline reads (pixels, geometry, tables): independent of pydicom's file meta."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        digest.update(str(path.relative_to(root)).encode())
        digest.update(ds.pixel_array.tobytes())
        digest.update(repr([ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing]).encode())
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def test_easy_preset_is_unchanged(tmp_path):
    """The quickstart's data (and so its published figures) stays as it was when the hard preset came."""
    cfg = SynthConfig(train_studies=3, test_studies=0, seed=5, image_sizes=[96], tilted_axial_rate=0.5)
    assert _pixel_digest(synthetic.write_dataset(tmp_path / "easy", cfg).root) == "5346f118449a618b"


def test_hard_preset_is_deterministic_and_writes_its_floor(tmp_path):
    cfg = SynthConfig(preset="hard", train_studies=2, test_studies=1, seed=3, image_sizes=[96])
    first = synthetic.write_dataset(tmp_path / "a", cfg)
    second = synthetic.write_dataset(tmp_path / "b", cfg)
    assert _tree_digest(first.root) == _tree_digest(second.root)
    easy = synthetic.write_dataset(tmp_path / "c", cfg.model_copy(update={"preset": "easy"}))
    assert easy.bayes_floor is None and _tree_digest(easy.root) != _tree_digest(first.root)
    assert first.bayes_floor == grading.bayes_floor(grading.HARD_READERS).to_dict()
    assert 0.33 <= first.bayes_floor["total"] <= 0.36
    assert synthetic.write_dataset(tmp_path / "a", cfg).bayes_floor == first.bayes_floor  # reused, same floor


def test_hard_labels_are_the_readers_view_of_the_written_severities(hard_dir):
    """The latents file and train.csv agree: a perfect model scores the manifest's figure on them."""
    data = load_rsna(hard_dir)
    study_ids, labels = encode_labels(data.train)
    severity = pd.read_csv(hard_dir / synthetic.SEVERITY_NAME).set_index("study_id").loc[study_ids]
    manifest = json.loads((hard_dir / synthetic.MANIFEST_NAME).read_text())
    oracle = grading.oracle_score(labels, severity.to_numpy(), grading.HARD_READERS)
    assert oracle.total == pytest.approx(manifest["oracle_train"]["total"])
    # The CV's floor column reads the same latents with the readers' model the folder records.
    assert grading.recorded_readers(hard_dir) == grading.HARD_READERS
    assert grading.known_floor(hard_dir, study_ids, labels).total == pytest.approx(oracle.total)
    assert grading.known_floor(hard_dir.parent, study_ids, labels) is None  # no latents there: no floor
    # Readers disagree with the latent near the boundaries: some labels sit on the other side of their cut.
    crossed = ((severity.to_numpy() < 0) & (labels == 2)) | ((severity.to_numpy() > 1) & (labels == 0))
    assert crossed.sum() > 0


def test_hard_lesions_grow_with_the_latent_severity(hard_dir):
    """At the labelled points, brightness falls with the latent (not the label) severity in every group."""
    means = _window_means(hard_dir, latent=True)
    for group in ("stenosis", "narrowing", "subarticular"):
        chosen = means[means["group"] == group]
        rho = chosen["severity"].rank().corr(chosen["value"].rank())
        assert rho < -0.2, (group, rho)


def test_hard_anatomy_and_acquisition_vary(hard_dir):
    data = load_rsna(hard_dir)
    thickness, spacing_x, fov = [], [], []
    for row in data.train_series[data.train_series["series_description"] == "Sagittal T2/STIR"].itertuples():
        folder = hard_dir / "train_images" / str(row.study_id) / str(row.series_id)
        series = read_series(folder)
        first = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        positions = series.stacks[0].positions_along_normal
        thickness.append(float(first.SliceThickness))
        spacing_x.append(float(np.median(np.diff(positions))))
        fov.append(float(first.PixelSpacing[0]) * int(first.Rows))
    assert np.ptp(thickness) > 0.8 and np.ptp(fov) > 40
    assert (np.array(spacing_x) > np.array(thickness) + 0.1).any(), "some stacks have gaps between slices"


def test_easy_manifest_is_what_it_was_before_the_presets(tmp_path):
    """Folders written before the presets existed are recognised and reused, not refused or rewritten."""
    cfg = SynthConfig(train_studies=1, test_studies=0, image_sizes=[96])
    root = synthetic.write_dataset(tmp_path / "easy", cfg).root
    manifest = json.loads((root / synthetic.MANIFEST_NAME).read_text())["manifest"]
    assert "preset" not in manifest["config"] and "readers" not in manifest


def _dicom_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


@pytest.mark.parametrize("preset", ["easy", "hard"])
def test_masks_change_no_dicom_byte_and_sit_on_each_sagittal_grid(tmp_path, preset):
    cfg = SynthConfig(preset=preset, train_studies=2, test_studies=0, seed=2, image_sizes=[64], missing_series_rate=0)
    plain = synthetic.write_dataset(tmp_path / "plain", cfg).root
    masked = synthetic.write_dataset(tmp_path / "masked", cfg.model_copy(update={"masks": True})).root
    assert _dicom_digests(plain) == _dicom_digests(masked) and len(_dicom_digests(plain)) > 0
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        assert (plain / name).read_bytes() == (masked / name).read_bytes()
    assert not (plain / MASKS_DIR).exists()
    table = json.loads((masked / MASKS_DIR / LABELS_JSON).read_text())
    assert {int(value) for value in table["values"]} == set(LABEL_TABLE)
    series = load_rsna(masked).train_series
    for row in series.itertuples():
        path = mask_file(masked, "train", row.study_id, row.series_id)
        if not row.series_description.startswith("Sagittal"):
            assert not path.exists()
            continue
        with np.load(path) as npz:
            labels, numbers = npz["labels"], npz["instance_number"]
        files = sorted((masked / "train_images" / str(row.study_id) / str(row.series_id)).glob("*.dcm"))
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert labels.dtype == np.int16 and labels.shape == (len(files), first.Rows, first.Columns)
        assert sorted(numbers.tolist()) == sorted(int(f.stem) for f in files)
        present = set(np.unique(labels).tolist())
        assert present <= set(LABEL_TABLE)
        wanted = (
            {CANAL, *(disc_value(k) for k in range(5))}
            if row.series_description == "Sagittal T2/STIR"
            else {foramen_value(k, side) for k in range(5) for side in ("left", "right")}
        )
        assert wanted <= {value % LESION_OFFSET for value in present}


def test_a_dataset_with_masks_serves_a_config_without_them(tmp_path):
    """Masks only add files: a folder written with them is reused without them; the other way round it is not."""
    cfg = SynthConfig(train_studies=1, test_studies=0, image_sizes=[64])
    manifest = synthetic._manifest(cfg)
    assert "masks" not in manifest["config"], "folders written before the masks stay reusable"
    with_masks = cfg.model_copy(update={"masks": True})
    synthetic.write_dataset(tmp_path / "m", with_masks)
    assert synthetic.write_dataset(tmp_path / "m", cfg).reused
    synthetic.write_dataset(tmp_path / "p", cfg)
    with pytest.raises(FileExistsError):
        synthetic.write_dataset(tmp_path / "p", with_masks)
