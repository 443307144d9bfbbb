"""``lumbar-ray serve``: the registered study-level model online, as a Ray Serve application with a FastAPI ingress.

Routes:

* ``POST /v1/studies:predict``: one study, as a zip (``Content-Type: application/zip``, the body the zip's bytes) or
  as DICOM files (``multipart/form-data``, one part per file; a part's file name may carry folders). Optional query
  parameter ``study_id``. Answers the 25 rows of :data:`~lumbar_ray.inference.study.ROW_COLUMNS`, the series found
  and how each was typed, and the model that answered.
* ``GET /v1/model``: the model served: name, version, the alias it was asked by, its data digest, CV score and
  contract.
* ``GET /-/healthz``: 200 once the replica has loaded the model (under Serve the HTTP proxy answers this path
  itself, and a replica is only routed to once its model is loaded).

A study that cannot be read is a 4xx whose JSON body names the file (by its name inside the upload) and the
reason (:class:`~lumbar_ray.errors.StudyInputError`): 400 for a malformed upload (empty, not a zip, a path leaving
the upload, a nested archive), 413 for one over ``serve.max_upload_mb`` or ``serve.max_files``, 415 for another
content type, 422 for content that is not readable DICOM. A study lacking a series type is a 200 whose affected rows
are flagged (``missing_series``, ``prior``). Uploads are written to a private temporary folder removed after
reading; nothing an upload names (files, tags) is logged.

Each replica loads the model once; requests are read (DICOM decoding and preprocessing, in a thread) one by one,
then scored in batches (``@serve.batch``: localisation, crops and one forward pass of the folds for up to
``serve.max_batch_size`` studies). The Serve config for ``serve deploy`` or a KubeRay ``RayService`` is written by
:func:`serve_config` (``lumbar-ray serve --write-config serve.yaml``); its ``import_path`` is :func:`build_app`.
"""


import asyncio
import logging
import math
import time
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from lumbar_ray.config import Config, ServeConfig
from lumbar_ray.errors import StudyInputError
from lumbar_ray.inference.model import StudyModel
from lumbar_ray.inference.study import ReadStudy
from lumbar_ray.inference.uploads import UploadLimits, extract_zip, upload_folder, write_files
from lumbar_ray.paths import tracking_uri_for
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.registry import describe_model, load_ensemble, pinned_model_uri

logger = logging.getLogger(__name__)

PREDICT_ROUTE = "/v1/studies:predict"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
# An upload's file names and folders are the client's and may carry identifiers: the reader's per-file warnings
# (which name them) stay out of a replica's logs; what is wrong with a file goes back in the response instead.
QUIET_LOGGERS = ("lumbar_ray.data.dicom", "lumbar_ray.inference.study", "lumbar_ray.localize.study")

api = FastAPI(title="lumbar_ray", description="Lumbar spine degeneration severities of one MRI study (RSNA 2024)")


def limits_for(cfg: ServeConfig) -> UploadLimits:
    """The upload limits of a Serve config."""
    return UploadLimits(max_bytes=int(cfg.max_upload_mb * (1 << 20)), max_files=cfg.max_files)


def error_response(error: StudyInputError) -> JSONResponse:
    """The 4xx of a study that cannot be read: the file and the reason."""
    return JSONResponse({"error": error.reason, "file": error.file}, status_code=error.status)


