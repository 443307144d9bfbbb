"""The YOLO export of the label points: one image per labelled slice, boxes on the points, folds respected."""

from __future__ import annotations

import io
import tarfile

import cv2
import numpy as np
import pytest
import yaml

from lumbar_ray.constants import TARGETS
from lumbar_ray.localize.yolo_data import detector_targets, export_yolo_dataset, pack_dataset, unpack_dataset


@pytest.fixture(scope="module")
def cached(sagittal_cached):
    return sagittal_cached


def test_detector_classes_follow_the_series_type():
    assert [TARGETS[t] for t in detector_targets("Sagittal T2/STIR")] == [
        f"spinal_canal_stenosis_{level}" for level in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
    ]
    assert len(detector_targets("Sagittal T1")) == 10
    with pytest.raises(ValueError, match="Coronal"):
        detector_targets("Coronal T1")


@pytest.mark.parametrize(("description", "n_classes"), [("Sagittal T2/STIR", 5), ("Sagittal T1", 10)])
def test_export_puts_a_box_on_every_point_and_keeps_the_val_fold_apart(cached, tmp_path, description, n_classes):
    cache, points, folds = cached
    export = export_yolo_dataset(points, cache, description, folds, val_fold=1, out=tmp_path / "yolo")
    expected = points[points["target"].isin(detector_targets(description))]
    assert export.boxes == len(expected) and export.train_images > 0 and export.val_images > 0
    dataset = yaml.safe_load(export.dataset_yaml.read_text())
    assert len(dataset["names"]) == n_classes
    val_studies = set(folds.loc[folds["fold"] == 1, "study_id"].astype(int))
    for split in ("train", "val"):
        for label_file in (tmp_path / "yolo" / "labels" / split).glob("*.txt"):
            study_id, series_id, slice_index = (int(v) for v in label_file.stem.split("_"))
            assert (study_id in val_studies) == (split == "val")
            image = cv2.imread(
                str(tmp_path / "yolo" / "images" / split / f"{label_file.stem}.png"), cv2.IMREAD_UNCHANGED
            )
            volume = cache.read(study_id, series_id).volume
            np.testing.assert_array_equal(image, volume[slice_index])  # the very pixels the classifier crops
            here = expected[(expected.study_id == study_id) & (expected.series_id == series_id)
                            & (expected.slice == slice_index)]  # fmt: skip
            lines = [line.split() for line in label_file.read_text().splitlines()]
            assert len(lines) == len(here)
            centres = sorted(
                (float(cx) * image.shape[1] - 0.5, float(cy) * image.shape[0] - 0.5) for _, cx, cy, *_ in lines
            )
            np.testing.assert_allclose(centres, sorted(zip(here.x, here.y, strict=True)), atol=1e-3)


def test_boxes_in_millimetres_cover_the_same_anatomy_whatever_the_field_of_view(cached, tmp_path):
    """``box_mm``: each box's side over the slice's millimetres per cache pixel, so a wider field of view gets a
    smaller box in pixels; ``box_fraction`` alone keeps one share of the image."""
    cache, points, folds = cached
    export_yolo_dataset(points, cache, "Sagittal T2/STIR", folds, val_fold=1, out=tmp_path / "mm", box_mm=18.0)
    export_yolo_dataset(points, cache, "Sagittal T2/STIR", folds, val_fold=1, out=tmp_path / "share")
    sides_mm = []
    for label_file in (tmp_path / "mm" / "labels").rglob("*.txt"):
        study_id, series_id, slice_index = (int(v) for v in label_file.stem.split("_"))
        entry = cache.read(study_id, series_id, mmap=True)
        mm_x, mm_y = entry.mm_per_pixel(slice_index)
        _, _, _, w, h = (float(v) for v in label_file.read_text().split()[:5])
        sides_mm.append((w * entry.volume.shape[2] * mm_x, h * entry.volume.shape[1] * mm_y))
    np.testing.assert_allclose(sides_mm, 18.0, rtol=1e-4)
    shares = {
        line.split()[3] for f in (tmp_path / "share" / "labels").rglob("*.txt") for line in f.read_text().splitlines()
    }
    assert shares == {"0.080000"}


def test_a_packed_export_unpacks_elsewhere_whole_and_pointing_at_itself(cached, tmp_path):
    """What a detector task on another node trains on: the same files, its ``dataset.yaml`` pointing at the copy."""
    cache, points, folds = cached
    export = export_yolo_dataset(points, cache, "Sagittal T1", folds, val_fold=1, out=tmp_path / "driver" / "yolo")

    dataset_yaml = unpack_dataset(pack_dataset(export.dataset_yaml), tmp_path / "node" / "copy")

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    original, copy = files(tmp_path / "driver" / "yolo"), files(tmp_path / "node" / "copy")
    assert set(copy) == set(original) and len(copy) > 3
    assert all(copy[name] == original[name] for name in copy if name != "dataset.yaml")
    dataset = yaml.safe_load(dataset_yaml.read_text())
    assert dataset["path"] == str((tmp_path / "node" / "copy").resolve())
    assert dataset["names"] == yaml.safe_load(export.dataset_yaml.read_text())["names"]


def test_an_archive_entry_leaving_the_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo("../outside.txt")
        entry.size = 1
        archive.addfile(entry, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError, match="outside"):
        unpack_dataset(buffer.getvalue(), tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()
