"""The registered model at study level: DICOM in, the 25 submission rows with their points out.

``mlflow.pyfunc.load_model("models:/<name>@<alias>").predict(frame)`` takes one study per row:

* ``study_dir`` (string): a folder holding the study's DICOM files, any layout, or its URI (``s3://...``, any
  URI pyarrow reads: the files are downloaded into a private folder first); or
* ``study_zip`` (binary; base64 in JSON, as MLflow's scoring server takes binary columns): the study zipped;
* ``study_id`` (long, optional): the id its rows are named by; else the folder's (or the zip's one top folder's)
  numeric name, else 0.

and returns :data:`~lumbar_ray.inference.study.ROW_COLUMNS` rows, 25 per study in the competition's order. Params:
``fold`` (-1: the mean over folds), ``batch_size`` (studies per forward pass) and ``series_map`` (JSON:
SeriesDescription pattern -> series type, before the defaults of :mod:`lumbar_ray.data.series_type`).

Everything runs inside the model (:mod:`lumbar_ray.inference.study`): the files are grouped into series, typed
from their headers, preprocessed in memory with the contract's settings, localised with the detectors shipped in
the model, cropped, predicted by the folds, and filled with the prior where a target has no crop, which is what
``lumbar-ray predict`` does from a cache. A file that is not readable DICOM refuses the study
(:class:`~lumbar_ray.errors.StudyInputError` naming it). The crop-level entry stays:
:meth:`~lumbar_ray.registry.FoldEnsemble.predict_crops`, which the project's batch inference calls directly.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from lumbar_ray.config import LocalizeConfig, SynthConfig
from lumbar_ray.data.cache import filesystem, is_uri, without_credentials
from lumbar_ray.data.series_type import description_map
from lumbar_ray.data.synthetic import write_dataset
from lumbar_ray.errors import StudyInputError
from lumbar_ray.inference.study import (
    ROW_COLUMNS,
    ReadStudy,
    StudyInput,
    StudyScorer,
    preprocess_settings,
    read_study,
    refuses_study,
    study_files,
    study_id_from_folder,
    study_rows,
)
from lumbar_ray.inference.uploads import (
    UploadLimits,
    check_totals,
    extract_zip,
    safe_relative_path,
    upload_folder,
    write_files,
)
from lumbar_ray.localize.locators import load_locators
from lumbar_ray.provenance import library_versions
from lumbar_ray.registry import DEFAULT_BATCH, FoldEnsemble, Packaging

logger = logging.getLogger(__name__)

SERVED_LIBRARIES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "scipy",
    "pyarrow",
    "pydantic",
    "PyYAML",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "opencv-python",
    "ultralytics",
    "monai",
    "matplotlib",
)
"""What the study-level model imports (the networks, the DICOM reader and its JPEG decoders, the crops, the YOLO
detectors or the U-Net localiser): pinned to the versions it was registered with (:func:`pinned_requirements`);
MLflow adds itself."""


def pinned_requirements(names: Sequence[str] = SERVED_LIBRARIES) -> list[str]:
    """``name==version`` of each installed library (a local version label such as ``+cpu`` dropped: the public
    release is what an index serves); a library not installed is listed unpinned."""
    versions = library_versions(tuple(names))
    return [name if versions[name] == "unknown" else f"{name}=={versions[name].split('+')[0]}" for name in names]


def study_signature() -> ModelSignature:
    """The study-level signature (see the module docstring)."""
    inputs = Schema([ColSpec("string", "study_dir", required=False), ColSpec("binary", "study_zip", required=False),
                     ColSpec("long", "study_id", required=False)])  # fmt: skip
    types = {"row_id": "string", "study_id": "long", "series_id": "long", "sop_instance_uid": "string",
             "instance_number": "long", "frame": "long", "row": "double", "column": "double", "filled": "boolean",
             "missing_series": "boolean", "prior": "boolean"}  # fmt: skip
    outputs = Schema([ColSpec(types.get(name, "double"), name, required=False) for name in ROW_COLUMNS])
    params = ParamSchema([ParamSpec("fold", "long", -1), ParamSpec("batch_size", "long", DEFAULT_BATCH),
                          ParamSpec("series_map", "string", "{}")])  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def study_packaging(contract: dict[str, Any]) -> Packaging:
    """How :func:`lumbar_ray.registry.log_and_register` packages the study-level model.

    The pinned requirements are recorded in the contract too (``requirements``), so what a version needs is read
    from its contract without downloading it.
    """
    contract["requirements"] = pinned_requirements()
    return Packaging(StudyModel(), study_signature(), tuple(contract["requirements"]), example_input())


def example_input() -> pd.DataFrame:
    """The input example saved with the model: one small synthetic study (32 px phantoms, about 100 KB zipped),
    so that ``mlflow models predict`` on the example runs the whole pipeline."""
    config = SynthConfig(train_studies=1, test_studies=1, image_sizes=[32], missing_series_rate=0.0,
                         extra_axial_rate=0.0, tilted_axial_rate=0.0, shuffled_instances_rate=0.0)  # fmt: skip
    with upload_folder() as folder:
        root = write_dataset(folder / "rsna", config).root
        study = next(path for path in sorted((root / "test_images").iterdir()) if path.is_dir())
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(study.rglob("*.dcm")):
                archive.write(path, path.relative_to(study.parent).as_posix())
    return pd.DataFrame({"study_zip": [buffer.getvalue()]})


def _zip_bytes(value: Any) -> bytes:
    """A ``study_zip`` cell as bytes (JSON carries binary as base64 text)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise StudyInputError("study_zip", "not base64-encoded zip bytes") from None


