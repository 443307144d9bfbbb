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
            corrupt pixel data), ``not_grayscale``, ``missing_folder`` or ``empty_folder``.
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
        file: the offending file.
        line: CSV line number (the header is line 1).
        value: the offending value (a cell, a column name or a list of column names).
    """

    def __init__(self, file: Path | str, line: int, value: Any, problem: str) -> None:
        self.file = Path(file)
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


class DataChangedError(ValueError):
    """Training data whose digest differs from the one a CV run was started on (its finished folds learnt other
    data)."""
