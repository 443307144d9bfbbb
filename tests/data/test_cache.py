"""Cache metadata helpers (a slice's stack, the stack's slice spacing, the block of slices it belongs to) and the
node-local copy of a remote cache."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import lumbar_ray.data.cache as cache_module
from lumbar_ray.data.cache import SeriesCache, copy_to_node, is_uri, node_cache_folder
from tests.data.conftest import stacked_meta


def test_blocks_split_a_stack_at_its_gaps_and_never_cross_stacks():
    # Stack 0: two untilted per-level blocks 32 mm apart at 4 mm spacing; stack 1: a tilted block.
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0]), (10.0, [0.0, 4.0, 8.0])])
    assert [meta.stack_bounds(index) for index in (0, 5, 6, 8)] == [(0, 6), (0, 6), (6, 9), (6, 9)]
    assert [meta.block_bounds(index) for index in range(9)] == [(0, 3)] * 3 + [(3, 6)] * 3 + [(6, 9)] * 3
    one_missing_slice = stacked_meta([(0.0, [0.0, 4.0, 12.0, 16.0])])  # an 8 mm gap: still one block
    assert {one_missing_slice.block_bounds(index) for index in range(4)} == {(0, 4)}


def test_stack_spacing_is_the_median_gap_else_the_dicom_tags():
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0]), (10.0, [0.0])])
    assert meta.stack_spacing(2) == pytest.approx(4.0)  # the 32 mm gap between blocks is not a spacing
    assert meta.stack_spacing(6) is None  # one slice, no tag
    tagged = replace(meta, dicom={"SliceThickness": 3.5, "SpacingBetweenSlices": 4.4})
    assert tagged.stack_spacing(6) == pytest.approx(4.4)
    assert replace(meta, dicom={"SliceThickness": "3.5"}).stack_spacing(6) == pytest.approx(3.5)
    assert replace(meta, dicom={"SliceThickness": 0}).stack_spacing(6) is None
    assert replace(meta, stacks=()).stack_bounds(3) == (0, 7)  # no stack recorded: the whole volume


def test_without_positions_along_the_normal_the_block_is_the_whole_stack():
    meta = stacked_meta([(0.0, [0.0, 4.0, 8.0, 40.0, 44.0, 48.0])])
    unpositioned = replace(meta, slices=replace(meta.slices, position_along_normal=(float("nan"),) * 6))
    assert unpositioned.block_bounds(0) == (0, 6) and unpositioned.stack_spacing(0) is None


def _write_entries(root, entries) -> SeriesCache:
    """A local cache version holding a small volume (filled with its series id) per ``(study_id, series_id)``."""
    cache = SeriesCache(root, {"image_size": 32})
    cache.prepare()
    for study_id, series_id in entries:
        meta = replace(stacked_meta([(0.0, [0.0, 4.0])], series_id=series_id), study_id=study_id)
        cache.write(study_id, series_id, np.full((2, 32, 32), series_id, dtype=np.uint8), meta)
    return cache


def _series_files(cache: SeriesCache) -> dict[str, bytes]:
    """The entries' files of a local cache version, by their path inside it."""
    base = Path(cache.path) / "series"
    return {str(path.relative_to(base)): path.read_bytes() for path in sorted(base.rglob("*")) if path.is_file()}


def test_a_remote_cache_is_copied_to_the_node_once_and_read_from_there(tmp_path, monkeypatch):
    """A cache root given as a URI (here ``file://``, read through pyarrow as ``s3://`` is): the entries asked for
    are copied into the node-local folder, file for file, and a second call fetches nothing again."""
    source = _write_entries(tmp_path / "remote", [(1, 10), (1, 11), (2, 20)])
    remote = SeriesCache(f"file://{tmp_path / 'remote'}", source.settings)
    fetched = []
    monkeypatch.setattr(cache_module, "_copy_entry", _counting(cache_module._copy_entry, fetched))

    local = copy_to_node(remote, [(1, 10), (2, 20), (2, 20), (3, 30)], tmp_path / "node")  # (3, 30) is absent
    assert Path(local.root).parent == tmp_path / "node" and local.key == remote.key and not is_uri(local.root)
    assert _series_files(local) == {name: data for name, data in _series_files(source).items()
                                    if not name.startswith("1/11.")}  # fmt: skip
    assert local.read(1, 10, mmap=True).meta == source.read_meta(1, 10)
    assert isinstance(local.read(2, 20, mmap=True).volume, np.memmap)  # read as a local cache: memory-mapped
    assert sorted(fetched) == [(1, 10), (2, 20), (3, 30)]

    fetched.clear()
    again = copy_to_node(remote, [(1, 10), (1, 11), (2, 20)], tmp_path / "node")
    assert again.path == local.path and fetched == [(1, 11)]  # only what was not there yet
    assert not list(Path(local.path).rglob("*.tmp-*"))  # every file renamed into place


