"""The SPIDER layout: a round trip from the generator's masks, and orientation read from the direction matrix."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lumbar_ray.data.rsna import load_series
from lumbar_ray.segment import labels as lab
from lumbar_ray.segment import spider
from lumbar_ray.segment.masks import read_series_labels

from .conftest import write_masked


@pytest.fixture(scope="module", params=["easy", "hard"])
def written(request, tmp_path_factory):
    """A dataset with masks (each preset) and its SPIDER copy."""
    root = write_masked(tmp_path_factory.mktemp(request.param) / "rsna", request.param, size=64)
    out = root.parent / "spider"
    return root, out, spider.write_spider(root, out)


def _expected(root, study_id: int, series_id: int):
    """The series' DICOM pixels and masks ordered from the patient's left to right (+x to -x in LPS)."""
    folder = root / "train_images" / str(study_id) / str(series_id)
    headers = {int(p.stem): pydicom.dcmread(p) for p in folder.glob("*.dcm")}
    labels, numbers = read_series_labels(root, "train", study_id, series_id)
    order = np.argsort([-float(headers[int(n)].ImagePositionPatient[0]) for n in numbers])
    pixels = np.stack([headers[int(numbers[i])].pixel_array for i in order]).astype(np.float32)
    first = headers[int(numbers[order[0]])]
    return pixels, labels[order], first, headers


def test_a_round_trip_gives_the_same_labels_levels_and_geometry(written):
    root, out, count = written
    series = load_series(root / "train_series_descriptions.csv")
    sagittal = series[series["series_description"].str.startswith("Sagittal")]
    assert count == len(sagittal) == 4
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(p.name for p in (out / "images").iterdir())
    for row in sagittal.itertuples():
        name = f"{row.study_id}_{spider.SPIDER_SERIES[row.series_description]}"
        case = spider.read_spider(out / "images" / f"{name}.mha", out / "masks" / f"{name}.mha")
        pixels, labels, first, headers = _expected(root, row.study_id, row.series_id)
        assert case.name == name and case.image.dtype == np.float32 and case.labels.dtype == np.int16
        np.testing.assert_array_equal(case.image, pixels)
        np.testing.assert_array_equal(case.labels, lab.to_spider(labels))
        assert spider.spider_levels(case.labels) == spider.spider_levels(lab.to_spider(labels))
        assert spider.spider_levels(case.labels) == {level: value for value, level in lab.DISC_LEVELS.items()}
        xs = sorted(float(h.ImagePositionPatient[0]) for h in headers.values())
        expected_spacing = (float(np.median(np.diff(xs))), float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
        np.testing.assert_allclose(case.spacing, expected_spacing, atol=1e-4)  # IPP has 4 decimals
        np.testing.assert_allclose(case.origin, [float(v) for v in first.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(case.direction, spider.LAYOUT, atol=1e-6)


def _permuted(image: sitk.Image, perm: tuple[int, ...], flip: bool) -> sitk.Image:
    """The same voxels in another axis order (numpy axes ``perm``), the first flipped if asked, with the direction,
    spacing and origin that keep every voxel where it was in patient space."""
    dirs = np.asarray(image.GetDirection()).reshape(3, 3).T[::-1][list(perm)]  # rows: the new numpy axes
    spacing = np.asarray(image.GetSpacing())[::-1][list(perm)]
    array = np.transpose(sitk.GetArrayFromImage(image), perm)
    origin = np.asarray(image.GetOrigin())
    if flip:
        origin = origin + (array.shape[0] - 1) * spacing[0] * dirs[0]
        array, dirs = array[::-1], dirs * np.array([[-1.0], [1.0], [1.0]])
    moved = sitk.GetImageFromArray(np.ascontiguousarray(array))
    moved.SetSpacing(tuple(spacing[::-1].tolist()))
    moved.SetDirection(tuple(dirs[::-1].T.ravel().tolist()))
    moved.SetOrigin(tuple(origin.tolist()))
    return moved


@pytest.mark.parametrize("flip", [False, True])
def test_any_axis_order_on_disk_reads_back_identically(written, tmp_path, flip):
    _, out, _ = written
    name = sorted(p.stem for p in (out / "images").iterdir())[0]
    reference = spider.read_spider(out / "images" / f"{name}.mha", out / "masks" / f"{name}.mha")
    image, mask = (sitk.ReadImage(str(out / folder / f"{name}.mha")) for folder in ("images", "masks"))
    assert reference.labels.any()
    for perm in itertools.permutations(range(3)):
        sitk.WriteImage(_permuted(image, perm, flip), str(tmp_path / "image.mha"))
        sitk.WriteImage(_permuted(mask, perm, flip), str(tmp_path / "mask.mha"))
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "image.mha")))
        assert (perm == (0, 1, 2) and not flip) or not np.array_equal(on_disk, sitk.GetArrayFromImage(image))
        case = spider.read_spider(tmp_path / "image.mha", tmp_path / "mask.mha")
        np.testing.assert_array_equal(case.image, reference.image)
        np.testing.assert_array_equal(case.labels, reference.labels)
        np.testing.assert_allclose(case.spacing, reference.spacing)
        np.testing.assert_allclose(case.direction, reference.direction, atol=1e-6)
        np.testing.assert_allclose(case.origin, reference.origin, atol=1e-3)


def test_a_mask_on_another_grid_is_refused(written, tmp_path):
    _, out, _ = written
    name = sorted(p.stem for p in (out / "images").iterdir())[0]
    mask = sitk.ReadImage(str(out / "masks" / f"{name}.mha"))
    mask.SetSpacing(tuple(2 * s for s in mask.GetSpacing()))
    sitk.WriteImage(mask, str(tmp_path / "mask.mha"))
    with pytest.raises(ValueError, match="mask.mha"):
        spider.read_spider(out / "images" / f"{name}.mha", tmp_path / "mask.mha")


def test_levels_count_from_the_lowest_disc():
    volume = np.array([0, 1, 100, 201, 202, 205, 206, 301])
    assert spider.spider_levels(volume) == {"l1_l2": 205, "l4_l5": 202, "l5_s1": 201}
    assert list(spider.spider_levels(volume)) == ["l1_l2", "l4_l5", "l5_s1"]  # LEVELS order
    assert spider.spider_levels(np.zeros(3)) == {}