def _json_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON objects: missing values as null (not NaN), integers as integers."""
    out = []
    for record in rows.to_dict("records"):
        clean = {}
        for key, value in record.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                clean[key] = None
            elif hasattr(value, "item"):
                clean[key] = value.item()
            else:
                clean[key] = value
        out.append(clean)
    return out


async def _body(request: Request, limits: UploadLimits) -> bytes:
    """The request body, refused (413) as soon as it grows past the limit (a declared length is checked first)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise StudyInputError("", f"the upload is {int(declared):,} bytes, more than the {limits.max_bytes:,} allowed",
                              413)  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_bytes:
            raise StudyInputError("", f"the upload is more than the {limits.max_bytes:,} bytes allowed", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_files(request: Request, limits: UploadLimits) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of each file part of a multipart upload."""
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_files)
    except Exception as error:  # starlette's MultiPartException / HTTPException: a malformed or too large form
        status = 413 if "Too many" in str(error) else 400
        raise StudyInputError("", f"cannot read the multipart upload ({error})", status) from None
    files = []
    for value in form.values():
        if hasattr(value, "read"):
            files.append((value.filename or "", await value.read()))
    await form.close()
    return files


@serve.deployment
@serve.ingress(api)
class StudyService:
    """One replica: the study-level model loaded once; requests read one by one, scored in batches.

    Args:
        model_uri: the model version to load (``models:/<name>/<version>``: an alias resolved by the caller).
        tracking_uri: the store holding it.
        info: what ``GET /v1/model`` answers (:func:`lumbar_ray.registry.describe_model`).
        serve_cfg: the Serve settings (limits, batching, the series map).
    """

    def __init__(self, model_uri: str, tracking_uri: str, info: dict[str, Any], serve_cfg: dict[str, Any]) -> None:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.cfg = ServeConfig(**serve_cfg)
        self.limits = limits_for(self.cfg)
        loaded = load_ensemble(model_uri, tracking_uri)
        model = loaded.model.unwrap_python_model()
        if not isinstance(model, StudyModel):
            raise TypeError(f"{model_uri} is a crop-level model (registered before study-level models): retrain or "
                            "re-register it to serve studies")  # fmt: skip
        self.model = model
        self.info = dict(info)
        self.score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        logger.info("serving %s v%s", info.get("name"), info.get("version"))

    def _read_zip(self, data: bytes, study_id: int | None) -> ReadStudy:
        with upload_folder() as folder:
            extract_zip(data, folder, self.limits)
            return self.model.read_folder(folder, study_id, self.cfg.series_map)

    def _read_files(self, files: list[tuple[str, bytes]], study_id: int | None) -> ReadStudy:
        with upload_folder() as folder:
            write_files(files, folder, self.limits)
            return self.model.read_folder(folder, study_id, self.cfg.series_map)

    async def _read(self, request: Request) -> ReadStudy:
        """The request's study, read in a thread (decoding is CPU work; the event loop keeps answering)."""
        study_id = request.query_params.get("study_id")
        if study_id is not None and not study_id.isdigit():
            raise StudyInputError("study_id", "must be a non-negative integer")
        study_id = None if study_id is None else int(study_id)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            files = await _form_files(request, self.limits)
            return await asyncio.to_thread(self._read_files, files, study_id)
        if kind in ZIP_TYPES or not kind:
            data = await _body(request, self.limits)
            return await asyncio.to_thread(self._read_zip, data, study_id)
        raise StudyInputError("", f"content type {kind!r}: send a zip (application/zip) or multipart/form-data", 415)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def score_batch(self, studies: list[ReadStudy]) -> list[pd.DataFrame]:
        """Localise, crop and score the studies of a batch (one forward pass of the folds)."""
        return await asyncio.to_thread(self.model.predict_read, studies)

    @api.post(PREDICT_ROUTE)
    async def predict(self, request: Request) -> JSONResponse:
        """The 25 rows of one uploaded study (see the module docstring)."""
        try:
            study = await self._read(request)
        except StudyInputError as error:
            logger.info("refused an upload: %d", error.status)
            return error_response(error)
        rows = await self.score_batch(study)
        body = {"model": {key: self.info.get(key) for key in ("name", "version", "alias", "data_digest")},
                "study_id": study.study_id, "rows": _json_rows(rows), "series": study.report}  # fmt: skip
        return JSONResponse(body)

    @api.get("/v1/model")
    async def model_info(self) -> JSONResponse:
        """The model served (name, version, alias, data digest, CV score, contract)."""
        return JSONResponse(self.info)

    @api.get("/-/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once the model is loaded (a replica answers only after its constructor has run)."""
        return JSONResponse({"status": "ok", "version": self.info.get("version")})


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of a config: replicas or autoscaling, resources, concurrency."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.use_gpu else 0},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump(mode="json")
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (the ``import_path`` of a Serve config: ``lumbar_ray.serve:build_app``).

    Args:
        args: ``tracking_uri`` and the :class:`~lumbar_ray.config.ServeConfig` fields (``model`` at least).
    """
    args = dict(args)
    tracking_uri = args.pop("tracking_uri")
    cfg = ServeConfig(**args)
    info = describe_model(cfg.model, tracking_uri)
    pinned = pinned_model_uri(info)
    deployment = StudyService.options(**deployment_options(cfg))
    return deployment.bind(pinned, tracking_uri, info, cfg.model_dump(mode="json"))


def serve_args(cfg: Config) -> dict[str, Any]:
    """:func:`build_app`'s arguments from a resolved config."""
    return {"tracking_uri": tracking_uri_for(cfg), **cfg.serve.model_dump(mode="json")}


def serve_config(cfg: Config) -> dict[str, Any]:
    """A Serve config file's content (``serve deploy``, a KubeRay ``RayService``'s ``serveConfigV2``)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{
            "name": cfg.serve.name,
            "route_prefix": cfg.serve.route_prefix,
            "import_path": "lumbar_ray.serve:build_app",
            "args": serve_args(cfg),
        }],
    }  # fmt: skip


def run_serve(cfg: Config, blocking: bool = True) -> str:
    """Start the application on the local (or ``RAY_ADDRESS``) Ray cluster; the base URL it answers at.

    Args:
        cfg: the resolved config (``serve`` and ``tracking``).
        blocking: keep serving until interrupted (the CLI); False returns once the replicas are up (tests,
            benchmarks).
    """
    ensure_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(serve_args(cfg)), name=cfg.serve.name, route_prefix=cfg.serve.route_prefix)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
    logger.info("serving %s at %s%s (Ctrl-C stops)", cfg.serve.model, url, PREDICT_ROUTE)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(cfg.serve.name)
    return url
