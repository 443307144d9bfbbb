"""``lumbar-ray serve``: the registered study-level model behind Ray Serve, on loopback.

The app serves the model the session's pipeline registered (``trained_pipeline``); a test study is posted as a zip
and as DICOM files and must give what ``lumbar-ray predict`` gave; every bad input is a 4xx naming the file.
"""

from __future__ import annotations

import io
import json
import os
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
def served(trained_pipeline, tmp_path_factory):
    """The Serve app on a free loopback port, serving the pipeline's model by its alias; uploads unpacked under a
    folder of this test's own (it must be empty after every request)."""
    from ray import serve

    from lumbar_ray.paths import data_root_for
    from lumbar_ray.serve import run_serve

    cfg, result = trained_pipeline
    uploads = tmp_path_factory.mktemp("uploads")
    model = f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"
    options = {"model": model, "port": free_port(), "max_upload_mb": MAX_UPLOAD_MB, "max_files": MAX_FILES,
               "upload_dir": str(uploads)}  # fmt: skip
    served_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=options)})
    url = run_serve(served_cfg, blocking=False)
    submission = pd.read_csv(result.prediction.submission_path)
    yield {"url": url, "cfg": served_cfg, "root": data_root_for(cfg), "submission": submission, "uploads": uploads}
    serve.shutdown()


@pytest.fixture(autouse=True)
def _uploads_removed(request):
    """After each test, no upload folder is left behind."""
    yield
    if "served" in request.fixturenames:
        uploads = request.getfixturevalue("served")["uploads"]
        assert not any(uploads.iterdir()), f"upload folders left behind: {list(uploads.iterdir())}"


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


@pytest.mark.parametrize("names", ["paths", "base names"])
def test_the_same_study_as_dicom_files_in_a_multipart_form_gives_the_same_rows(served, study, names):
    paths = sorted(study["folder"].rglob("*.dcm"))
    named = [p.relative_to(study["images"]).as_posix() if names == "paths" else p.name for p in paths]
    assert names == "paths" or len(set(named)) < len(named)  # base names collide across series, as curl sends them
    files = [("files", (name, path.read_bytes(), "application/dicom")) for name, path in zip(named, paths, strict=True)]
    as_files = httpx.post(f"{served['url']}/v1/studies:predict", files=files, params={"study_id": study["id"]},
                          timeout=300)  # fmt: skip
    as_zip = _post_zip(served, study["zip"])
    assert as_files.status_code == 200, as_files.text
    np.testing.assert_allclose(_probs(as_files.json()["rows"]), _probs(as_zip.json()["rows"]), atol=1e-9)


def test_without_series_descriptions_the_headers_still_type_every_series(served, study, tmp_path):
    """Real exports (and the competition's own files) may lack SeriesDescription: orientation and echo time type
    the series, and the study gets the same probabilities."""
    bare = tmp_path / str(study["id"])
    for path in study["folder"].rglob("*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.SeriesDescription
        target = bare / path.relative_to(study["folder"])
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(target)
    response = _post_zip(served, _zip(bare, tmp_path))
    assert response.status_code == 200, response.text
    assert {item["typed_by"] for item in response.json()["series"]} <= {"orientation", "orientation and echo time"}
    np.testing.assert_allclose(_probs(response.json()["rows"]), _probs(_post_zip(served, study["zip"]).json()["rows"]),
                               atol=1e-9)  # fmt: skip


def test_files_that_are_no_mr_image_are_left_out_and_listed(served, study):
    readme = {f"{study['id']}/README.txt": b"exported by a PACS", f"{study['id']}/Thumbs.db": b"\0\1"}
    response = _post_zip(served, _zip(study["folder"], study["images"], readme))
    assert response.status_code == 200, response.text
    assert sorted(item["file"] for item in response.json()["skipped"]) == ["README.txt", "Thumbs.db"]
    np.testing.assert_allclose(_probs(response.json()["rows"]), _probs(_post_zip(served, study["zip"]).json()["rows"]),
                               atol=1e-9)  # fmt: skip


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
        ("declared_too_large", 413, ""),
        ("multipart_traversal", 400, "../x.dcm"),
        ("multipart_empty_file", 400, "empty.dcm"),
        ("colliding_entries", 400, "a/b.dcm"),
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
    route = f"{served['url']}/v1/studies:predict"
    if case == "content_type":
        response = httpx.post(route, content=b"{}", headers={"Content-Type": "application/json"}, timeout=60)
    elif case == "declared_too_large":
        response = httpx.post(route, content=os.urandom((MAX_UPLOAD_MB << 20) + 1),
                              headers={"Content-Type": "application/zip"}, timeout=60)  # fmt: skip
    elif case.startswith("multipart"):
        files = {
            "multipart_traversal": [("files", ("../x.dcm", first.read_bytes()))],
            "multipart_empty_file": [("files", ("ok.dcm", first.read_bytes())), ("files", ("empty.dcm", b""))],
        }
        response = httpx.post(route, files=files[case], timeout=60)
    elif case == "colliding_entries":
        response = _post_zip(served, _zip(folder, images, {"a": b"x", "a/b.dcm": b"y"}))
    else:
        response = _post_zip(served, bodies[case])
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] and (named in body["file"] if named else True)
    if named:
        assert Path(body["file"]).name == Path(named).name


def test_model_and_health_routes(served):
    info = httpx.get(f"{served['url']}/v1/model", timeout=30).json()
    assert info["name"] == served["cfg"].tracking.model_name and info["alias"] == served["cfg"].tracking.alias
    assert info["contract"]["targets"] == list(TARGETS) and info["version"] >= 1
    assert httpx.get(f"{served['url']}/-/healthz", timeout=30).status_code == 200


def test_no_name_of_an_upload_reaches_the_logs(served, study):
    """An export may name its folders after the patient: neither a good nor a refused upload logs such a name."""
    import ray

    images, folder = study["images"], study["folder"]
    named = {f"DOE^JOHN/{p.relative_to(images).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*.dcm"))}
    first = sorted(folder.rglob("*.dcm"))[0]
    for extra in ({}, {"DOE^JOHN/x/damaged.dcm": first.read_bytes()[:1000]}, {"DOE^JOHN/x/notes.dcm": b"junk"}):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in (named | extra).items():
                archive.writestr(name, data)
        response = _post_zip(served, buffer.getvalue())
        assert response.status_code == (422 if extra else 200), response.text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API names the session's logs
    files = [path for path in logs.rglob("*") if path.is_file() and path.suffix in {".log", ".out", ".err"}]
    text = "".join(path.read_text(errors="ignore") for path in files)
    assert any("serve" in path.parts for path in files), "no Serve logs found"
    assert "DOE^JOHN" not in text and "Synthetic^Phantom" not in text and f"SYN{study['id']}" not in text


def test_the_serve_config_file_names_the_app_builder_and_its_arguments(served):
    from lumbar_ray.serve import serve_config

    config = serve_config(served["cfg"])
    app = config["applications"][0]
    assert app["import_path"] == "lumbar_ray.serve:build_app" and app["args"]["model"].startswith("models:/")
    assert json.loads(json.dumps(config)) == config
