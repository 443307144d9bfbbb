"""Preprocessing: the pure core without Ray, then the Ray Data job (resume, faults, a real SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lumbar_ray.config import PreprocessConfig, SynthConfig, cache_settings
from lumbar_ray.data.cache import CachedSeries, SeriesCache, SeriesMeta
from lumbar_ray.data.dicom import read_series
from lumbar_ray.data.preprocess import (
    SKIPPED_FILE_OUTCOME,
    STATUS_COLUMNS,
    PreprocessSummary,
    _failures_table,
    process_row,
    run_preprocess,
)
from lumbar_ray.data.rsna import load_rsna
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.data.volume import preprocess_series, resize_slice, to_uint8

CFG = PreprocessConfig(image_size=96, workers=2)


def _series_folder(root: Path, description: str, index: int = 0) -> tuple[int, int, Path]:
    series = load_rsna(root).train_series
    row = series[series["series_description"] == description].iloc[index]
    return (
        int(row.study_id),
        int(row.series_id),
        root / "train_images" / str(row.study_id) / str(row.series_id),
    )


# --- pure core


def test_entry_matches_the_reader(synthetic_dir):
    _, _, folder = _series_folder(synthetic_dir, "Sagittal T2/STIR")
    series = read_series(folder)
    volume, meta = preprocess_series(series, CFG)
    assert volume.dtype == np.uint8 and volume.shape == (series.n_slices, 96, 96)
    low, high = meta.intensity_window
    stack = series.stacks[0]
    for i in (0, stack.n_slices // 2, stack.n_slices - 1):
        np.testing.assert_array_equal(volume[i], to_uint8(resize_slice(stack.volume[i], 96), low, high))
    assert list(meta.slices.instance_number) == stack.instance_numbers
    np.testing.assert_allclose(meta.slices.position, [g.position for g in stack.geometry])
    np.testing.assert_allclose(meta.slices.pixel_spacing, [g.pixel_spacing for g in stack.geometry])
    assert list(meta.slices.original_shape) == [g.shape for g in stack.geometry]
    assert "PatientName" not in str(meta) and "Synthetic^Phantom" not in str(meta)
    assert meta.study_id is None and "study_id" not in meta.to_json()  # the job adds the ids


def test_metadata_json_keeps_the_format_and_round_trips_byte_for_byte(tmp_path):
    """The typed metadata writes the format's keys in their order; reading an entry back and writing it again
    gives the same bytes (existing caches stay valid), missing geometry (null, NaN) included."""
    _write_dot_series(tmp_path / "s", [(128, 128), (160, 120), (128, 128)], [(30, 90), (100, 40), (64, 20)])
    (tmp_path / "s" / "4.dcm").write_bytes((tmp_path / "s" / "3.dcm").read_bytes())
    ds = pydicom.dcmread(tmp_path / "s" / "4.dcm")
    del ds.ImagePositionPatient  # a slice without geometry: its own stack, null position, NaN along the normal
    ds.InstanceNumber = 4
    ds.save_as(tmp_path / "s" / "4.dcm")
    _, meta = preprocess_series(read_series(tmp_path / "s"), CFG)
    meta = replace(meta, study_id=1, series_id=2, split="train", series_description="Sagittal T1")
    data = meta.to_json()
    top = ["size", "intensity_window", "stacks", "slices", "dicom", "warnings"]
    assert list(data) == [*top, "study_id", "series_id", "split", "series_description"]
    assert list(data["stacks"][0]) == ["start", "stop", "orientation", "normal"]
    geometry = ["instance_number", "stack", "position", "orientation", "pixel_spacing", "original_shape"]
    assert list(data["slices"]) == [*geometry, "scale", "resized", "position_along_normal", "file_name"]
    assert data["slices"]["position"][-1] is None and np.isnan(data["slices"]["position_along_normal"][-1])
    assert data["slices"]["original_shape"][1] == [160, 120] and data["stacks"][-1]["normal"] is None
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    cache.prepare()
    cache.write(1, 2, np.zeros((4, 96, 96), np.uint8), meta)
    written = Path(cache._entry(1, 2, "json")).read_bytes()
    assert written == json.dumps(data).encode()
    again = cache.read_meta(1, 2)
    assert json.dumps(again.to_json()).encode() == written
    assert again.slices.original_shape == meta.slices.original_shape and again.stacks == meta.stacks


def _write_dot_series(folder: Path, shapes: list[tuple[int, int]], dots: list[tuple[int, int]]) -> None:
    """A sagittal series whose slices differ in shape, each with one bright pixel at (x, y)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    for i, ((rows, cols), (x, y)) in enumerate(zip(shapes, dots, strict=True)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [200 / rows, 200 / cols]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [10.0 - 4 * i, -100.0, 100.0]
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        pixels = np.full((rows, cols), 100, dtype=np.uint16)
        pixels[y - 1 : y + 2, x - 1 : x + 2] = 4000
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(folder / f"{i + 1}.dcm", ds, enforce_file_format=True)


def test_points_map_both_ways_even_on_mixed_shapes(tmp_path):
    shapes = [(128, 128), (160, 120), (128, 128)]
    dots = [(30, 90), (100, 40), (64, 20)]
    _write_dot_series(tmp_path / "s", shapes, dots)
    # the full intensity range keeps the tiny dots visible (the default window would clip them away)
    volume, meta = preprocess_series(read_series(tmp_path / "s"), CFG.model_copy(update={"clip_percentiles": (0, 100)}))

    cached = CachedSeries(volume, meta)
    for instance, (x, y) in enumerate(dots, start=1):
        index, xc, yc = cached.original_to_cache(instance, x, y)
        peak_y, peak_x = np.unravel_index(np.argmax(volume[index]), volume[index].shape)
        assert abs(peak_x - xc) <= 1.0 and abs(peak_y - yc) <= 1.0, (instance, (xc, yc), (peak_x, peak_y))
        back = cached.cache_to_original(index, xc, yc)
        assert back[0] == instance and back[1:] == pytest.approx((x, y))
    assert any(w.startswith("mixed_shapes") for w in meta.warnings)


def _row(folder: Path) -> dict:
    """A work item of the preprocessing job for one series folder (study 1, series 2)."""
    return {"study_id": 1, "series_id": 2, "split": "train", "series_description": "Sagittal T1", "folder": str(folder)}


def test_a_series_with_unreadable_files_is_cached_without_them_and_tabled(tmp_path):
    folder = tmp_path / "s"
    _write_dot_series(folder, [(128, 128)] * 4, [(30, 90), (100, 40), (64, 20), (50, 50)])
    truncated = folder / "2.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-500])
    (folder / "4.dcm").write_text("this is not a DICOM file")
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    cache.prepare()

    status = process_row(_row(folder), cache, CFG)
    assert status["status"] == "done" and status["n_slices"] == 2
    entry = cache.read(1, 2)
    assert entry.volume.shape == (2, 96, 96) and entry.meta.slices.file_name == ("1.dcm", "3.dcm")
    expected = "skipped_files: 2 unreadable file(s) left out: 2.dcm (undecodable), 4.dcm (not_dicom)"
    assert entry.meta.warnings == (expected,)

    table = _failures_table(pd.DataFrame([status], columns=list(STATUS_COLUMNS)))
    skipped = table[table["outcome"] == SKIPPED_FILE_OUTCOME]
    assert skipped[["study_id", "series_id", "split", "file", "kind"]].values.tolist() == [
        [1, 2, "train", "2.dcm", "undecodable"],
        [1, 2, "train", "4.dcm", "not_dicom"],
    ]
    assert "less than expected" in skipped["error"].iloc[0] and "not a readable DICOM" in skipped["error"].iloc[1]
    assert table.loc[table["outcome"] == "cached", "kind"].tolist() == ["skipped_files"]

    summary = PreprocessSummary(
        str(tmp_path), "pp-x", 1, 1, 0, 0, 0, 2, 1.0, table, warnings=1, files_skipped=len(skipped)
    )
    assert summary.skipped_file_counts() == {"not_dicom": 1, "undecodable": 1} and summary.failure_counts() == {}
    text = summary.format()
    assert "unreadable files left out of cached series: 2 (not_dicom 1, undecodable 1)" in text
    assert "failures table:" in text


def test_a_series_without_a_readable_file_fails_naming_its_first_file(tmp_path):
    folder = tmp_path / "s"
    _write_dot_series(folder, [(128, 128)] * 2, [(30, 90), (100, 40)])
    for path in folder.glob("*.dcm"):
        path.write_bytes(path.read_bytes()[:-500])
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    cache.prepare()
    status = process_row(_row(folder), cache, CFG)
    assert status["status"] == "failed" and status["kind"] == "undecodable" and status["skipped"] is None
    assert "no readable DICOM file among 2; the first, 1.dcm" in status["error"]
    assert not cache.has(1, 2)
    table = _failures_table(pd.DataFrame([status], columns=list(STATUS_COLUMNS)))
    assert table[["study_id", "series_id", "kind", "outcome"]].values.tolist() == [[1, 2, "undecodable", "failed"]]


# --- the Ray Data job


def _entries(cache: SeriesCache) -> dict[tuple[int, int], tuple[np.ndarray, SeriesMeta]]:
    manifest = cache.read_manifest()
    out = {}
    for row in manifest.itertuples():
        entry = cache.read(row.study_id, row.series_id)
        out[(row.study_id, row.series_id)] = (entry.volume, entry.meta)
    return out


def _assert_same_cache(a: SeriesCache, b: SeriesCache) -> None:
    left, right = _entries(a), _entries(b)
    assert left.keys() == right.keys() and len(left) > 0
    for key in left:
        np.testing.assert_array_equal(left[key][0], right[key][0])
        assert left[key][1] == right[key][1]
    pd.testing.assert_frame_equal(a.read_manifest(), b.read_manifest())


@pytest.mark.ray
def test_cache_is_complete_then_rerun_skips_everything(ray_local, tmp_path):
    # A dataset of its own, small: three full passes over the session's 42 studies would take a minute and more.
    small = SynthConfig(train_studies=4, test_studies=1, image_sizes=[96], extra_axial_rate=0.5, seed=11)
    synthetic_dir = write_dataset(tmp_path / "rsna", small).root
    first = run_preprocess(synthetic_dir, tmp_path / "cache", CFG)
    n_series = len(load_rsna(synthetic_dir).train_series) + len(load_rsna(synthetic_dir).test_series)
    assert first.total == n_series and first.done == n_series and first.failed == 0
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    assert len(cache.read_manifest()) == n_series
    study_id, series_id, folder = _series_folder(synthetic_dir, "Axial T2")
    reference, _meta = preprocess_series(read_series(folder), CFG)
    np.testing.assert_array_equal(cache.read(study_id, series_id, mmap=True).volume, reference)
    stamps = {p: p.stat().st_mtime_ns for p in Path(cache.path).rglob("*") if p.is_file()}
    second = run_preprocess(synthetic_dir, tmp_path / "cache", CFG)
    assert (second.done, second.skipped, second.failed) == (0, n_series, 0)
    assert {p: p.stat().st_mtime_ns for p in Path(cache.path).rglob("*") if p.is_file()} == stamps
    # a setting that changes cached bytes writes a new version beside the old one
    other = run_preprocess(synthetic_dir, tmp_path / "cache", CFG.model_copy(update={"image_size": 64}))
    assert other.key != first.key and other.done == n_series
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.key, other.key])