def test_the_workers_of_a_node_copy_a_remote_cache_once_between_them(tmp_path, monkeypatch):
    """Four workers of one node start at once: the lock lets one copy each entry while the others wait, then they
    all read the same complete copy."""
    entries = [(study, 100 + study) for study in range(12)]
    _write_entries(tmp_path / "remote", entries)
    remote = SeriesCache(f"file://{tmp_path / 'remote'}", {"image_size": 32})
    fetched = []
    monkeypatch.setattr(cache_module, "_copy_entry", _counting(cache_module._copy_entry, fetched, delay=0.01))
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: copy_to_node(remote, entries, tmp_path / "node", threads=2), range(4)))
    assert sorted(fetched) == entries  # each entry fetched exactly once on the node
    assert {copy.path for copy in copies} == {copies[0].path}
    assert all(copies[0].has(*entry) for entry in entries)


def test_the_node_folder_is_keyed_by_the_root_without_its_credentials(tmp_path):
    server = "bucket/cache?endpoint_override=127.0.0.1:9000&scheme=http"
    with_key, rotated = node_cache_folder(f"s3://KEY:SECRET@{server}"), node_cache_folder(f"s3://OTHER:KEY@{server}")
    assert with_key == rotated == node_cache_folder(f"s3://{server}")
    assert with_key.parent == Path(tempfile.gettempdir()) / "lumbar_ray_cache"
    assert node_cache_folder("s3://bucket/other") != with_key
    assert node_cache_folder("s3://bucket/cache", tmp_path).parent == tmp_path


def _counting(copy_entry, fetched: list, delay: float = 0.0):
    """``copy_entry`` that records the entries it is asked for (slowed by ``delay`` s, so that callers overlap)."""

    def counted(source, target, study_id, series_id):
        fetched.append((study_id, series_id))
        time.sleep(delay)
        return copy_entry(source, target, study_id, series_id)

    return counted


def test_a_copy_that_keeps_failing_is_an_error_and_a_passing_failure_is_retried(tmp_path, monkeypatch):
    """A read error is never taken for a missing entry (the node's ranks would train on other data than the
    others'): retried, and raised naming the entry when it persists."""
    _write_entries(tmp_path / "remote", [(1, 10)])
    remote = SeriesCache(f"file://{tmp_path / 'remote'}", {"image_size": 32})
    monkeypatch.setattr(cache_module.time, "sleep", lambda seconds: None)
    remote.fs = _FlakyStorage(remote.fs, failures=1)
    assert copy_to_node(remote, [(1, 10)], tmp_path / "node").has(1, 10)  # one failure: retried
    remote.fs = _FlakyStorage(remote.fs, failures=100)
    with pytest.raises(OSError, match="1/10 could not be copied"):
        copy_to_node(remote, [(1, 10)], tmp_path / "other")
    assert not SeriesCache(node_cache_folder(remote.root, tmp_path / "other"), remote.settings).has(1, 10)


class _FlakyStorage:
    """A filesystem whose first ``failures`` reads fail as a throttling object store's do."""

    def __init__(self, fs, failures: int) -> None:
        self.fs, self.failures = fs, failures

    def open_input_stream(self, path):
        if self.failures > 0:
            self.failures -= 1
            raise OSError("503 Slow Down")
        return self.fs.open_input_stream(path)

    def __getattr__(self, name):
        return getattr(self.fs, name)
