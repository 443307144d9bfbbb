"""The nnU-Net export: its layout, consecutive classes, and images that keep their geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from lumbar_ray.segment import labels as lab
from lumbar_ray.segment import spider
from lumbar_ray.segment.nnunet import export_nnunet


def test_a_dataset_with_masks_exports_every_class(masked_dir, tmp_path):
    cases = list(spider.dataset_cases(masked_dir))
    root = export_nnunet(cases, tmp_path, dataset_id=7, name="Synth")
    assert root == tmp_path / "Dataset007_Synth"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {name: index for index, name in enumerate(lab.SEMANTIC_CLASSES)}  # lesions included
    assert meta["numTraining"] == len(cases) == 4 and meta["file_ending"] == ".mha"
    assert meta["channel_names"] == {"0": "MRI"}
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == sorted(f"{c.name}_0000.mha" for c in cases)
    for case in cases:
        image = sitk.ReadImage(str(root / "imagesTr" / f"{case.name}_0000.mha"))
        labels = sitk.ReadImage(str(root / "labelsTr" / f"{case.name}.mha"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), lab.semantic(case.labels))
        assert image.GetSize() == labels.GetSize() and image.GetOrigin() == labels.GetOrigin()
        back = spider.read_spider(root / "imagesTr" / f"{case.name}_0000.mha")
        np.testing.assert_array_equal(back.image, case.image)
        np.testing.assert_allclose(back.origin, case.origin, atol=1e-4)
        np.testing.assert_allclose(back.spacing, case.spacing)


def test_spider_masks_declare_only_the_classes_they_hold(masked_dir, tmp_path):
    """SPIDER's values have no foramen or lesion: the classes stop at the canal and stay consecutive."""
    spider.write_spider(masked_dir, tmp_path / "spider")
    cases = [
        spider.read_spider(path, tmp_path / "spider" / "masks" / path.name)
        for path in sorted((tmp_path / "spider" / "images").iterdir())
    ]
    root = export_nnunet(cases, tmp_path / "raw")
    meta = json.loads((root / "dataset.json").read_text())
    assert root.name == "Dataset501_LumbarRay"
    assert meta["labels"] == {"background": 0, "vertebra": 1, "disc": 2, "canal": 3}
    held = set()
    for path in (root / "labelsTr").iterdir():
        held |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())
    assert held == set(meta["labels"].values())


def test_bad_cases_are_refused(masked_dir, tmp_path):
    case = next(spider.dataset_cases(masked_dir))
    with pytest.raises(ValueError, match="twice"):
        export_nnunet([case, case], tmp_path)
    with pytest.raises(ValueError, match="no labels"):
        export_nnunet([spider.SpiderCase("x", case.image, None, case.spacing, case.direction, case.origin)], tmp_path)
    with pytest.raises(ValueError, match="no case"):
        export_nnunet([], tmp_path)
    with pytest.raises(ValueError, match="dataset id"):
        export_nnunet([case], tmp_path, dataset_id=1000)
