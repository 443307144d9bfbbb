"""``lumbar-ray serve``: the registered study-level model behind Ray Serve, on loopback.

The app serves the model the session's pipeline registered (``trained_pipeline``); a test study is posted as a zip
and as DICOM files and must give what ``lumbar-ray predict`` gave; every bad input is a 4xx naming the file.
"""

from __future__ import annotations

import glob
import io
import json
import tempfile
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pydicom
import pytest

from lumbar_ray.constants import SUBMISSION_COLUMNS, TARGETS
from tests.net import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_UPLOAD_MB = 8
MAX_FILES = 300


def _zip(folder: Path, base: Path, extra: dict[str, bytes] | None = None, leave_out: str | None = None) -> bytes:
    """The study folder zipped with entries relative to ``base`` (``<study>/<series>/<n>.dcm``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.dcm")):
            if leave_out is None or leave_out not in path.relative_to(base).parts:
                archive.write(path, path.relative_to(base).as_posix())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(trained_pipeline):
    """The Serve app on a free loopback port, serving the pipeline's model by its alias."""
    from ray import serve

    from lumbar_ray.paths import data_root_for
    from lumbar_ray.serve import run_serve

    cfg, result = trained_pipeline
    model = f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"
    options = {"model": model, "port": free_port(), "max_upload_mb": MAX_UPLOAD_MB, "max_files": MAX_FILES}
    served_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=options)})
    url = run_serve(served_cfg, blocking=False)
    submission = pd.read_csv(result.prediction.submission_path)
    yield {"url": url, "cfg": served_cfg, "root": data_root_for(cfg), "submission": submission}
    serve.shutdown()


@pytest.fixture(scope="module")
def study(served) -> dict:
    """A test study of the pipeline's data: its folder, its zip and its id."""
    images = served["root"] / "test_images"
    folder = sorted(path for path in images.iterdir() if path.is_dir())[0]
    return {"folder": folder, "id": int(folder.name), "zip": _zip(folder, images), "images": images}


def _post_zip(served, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{served['url']}/v1/studies:predict", content=data, params=params,
                      headers={"Content-Type": "application/zip"}, timeout=300)  # fmt: skip


def _probs(rows: list[dict]) -> np.ndarray:
    return np.array([[row[c] for c in SUBMISSION_COLUMNS] for row in rows], dtype=np.float64)


def test_a_zipped_study_gets_the_probabilities_of_lumbar_ray_predict_with_points_in_the_zip(served, study):
    response = _post_zip(served, study["zip"])
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body["rows"]
    assert [row["row_id"] for row in rows] == [f"{study['id']}_{target}" for target in TARGETS]
    expected = served["submission"].set_index("row_id").loc[[row["row_id"] for row in rows]]
    np.testing.assert_allclose(_probs(rows), expected[list(SUBMISSION_COLUMNS)].to_numpy(), atol=1e-6, rtol=0)
    uids = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in study["folder"].rglob("*.dcm")
    }
    pointed = [row for row in rows if row["sop_instance_uid"] is not None]
    assert len(pointed) >= 20 and {row["sop_instance_uid"] for row in pointed} <= uids
    assert all(row["row"] is not None and row["column"] is not None for row in pointed)
    assert body["model"]["name"] == served["cfg"].tracking.model_name and body["model"]["version"] >= 1
    assert "Synthetic^Phantom" not in response.text and f"SYN{study['id']}" not in response.text


def test_the_same_study_as_dicom_files_in_a_multipart_form_gives_the_same_rows(served, study):
    files = [("files", (path.relative_to(study["images"]).as_posix(), path.read_bytes(), "application/dicom"))
             for path in sorted(study["folder"].rglob("*.dcm"))]  # fmt: skip
    as_files = httpx.post(f"{served['url']}/v1/studies:predict", files=files, timeout=300)
    as_zip = _post_zip(served, study["zip"])
    assert as_files.status_code == 200, as_files.text
    np.testing.assert_allclose(_probs(as_files.json()["rows"]), _probs(as_zip.json()["rows"]), atol=1e-9)