def _present(value: Any) -> bool:
    """Whether a cell holds a value (not None, NaN or empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return not (isinstance(value, (str, bytes)) and len(value) == 0)


def download_study(uri: str, folder: Path, limits: UploadLimits) -> Path:
    """Copy the files under a study folder's URI (``s3://bucket/rsna/test_images/<study_id>``, any layout below it)
    into ``folder/<the URI's last name>``, within the upload limits, and return that folder (so a numeric name is
    still the study id).

    Raises:
        StudyInputError: a URI that cannot be listed or holds no file (404); too many files or bytes (413), counted
            before anything is downloaded; a name leaving the folder (400). The URI is named without credentials.
    """
    shown = without_credentials(uri)
    fs, root = filesystem(uri)
    try:
        entries = [entry for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                   if entry.type == pafs.FileType.File]  # fmt: skip
    except OSError as error:
        raise StudyInputError(shown, f"cannot be listed ({error})", 404) from None
    if not entries:
        raise StudyInputError(shown, "no such folder, or it holds no file", 404)
    check_totals(len(entries), sum(entry.size for entry in entries), limits, shown)
    target = folder / (PurePosixPath(root).name or "study")
    for entry in entries:
        path = target / safe_relative_path(entry.path[len(root.rstrip("/")) + 1 :])
        path.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(entry.path) as source:
            path.write_bytes(source.read())
    return target


@dataclass
class StudyRequest:
    """One study to read: a folder, a zip (bytes, or a binary file such as a spooled upload) or uploaded files
    (``(name, bytes)``); and the id it is given (None = from the folder's layout)."""

    study_dir: str | None = None
    study_zip: bytes | BinaryIO | None = None
    study_id: int | None = None
    study_files: list[tuple[str, bytes]] | None = None


def parse_series_map(text: str | None) -> dict[str, str]:
    """The ``series_map`` param (JSON: pattern -> series type), checked.

    Raises:
        StudyInputError: not a JSON object of strings, a pattern that does not compile, an unknown series type.
    """
    try:
        mapping = json.loads(text or "{}")
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError("a JSON object of pattern -> series type")
        description_map(mapping)
    except ValueError as error:  # json.JSONDecodeError is one
        raise StudyInputError("series_map", str(error)) from None
    return mapping


def requests_from_frame(frame: pd.DataFrame) -> list[StudyRequest]:
    """The studies of a pyfunc input frame (one per row).

    Raises:
        StudyInputError: a row with neither or both of ``study_dir`` and ``study_zip``.
    """
    out = []
    for index, row in enumerate(frame.to_dict("records")):
        folder, archive = row.get("study_dir"), row.get("study_zip")
        if _present(folder) == _present(archive):
            raise StudyInputError(f"row {index}", "give exactly one of study_dir and study_zip")
        study_id = row.get("study_id")
        out.append(StudyRequest(str(folder) if _present(folder) else None,
                                _zip_bytes(archive) if _present(archive) else None,
                                int(study_id) if _present(study_id) else None))  # fmt: skip
    return out


# MLflow 3 inspects predict's type hints when the class is created and warns that they are not validated; the
# signature given at logging is what checks the inputs.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)

    class StudyModel(FoldEnsemble):
        """MLflow pyfunc: a study's DICOM files in, its 25 rows out (see the module docstring)."""

        def load_context(self, context: Any) -> None:
            """The folds (:meth:`FoldEnsemble.load_context`), then the detectors shipped with them."""
            super().load_context(context)
            self.localize = LocalizeConfig(**self.contract.get("localize", {}).get("config", {}))
            self.detectors = load_locators(self.detector_paths, self.localize)
            if not self.detectors:
                logger.warning("this model carries no level detectors: every target falls back to the prior")
            self.scorer = StudyScorer(self, self.detectors, self.localize)
            self.settings = preprocess_settings(self.contract)

        def read(self, files: Sequence[Path], study_id: int, series_map: dict[str, str] | None = None,
                 root: Path | None = None) -> ReadStudy:  # fmt: skip
            """One study's files read into memory, refused when an image file is damaged
            (:func:`~lumbar_ray.inference.study.refuses_study`); a file that is no MR image is left out and listed in
            :attr:`ReadStudy.skipped`.

            Raises:
                StudyInputError: a damaged image or a ``.dcm`` file that is not DICOM (named), or no image (422).
            """
            study = read_study(files, study_id, self.settings, series_map, root)
            refused = [item for item in study.skipped if refuses_study(item)]
            if refused:
                first = refused[0]
                more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
                raise StudyInputError(first["file"], f"{first['kind']}: {first['reason']}{more}", status=422)
            if study.skipped:  # counted here; named in the answer of the server (never logged: upload names)
                logger.warning("%d file(s) of the study are no MR image and were left out", len(study.skipped))
            return study

        def predict_read(self, studies: Sequence[ReadStudy], fold: int | None = None) -> list[pd.DataFrame]:
            """Rows of studies already read (:meth:`read`): one forward pass of the ensemble for all."""
            inputs = [StudyInput(study.study_id, study.cache, study.series) for study in studies]
            scored = self.scorer.score(inputs, fold=fold)
            return [study_rows(result, study.cache, study) for result, study in zip(scored, studies, strict=True)]

        def predict_each(self, studies: Sequence[ReadStudy]) -> list[pd.DataFrame | Exception]:
            """:meth:`predict_read` of a batch; should it fail, each study alone, so that one study's failure
            (returned in its place) never fails the others."""
            try:
                return list(self.predict_read(studies))
            except Exception:  # one study broke the batch: find which, keep the others
                out: list[pd.DataFrame | Exception] = []
                for study in studies:
                    try:
                        out.append(self.predict_read([study])[0])
                    except Exception as error:  # returned, raised by its own request
                        out.append(error)
                return out

        def read_folder(self, folder: Path, study_id: int | None = None, series_map: dict | None = None) -> ReadStudy:
            """The study whose files are under ``folder``, read (:meth:`read`); its id, when not given, from the
            folder's name (:func:`~lumbar_ray.inference.study.study_id_from_folder`), else 0."""
            files = study_files(folder)
            if not files:
                raise StudyInputError("", "the study holds no file")
            chosen = study_id if study_id is not None else (study_id_from_folder(folder, files) or 0)
            return self.read(files, chosen, series_map, folder)

        def read_request(self, request: StudyRequest, series_map: dict | None = None,
                         limits: UploadLimits | None = None, upload_root: str | None = None) -> ReadStudy:  # fmt: skip
            """A study read into memory: a folder in place; a zip or uploaded files through a private folder
            (under ``upload_root``, else the system's temporary folder) that is removed after reading.

            Raises:
                StudyInputError: see :meth:`read` and :mod:`lumbar_ray.inference.uploads`.
            """
            limits = limits or UploadLimits()
            if request.study_dir is not None and not is_uri(request.study_dir):
                folder = Path(request.study_dir)
                if not folder.is_dir():
                    raise StudyInputError(request.study_dir, "no such folder")
                return self.read_folder(folder, request.study_id, series_map)
            with upload_folder(root=upload_root) as folder:
                if request.study_dir is not None:  # a URI: its files come down into the private folder
                    return self.read_folder(download_study(request.study_dir, folder, limits), request.study_id,
                                            series_map)  # fmt: skip
                if request.study_files is not None:
                    write_files(request.study_files, folder, limits)
                else:
                    extract_zip(request.study_zip or b"", folder, limits)
                return self.read_folder(folder, request.study_id, series_map)

        def predict(
            self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
        ) -> pd.DataFrame:
            """One study per row of ``model_input`` -> 25 rows each (see the module docstring).

            Args:
                context: MLflow's context (unused once loaded).
                model_input: ``study_dir`` or ``study_zip`` (and optionally ``study_id``) per row.
                params: ``fold``, ``batch_size`` (studies read and scored together) and ``series_map``.

            Raises:
                StudyInputError: a study that cannot be read (the message names the file and the reason).
            """
            params = params or {}
            fold = int(params.get("fold", -1))
            batch = max(1, int(params.get("batch_size", DEFAULT_BATCH)))
            series_map = parse_series_map(params.get("series_map"))
            requests = requests_from_frame(pd.DataFrame(model_input))
            frames = []
            for start in range(0, len(requests), batch):
                studies = [self.read_request(request, series_map) for request in requests[start : start + batch]]
                frames += self.predict_read(studies, None if fold < 0 else fold)
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ROW_COLUMNS))
