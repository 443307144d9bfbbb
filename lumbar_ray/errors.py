"""The errors that mean bad input rather than a bug: the CLI reports each as one ``error: ...`` line and exit
code 2. Light on purpose (no numpy, pandas or torch), so the CLI can name them before it imports anything heavy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DicomReadError(ValueError):
    """A DICOM file or series folder cannot be read; the message names the path and the cause.

    Attributes:
        path: The offending file or folder.
        cause: What is wrong, in words.
        kind: A short category for failure tables: ``not_dicom``, ``no_pixels``, ``undecodable`` (truncated or
            corrupt pixel data), ``not_grayscale``, ``multi_frame`` (several frames where one is expected),
            ``missing_folder``, ``empty_folder`` or ``no_files`` (an empty list of files).
    """

    def __init__(self, path: str | os.PathLike[str], cause: str, kind: str = "unreadable") -> None:
        self.path = str(path)
        self.cause = cause
        self.kind = kind
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # keep path/cause/kind when the error crosses a process boundary (Ray)
        return (type(self), (self.path, self.cause, self.kind))


class RsnaFormatError(ValueError):
    """A competition CSV that does not follow the format.

    Attributes:
        file: the offending file: a path, or the URI (a string) of a file in object storage.
        line: CSV line number (the header is line 1).
        value: the offending value (a cell, a column name or a list of column names).
    """

    def __init__(self, file: Path | str, line: int, value: Any, problem: str) -> None:
        self.file = file if "://" in str(file) else Path(file)  # Path would fold a URI's "//"
        self.line = line
        self.value = value
        super().__init__(f"{self.file}, line {line}: {problem}: {value!r}")


class SubmissionError(ValueError):
    """A submission that does not fit the competition format (names the offending row_ids)."""


class ModelNotFoundError(LookupError):
    """A model URI that names no model, version or alias of the registry (or no lumbar_ray ensemble)."""


class UnknownStudyError(ValueError):
    """Study ids asked for that the data does not list in the split."""


class EnsembleError(ValueError):
    """Trained CV runs that cannot be combined into one ensemble (other folds, data, preprocessing or detectors)."""


class StudyInputError(ValueError):
    """A study sent for prediction that cannot be read as one (a served upload, a row of the registered model's
    input): the message names the file (its name inside the upload, never a server path) and the reason.

    Attributes:
        file: the offending file or entry ("" when the problem is the upload as a whole).
        reason: what is wrong, in words.
        status: the HTTP status that says it (400 malformed, 413 too large, 422 unreadable content).
    """

    def __init__(self, file: str, reason: str, status: int = 400) -> None:
        self.file = str(file)
        self.reason = reason
        self.status = int(status)
        super().__init__(f"{self.file}: {reason}" if self.file else reason)

    def __reduce__(self):  # keep file/reason/status when the error crosses a process boundary (Ray)
        return (type(self), (self.file, self.reason, self.status))


class DataChangedError(ValueError):
    """Training data whose digest differs from the one a CV run was started on (its finished folds learnt other
    data)."""


class MissingDetectorsError(FileNotFoundError):
    """A model about to be registered without the level detectors its config trains (``lumbar-ray localize`` not
    run for it, or their weights not on the registering machine): it could only predict from given points."""
