"""Uploads: what a zip or a set of files may hold, and what is refused with the entry named."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from lumbar_ray.errors import StudyInputError
from lumbar_ray.inference.uploads import UploadLimits, extract_zip, upload_folder, write_files


def _zip(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_a_zip_is_extracted_with_its_folders_kept(tmp_path):
    files = extract_zip(_zip({"123/4/1.dcm": b"a", "123/4/2.dcm": b"bb"}), tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["123/4/1.dcm", "123/4/2.dcm"]
    assert (tmp_path / "123/4/2.dcm").read_bytes() == b"bb"


@pytest.mark.parametrize(
    ("entries", "links", "status", "named", "words"),
    [
        ({"../evil.dcm": b"x"}, (), 400, "../evil.dcm", "leaves"),
        ({"a/../../evil.dcm": b"x"}, (), 400, "a/../../evil.dcm", "leaves"),
        ({"/etc/evil.dcm": b"x"}, (), 400, "/etc/evil.dcm", "absolute"),
        ({"inner/study.zip": b"PK"}, (), 400, "inner/study.zip", "nested"),
        ({"1.dcm": b"x"}, ("link.dcm",), 400, "link.dcm", "symbolic"),
    ],
)
def test_a_hostile_entry_is_refused_naming_it(tmp_path, entries, links, status, named, words):
    with pytest.raises(StudyInputError) as caught:
        extract_zip(_zip(entries, links), tmp_path)
    assert caught.value.status == status and caught.value.file == named and words in caught.value.reason
    assert not any(tmp_path.parent.glob("evil.dcm")) and not Path("/etc/evil.dcm").exists()


def test_an_empty_upload_and_bytes_that_are_no_zip_are_400(tmp_path):
    for data, words in ((b"", "empty"), (b"not a zip at all", "not a zip"), (_zip({}), "no file")):
        with pytest.raises(StudyInputError, match=words) as caught:
            extract_zip(data, tmp_path)
        assert caught.value.status == 400


def test_a_zip_bomb_is_refused_from_its_directory_before_anything_is_written(tmp_path):
    bomb = _zip({"big.dcm": b"\0" * (4 << 20)})  # 4 MiB of zeros compress to a few KiB
    assert len(bomb) < 64 << 10
    with pytest.raises(StudyInputError, match="more than") as caught:
        extract_zip(bomb, tmp_path, UploadLimits(max_bytes=1 << 20))
    assert caught.value.status == 413 and not any(tmp_path.iterdir())


def test_entries_that_cannot_be_written_are_400_naming_them(tmp_path):
    for entries, named in (({"a": b"x", "a/b.dcm": b"y"}, "a/b.dcm"), ({"n" * 300 + ".dcm": b"x"}, "n" * 300 + ".dcm")):
        with upload_folder() as folder, pytest.raises(StudyInputError) as caught:
            extract_zip(_zip(entries), folder)
        assert (caught.value.status, caught.value.file) == (400, named)
    windows = _zip({"s\\": b"", "s\\1.dcm": b"x"})  # a folder entry as a Windows tool writes it
    assert [f.relative_to(tmp_path).as_posix() for f in extract_zip(windows, tmp_path)] == ["s/1.dcm"]


def test_too_many_files_is_413(tmp_path):
    with pytest.raises(StudyInputError, match="3 files") as caught:
        extract_zip(_zip({f"{i}.dcm": b"x" for i in range(3)}), tmp_path, UploadLimits(max_files=2))
    assert caught.value.status == 413


def test_files_given_one_by_one_follow_the_same_rules(tmp_path):
    written = write_files([("4/1.dcm", b"a"), ("4/2.dcm", b"b")], tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in written] == ["4/1.dcm", "4/2.dcm"]
    same_names = write_files([("1.dcm", b"a"), ("1.dcm", b"b")], tmp_path / "base_names")
    assert [f.read_bytes() for f in same_names] == [b"a", b"b"] and same_names[0] != same_names[1]
    cases = (([("../x.dcm", b"a")], 400, "../x.dcm"), ([("e.dcm", b"")], 400, "e.dcm"),
             ([("a.zip", b"PK")], 400, "a.zip"), ([("", b"a")], 400, ""), ([], 400, ""))  # fmt: skip
    for files, status, named in cases:
        with upload_folder() as folder, pytest.raises(StudyInputError) as caught:
            write_files(files, folder)
        assert (caught.value.status, caught.value.file) == (status, named)


def test_the_upload_folder_is_removed_even_when_reading_fails():
    with pytest.raises(RuntimeError), upload_folder() as folder:
        (folder / "x.dcm").write_bytes(b"x")
        raise RuntimeError("reading failed")
    assert not folder.exists()