def _break_dataset(root: Path) -> tuple[dict[str, tuple[int, int]], tuple[int, int], list[str]]:
    """Seed one failing series per kind of bad input, and one series with two bad files among good ones.

    Returns:
        kind -> (study, series) of the failing series; (study, series) of the damaged one; its bad files.
    """
    series = load_rsna(root).train_series
    rows = [(int(r.study_id), int(r.series_id)) for r in series.itertuples()]
    broken = dict(zip(["undecodable", "empty_folder", "missing_folder"], rows[:3], strict=True))
    folder = {kind: root / "train_images" / str(s) / str(r) for kind, (s, r) in (*broken.items(), ("damaged", rows[3]))}
    for victim in folder["undecodable"].glob("*.dcm"):
        victim.write_bytes(victim.read_bytes()[:-500])  # truncated pixel data: no file of the series is readable
    for path in folder["empty_folder"].glob("*.dcm"):
        path.unlink()
    shutil.rmtree(folder["missing_folder"])
    truncated, not_dicom = sorted(folder["damaged"].glob("*.dcm"))[:2]
    truncated.write_bytes(truncated.read_bytes()[:-500])
    not_dicom.write_text("this is not a DICOM file")
    return broken, rows[3], [truncated.name, not_dicom.name]


@pytest.mark.ray
def test_bad_input_is_tabled_and_everything_else_cached(ray_local, tmp_path):
    cfg = SynthConfig(train_studies=6, test_studies=0, image_sizes=[96], tilted_axial_rate=0.5, seed=11)
    root = write_dataset(tmp_path / "rsna", cfg).root
    broken, damaged, bad_files = _break_dataset(root)
    summary = run_preprocess(root, tmp_path / "cache", CFG)
    n_series = len(load_rsna(root).train_series)
    assert summary.failed == 3 and summary.done == n_series - 3
    assert summary.failure_counts() == {kind: 1 for kind in broken}
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    table = cache.read_failures()
    failed = table[table["outcome"] == "failed"].set_index("kind")
    for kind, (study, series) in broken.items():
        assert (failed.at[kind, "study_id"], failed.at[kind, "series_id"]) == (study, series)
    assert "no readable DICOM file" in failed.at["undecodable", "error"]
    # the damaged series is cached without its two bad files, each named in a row of its own
    skipped = table[table["outcome"] == "cached_without_file"]
    assert skipped[["study_id", "series_id"]].drop_duplicates().values.tolist() == [list(damaged)]
    assert sorted(skipped["file"]) == sorted(bad_files) and set(skipped["kind"]) == {"undecodable", "not_dicom"}
    assert summary.files_skipped == 2 and summary.skipped_file_counts() == {"not_dicom": 1, "undecodable": 1}
    entry = cache.read_meta(*damaged)
    assert not set(bad_files) & set(entry.slices.file_name)
    assert any(w.startswith("skipped_files: 2 ") for w in entry.warnings)
    assert "multiple_orientations" in set(table.loc[table["outcome"] == "cached", "kind"])
    assert "failures by kind" in summary.format() and "left out of cached series: 2" in summary.format()