def test_a_study_without_its_axial_series_is_answered_with_those_targets_flagged_and_filled(served, study):
    axial = next(item for item in _post_zip(served, study["zip"]).json()["series"] if item["type"] == "Axial T2")
    response = _post_zip(served, _zip(study["folder"], study["images"], leave_out=str(axial["series_id"])))
    assert response.status_code == 200, response.text
    rows = {row["row_id"].split("_", 1)[1]: row for row in response.json()["rows"]}
    subarticular = [row for target, row in rows.items() if "subarticular" in target]
    assert len(subarticular) == 10
    assert all(row["missing_series"] and row["prior"] and row["sop_instance_uid"] is None for row in subarticular)
    assert not rows["spinal_canal_stenosis_l4_l5"]["missing_series"]


@pytest.mark.parametrize(
    ("case", "status", "named"),
    [
        ("not_dicom", 422, "notes.dcm"),
        ("truncated", 422, "truncated.dcm"),
        ("empty", 400, ""),
        ("traversal", 400, "../../evil.dcm"),
        ("nested", 400, "inner/more.zip"),
        ("too_large", 413, ""),
        ("too_many_files", 413, ""),
        ("not_a_zip", 400, ""),
        ("content_type", 415, ""),
    ],
)
def test_every_bad_upload_is_a_4xx_that_names_the_file(served, study, case, status, named):
    images, folder = study["images"], study["folder"]
    first = sorted(folder.rglob("*.dcm"))[0]
    inside = first.relative_to(images).parent.as_posix()
    bodies = {
        "not_dicom": _zip(folder, images, {f"{inside}/notes.dcm": b"these are not DICOM bytes"}),
        "truncated": _zip(folder, images, {f"{inside}/truncated.dcm": first.read_bytes()[: first.stat().st_size // 2]}),
        "empty": b"",
        "traversal": _zip(folder, images, {"../../evil.dcm": b"x"}),
        "nested": _zip(folder, images, {"inner/more.zip": study["zip"][:100]}),
        "too_large": _zip(folder, images, {"big.dcm": b"\0" * ((MAX_UPLOAD_MB + 1) << 20)}),
        "too_many_files": _zip(folder, images, {f"x/{i}.dcm": b"x" for i in range(MAX_FILES)}),
        "not_a_zip": b"definitely not a zip",
    }
    if case == "content_type":
        response = httpx.post(f"{served['url']}/v1/studies:predict", content=b"{}",
                              headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    else:
        response = _post_zip(served, bodies[case])
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] and (named in body["file"] if named else True)
    if named:
        assert Path(body["file"]).name == Path(named).name
    leftovers = glob.glob(str(Path(tempfile.gettempdir()) / "lumbar_ray_study_*"))
    assert not leftovers, f"upload folders left behind: {leftovers}"


def test_model_and_health_routes(served):
    info = httpx.get(f"{served['url']}/v1/model", timeout=30).json()
    assert info["name"] == served["cfg"].tracking.model_name and info["alias"] == served["cfg"].tracking.alias
    assert info["contract"]["targets"] == list(TARGETS) and info["version"] >= 1
    assert httpx.get(f"{served['url']}/-/healthz", timeout=30).status_code == 200


def test_no_patient_value_reaches_the_replica_logs(served, study):
    _post_zip(served, study["zip"])
    _post_zip(served, _zip(study["folder"], study["images"], {"x/notes.dcm": b"junk"}))
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API names the session's logs
    text = "".join(path.read_text(errors="ignore") for path in logs.glob("serve/*.log"))
    assert text, "no Serve logs found"
    assert "Synthetic^Phantom" not in text and f"SYN{study['id']}" not in text


def test_the_serve_config_file_names_the_app_builder_and_its_arguments(served):
    from lumbar_ray.serve import serve_config

    config = serve_config(served["cfg"])
    app = config["applications"][0]
    assert app["import_path"] == "lumbar_ray.serve:build_app" and app["args"]["model"].startswith("models:/")
    assert json.loads(json.dumps(config)) == config
