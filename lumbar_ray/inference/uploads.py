"""A study that arrives as bytes (a zip, or DICOM files one by one) -> a private folder of files, safely.

What is refused, each as a :class:`~lumbar_ray.errors.StudyInputError` naming the entry and the reason:

* an empty upload or a zip without a file (400);
* more than ``max_files`` files, or more than ``max_bytes`` in all, counted on the *uncompressed* sizes before
  anything is extracted (so a zip bomb is refused from its directory, never inflated) and again while extracting
  (a lying directory cannot get past it) (413);
* an entry with an absolute path, a drive letter or a ``..`` component (path traversal), a symbolic link, or a
  nested archive (400);
* bytes that are not a zip where a zip was expected (400).

Entry names are kept (the reader orders a series' files by name, and a folder named by a number is taken as the
series id), under a fresh folder that the caller removes (:func:`upload_folder`). Nothing here logs a file's
content. Pure standard library: no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lumbar_ray.errors import StudyInputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
"""Entries refused as nested archives: a study is its DICOM files, not an archive of them."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    """How much one study upload may hold.

    Attributes:
        max_bytes: the most bytes of files in all (uncompressed).
        max_files: the most files.
    """

    max_bytes: int = 1 << 30
    max_files: int = 4000


UPLOAD_PREFIX = "lumbar_ray_study_"


@contextlib.contextmanager
def upload_folder(root: str | Path | None = None) -> Iterator[Path]:
    """A fresh private folder (mode 700) for one upload under ``root`` (None: the system's temporary folder),
    removed on leaving whatever happened inside."""
    folder = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def safe_relative_path(name: str) -> PurePosixPath:
    """An upload's entry name as a relative path that stays inside its folder.

    Raises:
        StudyInputError: an absolute path, a drive letter, a ``..`` component, or an empty name (400).
    """
    text = name.replace("\\", "/")
    path = PurePosixPath(text)
    if not text:
        raise StudyInputError(name, "a file without a name")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise StudyInputError(name, "absolute paths are not allowed in an upload")
    parts = [part for part in path.parts if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise StudyInputError(name, "the entry's path leaves the upload's folder ('..')")
    return PurePosixPath(*parts)


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse a link or a nested archive (400)."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise StudyInputError(info.filename, "symbolic links are not allowed in an upload")
    if info.filename.lower().endswith(ARCHIVE_SUFFIXES):
        raise StudyInputError(info.filename, "nested archives are not accepted: zip the DICOM files themselves")


def check_totals(count: int, size: int, limits: UploadLimits, what: str) -> None:
    """Refuse (413) ``count`` files of ``size`` bytes in all beyond ``limits``; ``what`` names the source."""
    if count > limits.max_files:
        raise StudyInputError("", f"{what} holds {count} files, more than the {limits.max_files} allowed", 413)
    if size > limits.max_bytes:
        raise StudyInputError("", f"{what} holds {size:,} bytes, more than the {limits.max_bytes:,} allowed", 413)


def _is_folder(info: zipfile.ZipInfo) -> bool:
    """A folder entry, including a Windows tool's ``name\\`` (which ``ZipInfo.is_dir`` does not know)."""
    return info.is_dir() or info.filename.endswith("\\")


def extract_zip(data: bytes | BinaryIO, folder: Path, limits: UploadLimits = UploadLimits()) -> list[Path]:
    """Extract a zipped study into ``folder`` (see the module docstring for what is refused).

    Args:
        data: the zip's bytes, or a seekable binary file holding them (an upload spooled to disk).
        folder: an empty folder (:func:`upload_folder`).
        limits: the size and count limits.

    Returns:
        The extracted files, in the zip's order.

    Raises:
        StudyInputError: see the module docstring.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    if source.seek(0, io.SEEK_END) == 0:
        raise StudyInputError("", "the upload is empty")
    source.seek(0)
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as error:
        raise StudyInputError("", f"the upload is not a zip archive ({error})") from None
    with archive:
        entries = [info for info in archive.infolist() if not _is_folder(info)]
        if not entries:
            raise StudyInputError("", "the zip holds no file")
        check_totals(len(entries), sum(info.file_size for info in entries), limits, "the zip")
        targets = []
        for info in entries:
            _check_entry(info)
            targets.append((info, folder / safe_relative_path(info.filename)))
        written, out = 0, []
        for info, target in targets:
            written = _extract_entry(archive, info, target, written, limits)
            out.append(target)
    return out


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, written: int,
                   limits: UploadLimits) -> int:  # fmt: skip
    """Copy one entry in chunks, counting bytes against the limit as they come; the running total."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, target.open("xb") as sink:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                written += len(chunk)
                check_totals(0, written, limits, "the zip")
                sink.write(chunk)
    except FileExistsError:
        raise StudyInputError(
            info.filename, "the zip names this path twice (as a file, or as a file and a folder)"
        ) from None
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as error:  # corrupt, encrypted
        raise StudyInputError(info.filename, f"cannot extract the entry ({error})") from None
    except OSError as error:  # a name too long, a file where a folder must go
        raise StudyInputError(info.filename, f"cannot be written ({error.strerror})") from None
    return written


def write_files(files: Iterable[tuple[str, bytes]], folder: Path, limits: UploadLimits = UploadLimits()) -> list[Path]:
    """Write uploaded files (``(name, bytes)``, e.g. a multipart form's parts) into ``folder``.

    A part's name may carry folders (``<series>/<n>.dcm``); the same rules as a zip's entries apply. Clients often
    send base names only (``curl -F files=@1.dcm``), so two series' ``1.dcm`` collide: the second goes to a folder
    of its own (``part-<k>/``), which changes nothing, since files are grouped into series by their headers.

    Raises:
        StudyInputError: no file, an empty file, too many files or bytes, a path leaving the folder, an archive.
    """
    files = list(files)
    if not files:
        raise StudyInputError("", "the upload is empty")
    check_totals(len(files), sum(len(data) for _, data in files), limits, "the upload")
    out = []
    for index, (name, data) in enumerate(files):
        relative = safe_relative_path(name)
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            raise StudyInputError(name, "archives go in the request body as application/zip, not as a file part")
        if not data:
            raise StudyInputError(name, "the file is empty")
        target = folder / relative
        if target.exists():
            target = folder / f"part-{index}" / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as error:
            raise StudyInputError(name, f"cannot be written ({error.strerror})") from None
        out.append(target)
    return out
