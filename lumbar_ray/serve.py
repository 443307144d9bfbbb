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
import tempfile
import time
from typing import Any, BinaryIO

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from lumbar_ray.config import Config, ServeConfig
from lumbar_ray.data.series_type import description_map
from lumbar_ray.errors import StudyInputError
from lumbar_ray.inference.model import StudyModel, StudyRequest
from lumbar_ray.inference.study import ReadStudy
from lumbar_ray.inference.uploads import UploadLimits
from lumbar_ray.paths import tracking_uri_for
from lumbar_ray.raytools import ensure_ray
from lumbar_ray.registry import describe_model, load_ensemble, pinned_model_uri

logger = logging.getLogger(__name__)

PREDICT_ROUTE = "/v1/studies:predict"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
SPOOL_BYTES = 8 << 20  # an upload up to this size stays in memory, a larger one goes to a temporary file
MAX_FORM_PARTS = 1 << 20  # starlette's own part limit, set out of the way: serve.max_files is checked on the files

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


def _declared_length(request: Request, limits: UploadLimits) -> int:
    """The upload's declared length, refused (411) when missing and (413) when over the limit: the server never
    reads more than it was told (the HTTP server ends a body at its declared length)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise StudyInputError("", "send the upload with a Content-Length", 411)
    if int(declared) > limits.max_bytes:
        raise StudyInputError("", f"the upload is {int(declared):,} bytes, more than the {limits.max_bytes:,} allowed",
                              413)  # fmt: skip
    return int(declared)


async def _spooled_body(request: Request, limits: UploadLimits) -> BinaryIO:
    """The request body in a temporary file (in memory up to a few MiB, on disk beyond), within the limit."""
    _declared_length(request, limits)
    spooled = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (the caller closes it)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_bytes:
            spooled.close()
            raise StudyInputError("", f"the upload is more than the {limits.max_bytes:,} bytes allowed", 413)
        spooled.write(chunk)
    spooled.seek(0)
    return spooled


async def _form_files(request: Request, limits: UploadLimits) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of every file part of a multipart upload (parts may share a field name)."""
    _declared_length(request, limits)
    try:
        # The count is checked below, on the files themselves: starlette's own limit answers with a bare 400.
        form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
    except Exception as error:  # starlette's HTTPException: a malformed form
        raise StudyInputError("", f"cannot read the multipart upload ({error})") from None
    try:
        parts = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if len(parts) > limits.max_files:
            raise StudyInputError("", f"the upload holds {len(parts)} files, more than the {limits.max_files} "
                                  "allowed", 413)  # fmt: skip
        return [(part.filename or "", await part.read()) for part in parts]
    finally:
        await form.close()


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

    async def _read(self, request: Request) -> ReadStudy:
        """The request's study, read in a thread (decoding is CPU work; the event loop keeps answering)."""
        study_id = request.query_params.get("study_id")
        if study_id is not None and not study_id.isdigit():
            raise StudyInputError("study_id", "must be a non-negative integer")
        upload = StudyRequest(study_id=None if study_id is None else int(study_id))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            upload.study_files = await _form_files(request, self.limits)
        elif kind in ZIP_TYPES or not kind:
            upload.study_zip = await _spooled_body(request, self.limits)
        else:
            raise StudyInputError("", f"content type {kind!r}: send a zip (application/zip) or multipart/form-data",
                                  415)  # fmt: skip
        try:
            return await asyncio.to_thread(self.model.read_request, upload, self.cfg.series_map, self.limits,
                                           self.cfg.upload_dir)  # fmt: skip
        finally:
            if upload.study_zip is not None:
                upload.study_zip.close()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def score_batch(self, studies: list[ReadStudy]) -> list[pd.DataFrame | Exception]:
        """Localise, crop and score the studies of a batch (one forward pass of the folds); a study that fails
        gets its exception in its place, never failing the others."""
        return await asyncio.to_thread(self.model.predict_each, studies)

    @api.post(PREDICT_ROUTE)
    async def predict(self, request: Request) -> JSONResponse:
        """The 25 rows of one uploaded study (see the module docstring)."""
        try:
            study = await self._read(request)
        except StudyInputError as error:
            logger.info("refused an upload: %d", error.status)
            return error_response(error)
        except Exception as error:  # a bug: its message and traceback could name the upload's files
            logger.error("reading an upload failed: %s", type(error).__name__)
            return JSONResponse({"error": "internal error while reading the study", "file": ""}, status_code=500)
        rows = await self.score_batch(study)
        if isinstance(rows, Exception):
            logger.error("scoring a study failed: %s", type(rows).__name__)
            return JSONResponse({"error": "internal error while scoring the study", "file": ""}, status_code=500)
        body = {"model": {key: self.info.get(key) for key in ("name", "version", "alias", "data_digest")},
                "study_id": study.study_id, "rows": _json_rows(rows), "series": study.report,
                "skipped": study.skipped}  # fmt: skip
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
    description_map(cfg.series_map)  # a bad pattern or type fails the deployment, not every request
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