@pytest.mark.ray
@pytest.mark.slow
def test_strict_exits_non_zero_on_failures(ray_env, tmp_path):
    root = write_dataset(tmp_path / "rsna", SynthConfig(train_studies=2, test_studies=0, image_sizes=[96])).root
    _break_dataset(root)
    command = [
        sys.executable,
        "-m",
        "lumbar_ray",
        "preprocess",
        "--data",
        str(root),
        "--cache",
        str(tmp_path / "cache"),
        "--workers",
        "1",
        "preprocess.image_size=64",
    ]
    lenient = subprocess.run(command, capture_output=True, text=True, env=ray_env, timeout=300)
    assert lenient.returncode == 0, lenient.stderr
    strict = subprocess.run([*command, "--strict"], capture_output=True, text=True, env=ray_env, timeout=300)
    assert strict.returncode == 1 and "series failed (--strict)" in strict.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_sigkilled_run_then_rerun_equals_a_clean_run(ray_local, synthetic_dir, tmp_path):
    killed_cache = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "lumbar_ray",
        "preprocess",
        "--data",
        str(synthetic_dir),
        "--cache",
        str(killed_cache),
        "--workers",
        "1",
        "preprocess.image_size=96",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"},
    )
    cache = SeriesCache(killed_cache, cache_settings(CFG))
    deadline = time.time() + 240
    while time.time() < deadline and len(list(Path(cache.path).glob("series/*/*.json"))) < 5:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    process.wait()
    written = len(list(Path(cache.path).glob("series/*/*.json")))
    assert 5 <= written < 60, "the kill must land mid-run"
    assert not (Path(cache.path) / "manifest.parquet").exists()
    resumed = run_preprocess(synthetic_dir, killed_cache, CFG)
    assert resumed.recovered >= written and resumed.done + resumed.recovered == resumed.total
    clean = run_preprocess(synthetic_dir, tmp_path / "clean", CFG)
    assert clean.done == clean.total
    _assert_same_cache(cache, SeriesCache(tmp_path / "clean", cache_settings(CFG)))


class _DiesOnceWorker:
    """A preprocessing actor whose process dies (os._exit) on its first batch, once per cache root."""

    def __init__(self, cache: SeriesCache, cfg: PreprocessConfig) -> None:
        from lumbar_ray.data.preprocess import SeriesWorker

        self.inner = SeriesWorker(cache, cfg)
        self.marker = Path(cache.root) / "died_once"

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)  # a real process death, not an exception
        return self.inner(batch)


@pytest.mark.ray
def test_a_dying_worker_is_restarted_and_its_series_retried(ray_local, tmp_path):
    import ray

    from lumbar_ray.data.preprocess import run_on_ray, series_items

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not on workers' path
    root = write_dataset(tmp_path / "rsna", SynthConfig(train_studies=2, test_studies=0, image_sizes=[96])).root
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    cache.prepare()
    items = series_items(root)
    statuses = run_on_ray(items, cache, CFG, worker=_DiesOnceWorker)
    assert (tmp_path / "cache" / "died_once").exists()
    assert sorted(s["series_id"] for s in statuses) == sorted(i["series_id"] for i in items)
    assert {s["status"] for s in statuses} == {"done"}
