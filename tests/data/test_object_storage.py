"""The data root in object storage: a local S3-compatible server (moto, :func:`tests.conftest.s3_server`) holds a copy
of a small synthetic dataset, and whatever is read through its ``s3://`` URI (the CSVs, a series, the cache made from
it) must equal what the local folder gives, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lumbar_ray.config import PreprocessConfig, SynthConfig, cache_settings
from lumbar_ray.data.cache import SeriesCache, copy_to_node, join_location
from lumbar_ray.data.dicom import read_series
from lumbar_ray.data.preprocess import process_row, run_preprocess, series_items
from lumbar_ray.data.rsna import TRAIN_SERIES_CSV, load_rsna, load_series
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.errors import DicomReadError, RsnaFormatError
from lumbar_ray.predict import studies_to_predict

SMALL = SynthConfig(train_studies=1, test_studies=1, image_sizes=[96], seed=5)
CFG = PreprocessConfig(image_size=64, workers=1)
TABLES = ("train", "train_series", "coordinates", "test_series", "sample_submission")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_server) -> tuple[Path, str]:
    """A one-study dataset with a series holding an unreadable file and a stray non-DICOM file, as a local folder
    and as its copy on the S3 server (the URI)."""
    root = write_dataset(tmp_path_factory.mktemp("object_storage") / "rsna", SMALL).root
    folder = Path(series_items(root, ["train"])[0]["folder"])
    (folder / "notes.dcm").write_text("not a DICOM file")  # left out of the series and tabled
    (folder / "README.txt").write_text("not a series file")  # not even listed
    return root, s3_server.upload(root, "rsna-data/rsna")


def _cache_files(cache: SeriesCache) -> dict[str, bytes]:
    """Every file of a (local) cache version, by its path inside the version folder."""
    base = Path(cache.path)
    return {str(path.relative_to(base)): path.read_bytes() for path in sorted(base.rglob("*")) if path.is_file()}


def test_load_rsna_reads_the_csvs_from_a_uri(dataset):
    local, uri = dataset
    expected, data = load_rsna(local), load_rsna(uri)
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(data, name), getattr(expected, name), obj=name)
    assert data.root == uri
    assert data.train_images_dir == join_location(uri, "train_images") and data.test_images_dir.endswith("scheme=http")
    folders = [item["folder"] for item in series_items(uri)]
    assert folders[0] == join_location(uri, "train_images", *Path(series_items(local)[0]["folder"]).parts[-2:])


def test_a_missing_bucket_prefix_or_csv_is_one_line_naming_the_uri(dataset, s3_server, tmp_path, capsys):
    _local, uri = dataset
    for missing in (s3_server.uri("no-such-bucket/rsna"), s3_server.uri("rsna-data/no-such-prefix")):
        with pytest.raises(FileNotFoundError) as error:
            load_rsna(missing)
        assert str(error.value) == f"RSNA data folder not found: {missing}"
    images = join_location(uri, "train_images")  # a folder without any CSV
    with pytest.raises(FileNotFoundError, match=r"^none of \(.*\) found in s3://") as error:
        load_rsna(images)
    assert str(error.value).endswith(images)
    absent = join_location(uri, TRAIN_SERIES_CSV.replace("train", "other"))
    with pytest.raises(FileNotFoundError) as error:
        load_series(absent)
    assert str(error.value) == f"file not found: {absent}"

    from lumbar_ray.cli import main  # the command a user runs: one error line, exit code 2, before any Ray

    missing = s3_server.uri("no-such-bucket/rsna")
    with pytest.raises(SystemExit) as exited:
        main(["preprocess", "--data", missing, f"workdir={tmp_path}"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: RSNA data folder not found: {missing}"


def test_a_malformed_csv_in_object_storage_names_its_uri(s3_server, tmp_path):
    pd.DataFrame({"study_id": [1], "series_id": [2], "series_description": ["Coronal T9"]}).to_csv(
        tmp_path / TRAIN_SERIES_CSV, index=False
    )
    uri = s3_server.upload(tmp_path, "rsna-data/broken")
    with pytest.raises(RsnaFormatError) as error:
        load_rsna(uri)
    assert error.value.file == join_location(uri, TRAIN_SERIES_CSV) and error.value.line == 2
    assert str(error.value).startswith(f"{error.value.file}, line 2: unknown series description")


def test_a_series_is_read_from_its_uri_as_from_its_folder(dataset, s3_server, tmp_path):
    local, uri = dataset
    for local_item, item in list(zip(series_items(local), series_items(uri), strict=True))[:2]:
        expected, series = read_series(local_item["folder"]), read_series(item["folder"])
        assert series.series_dir == item["folder"] and series.n_files == expected.n_files
        assert series.meta == expected.meta and series.skipped == expected.skipped
        assert len(series.stacks) == len(expected.stacks)
        for stack, reference in zip(series.stacks, expected.stacks, strict=True):
            assert (stack.volume == reference.volume).all() and stack.geometry == reference.geometry
    assert [skipped.file_name for skipped in read_series(series_items(uri)[0]["folder"]).skipped] == ["notes.dcm"]

    nowhere = join_location(uri, "train_images", "1", "2")
    with pytest.raises(DicomReadError) as error:
        read_series(nowhere)
    assert (error.value.path, error.value.kind) == (nowhere, "missing_folder")
    (tmp_path / "README.txt").write_text("no series file here")
    empty = s3_server.upload(tmp_path, "rsna-data/empty/1/2")
    with pytest.raises(DicomReadError) as error:
        read_series(empty)
    assert (error.value.path, error.value.kind) == (empty, "empty_folder")
    (tmp_path / "1.dcm").write_text("not DICOM either")
    unreadable = s3_server.upload(tmp_path, "rsna-data/unreadable/1/2")
    row = {"study_id": 1, "series_id": 2, "split": "train", "series_description": "Sagittal T1", "folder": unreadable}
    cache = SeriesCache(tmp_path / "cache", cache_settings(CFG))
    status = process_row(row, cache, CFG)  # the failures table names no temporary copy
    assert (status["status"], status["kind"], status["file"]) == ("failed", "not_dicom", "")
    assert status["error"].startswith("no readable DICOM file among 1; the first, 1.dcm:")


def test_the_series_of_a_test_study_are_cached_from_the_uri_as_from_the_folder(dataset, tmp_path):
    """What ``lumbar-ray predict --data s3://...`` does before it predicts, without Ray: list the test studies from
    the URI's CSVs, then cache their series with the preprocessing actors' own function."""
    local, uri = dataset
    expected_ids, expected_series = studies_to_predict(load_rsna(local), "test", None)
    study_ids, series = studies_to_predict(load_rsna(uri), "test", None)
    assert study_ids == expected_ids and len(study_ids) == 1
    pd.testing.assert_frame_equal(series, expected_series)
    caches, statuses = [], []
    for root, name in ((local, "local"), (uri, "s3")):
        cache = SeriesCache(tmp_path / name, cache_settings(CFG))
        cache.prepare()
        statuses.append([process_row(item, cache, CFG) for item in series_items(root, ["test"], study_ids)])
        caches.append(cache)
    assert statuses[0] == statuses[1] and {status["status"] for status in statuses[1]} == {"done"}
    assert len(statuses[1]) == len(series) and _cache_files(caches[1]) == _cache_files(caches[0])


def test_a_cache_in_object_storage_is_copied_to_the_node_file_for_file(dataset, s3_server, tmp_path):
    """A cache version on the S3 server (``preprocess.cache=s3://...``): the entries a fold asks for are copied to
    the node-local folder once, byte for byte as the cache they were uploaded from."""
    local, _uri = dataset
    cache = SeriesCache(tmp_path / "made", cache_settings(CFG))
    cache.prepare()
    for item in series_items(local, ["train"]):
        assert process_row(item, cache, CFG)["status"] == "done"
    remote = SeriesCache(s3_server.upload(tmp_path / "made", "rsna-cache/cache"), cache_settings(CFG))
    entries = sorted((int(item["study_id"]), int(item["series_id"])) for item in series_items(local, ["train"]))
    copy = copy_to_node(remote, entries, tmp_path / "node")
    assert copy.key == cache.key and copy.root.startswith(str(tmp_path / "node"))
    files = {name: data for name, data in _cache_files(cache).items() if name.startswith("series/")}
    assert {name: data for name, data in _cache_files(copy).items() if name.startswith("series/")} == files
    assert len(files) == 2 * len(entries) > 0
    assert copy_to_node(remote, entries, tmp_path / "node").path == copy.path  # found there: nothing fetched


@pytest.mark.ray
@pytest.mark.slow
def test_preprocess_of_an_s3_uri_makes_the_cache_of_the_local_folder(dataset, ray_env, tmp_path):
    """``lumbar-ray preprocess --data s3://...`` through Ray Data: the actors download the series themselves; the
    cache (same version key: the data root is not part of it) equals the local folder's, file for file."""
    local, uri = dataset
    expected = run_preprocess(local, tmp_path / "local", CFG)
    command = [sys.executable, "-m", "lumbar_ray", "preprocess", "--data", uri, "--cache", str(tmp_path / "s3"),
               "--workers", "1", f"workdir={tmp_path / 'work'}", f"preprocess.image_size={CFG.image_size}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ray_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected.done == expected.total > 0 and expected.files_skipped == 1
    assert f"{expected.total} listed; {expected.total} done" in result.stdout
    s3_cache = SeriesCache(tmp_path / "s3", cache_settings(CFG))
    assert s3_cache.key == expected.key
    assert _cache_files(s3_cache) == _cache_files(SeriesCache(tmp_path / "local", cache_settings(CFG)))
