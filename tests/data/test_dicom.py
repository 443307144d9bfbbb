"""Tests of the DICOM series reader on pydicom's bundled MR files and on small synthetic series."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lumbar_ray.data.dicom import (
    WHITELISTED_TAGS,
    DicomReadError,
    SkippedFile,
    SliceGeometry,
    group_series_files,
    patient_to_pixel,
    pixel_to_patient,
    read_series,
    read_slice,
    resize_bilinear,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PHI = {
    "PatientName": "Doe^Secretname",
    "PatientID": "PID-778899",
    "PatientBirthDate": "19510203",
    "InstitutionName": "Hospital Of Secrets",
    "StudyInstanceUID": "1.2.3.4.5.6.7.8.999",
}


def new_dataset(sop_class_uid: str) -> Dataset:
    """An empty dataset of this SOP class with its file meta (explicit VR little endian) and a new instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_mr(
    path: Path,
    pixels: np.ndarray,
    *,
    instance: int | None = 1,
    position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = AXIAL,
    spacing: tuple[float, float] = (0.5, 0.5),
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    slope: float | None = None,
    intercept: float | None = None,
    phi: bool = False,
    with_pixels: bool = True,
    **tags: object,
) -> Path:
    """Write a minimal single-frame MR file with uint16 pixels, the given geometry and any further ``tags``."""
    ds = new_dataset(MR_IMAGE_STORAGE)
    ds.Modality = "MR"
    ds.SeriesDescription = "Sagittal T2/STIR"
    ds.SliceThickness = 4.0
    ds.PixelSpacing = list(spacing)
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if phi:
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if with_pixels:
        ds.set_pixel_data(np.asarray(pixels, dtype=np.uint16), photometric, bits_stored)
    else:
        ds.Rows, ds.Columns = pixels.shape
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def constant(value: int, shape: tuple[int, int] = (4, 5)) -> np.ndarray:
    """A uint16 image filled with ``value`` (the value identifies the slice after sorting)."""
    return np.full(shape, value, dtype=np.uint16)


# --------------------------------------------------------------------------------------------------
# Real pydicom test files


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_padded.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")
def test_bundled_mr_files_decode_identically(name: str) -> None:
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    decoded = read_slice(get_testdata_file(name))
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape == (64, 64)
    np.testing.assert_array_equal(decoded.pixels, reference.astype(np.float32))
    assert decoded.geometry.shape == (64, 64)
    assert decoded.geometry.pixel_spacing == (0.3125, 0.3125)
    assert decoded.geometry.orientation == AXIAL
    assert decoded.geometry.instance_number == 1
    assert set(decoded.meta) <= set(WHITELISTED_TAGS)
    assert "PatientName" not in decoded.meta and "4MR1" not in repr(decoded.meta)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_meta_matches_pydicom_conversion(name: str) -> None:
    # The fast raw-element parser must agree with pydicom's conversion (explicit, implicit VR, big endian).
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    expected = {}
    for keyword in WHITELISTED_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        expected[keyword] = [float(v) for v in value] if isinstance(value, MultiValue) else value
    meta = read_slice(path).meta
    assert meta.keys() == expected.keys()
    for key, value in expected.items():  # approx per value: pytest >= 9.2 refuses nested containers
        if isinstance(value, (int, float, list)):
            assert meta[key] == pytest.approx(value), key
        else:
            assert meta[key] == value, key
    assert meta["Rows"] == 64 and meta["InstanceNumber"] == 1 and meta["Modality"] == "MR"
    assert meta["ImagePositionPatient"] == [-83.9063, -91.2, 6.6406]
    assert type(meta["EchoTime"]) is float and type(meta["BitsStored"]) is int


def test_truncated_file_raises_naming_the_file() -> None:
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(DicomReadError, match="less than expected") as info:
        read_slice(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_file_cut_in_the_header_raises(tmp_path: Path) -> None:
    path = tmp_path / "1.dcm"
    path.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes()[:400])
    with pytest.raises(DicomReadError, match=str(path)):
        read_slice(path)


def test_non_dicom_file_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_text("this is not a DICOM file\n")
    with pytest.raises(DicomReadError, match="not a readable DICOM") as info:
        read_slice(path)
    assert str(path) in str(info.value)


def test_dicom_without_pixel_data_raises(tmp_path: Path) -> None:
    path = write_mr(tmp_path / "1.dcm", constant(1), with_pixels=False)
    with pytest.raises(DicomReadError, match="DICOM file has no pixel data") as info:
        read_slice(path)
    assert str(path) in str(info.value)


def _truncate(path: Path, n_bytes: int = 10) -> Path:
    """Cut the end of a file's pixel data, as an interrupted copy does."""
    path.write_bytes(path.read_bytes()[:-n_bytes])
    return path


def test_series_skips_unreadable_files_and_names_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for k in (1, 3, 6):
        write_mr(tmp_path / f"{k}.dcm", constant(k), instance=k, position=(0.0, 0.0, float(k)))
    (tmp_path / "2.dcm").write_text("garbage")
    _truncate(write_mr(tmp_path / "4.dcm", constant(4), instance=4, position=(0.0, 0.0, 4.0), phi=True))
    write_mr(tmp_path / "5.dcm", constant(5), with_pixels=False)

    with caplog.at_level("WARNING", logger="lumbar_ray.data.dicom"):
        series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume[:, 0, 0], [1, 3, 6])
    assert series.n_files == 3 and series.stacks[0].instance_numbers == [1, 3, 6]
    assert [(s.file_name, s.kind) for s in series.skipped] == [
        ("2.dcm", "not_dicom"),
        ("4.dcm", "undecodable"),
        ("5.dcm", "no_pixels"),
    ]
    assert all(isinstance(s, SkippedFile) and s.cause for s in series.skipped)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name in ("2.dcm", "4.dcm", "5.dcm"):
        assert any(str(tmp_path) in message and name in message for message in warnings), name
    blob = repr(series) + repr(series.skipped) + "\n".join(warnings)
    assert not any(value in blob for value in PHI.values())


def test_series_without_a_readable_file_raises_naming_the_folder(tmp_path: Path) -> None:
    _truncate(write_mr(tmp_path / "1.dcm", constant(1)))
    (tmp_path / "2.dcm").write_text("garbage")
    with pytest.raises(DicomReadError, match=r"no readable DICOM file among 2; the first, 1\.dcm") as info:
        read_series(tmp_path)
    assert info.value.path == str(tmp_path) and info.value.kind == "undecodable"
    assert str(tmp_path) in str(info.value)


def test_empty_and_missing_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(DicomReadError, match=r"no \.dcm files") as info:
        read_series(tmp_path)
    assert info.value.path == str(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(DicomReadError, match="does not exist") as info:
        read_series(missing)
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Sorting


@pytest.mark.parametrize(
    ("orientation", "axis", "sign"),
    # Sagittal: normal = (0,1,0) x (0,0,-1) = (-1,0,0); axial: normal = (1,0,0) x (0,1,0) = (0,0,1).
    [(SAGITTAL, 0, -1.0), (AXIAL, 2, 1.0)],
)
def test_slices_sorted_along_normal_not_by_instance_or_name(
    tmp_path: Path, orientation: tuple[float, ...], axis: int, sign: float
) -> None:
    n = 7
    rng = random.Random(3)
    coordinates = [10.0 * k - 20.0 for k in range(n)]
    rng.shuffle(coordinates)
    instances = list(range(1, n + 1))
    rng.shuffle(instances)
    names = [f"{k}.dcm" for k in range(n)]
    rng.shuffle(names)
    for coordinate, instance, name in zip(coordinates, instances, names, strict=True):
        position = [1.0, 2.0, 3.0]
        position[axis] = coordinate
        # The pixel value encodes the coordinate so the volume order can be checked directly.
        write_mr(
            tmp_path / name,
            constant(int(coordinate) + 100),
            instance=instance,
            position=tuple(position),
            orientation=orientation,
        )

    series = read_series(tmp_path)
    assert len(series.stacks) == 1 and series.n_files == n == series.n_slices
    stack = series.stacks[0]
    np.testing.assert_allclose(stack.normal, np.eye(3)[axis] * sign, atol=1e-12)
    expected_coordinates = sorted(coordinates, key=lambda c: sign * c)
    np.testing.assert_array_equal(series.volume[:, 0, 0], np.asarray(expected_coordinates) + 100)
    assert np.all(np.diff(stack.positions_along_normal) > 0)
    np.testing.assert_allclose(stack.positions_along_normal, sign * np.asarray(expected_coordinates))
    by_coordinate = {c: i for c, i in zip(coordinates, instances, strict=True)}
    assert stack.instance_numbers == [by_coordinate[c] for c in expected_coordinates]
    assert stack.geometry_complete and series.geometry_complete
    assert stack.index_of_instance(by_coordinate[expected_coordinates[2]]) == 2


def test_ties_broken_by_instance_number_then_file_name(tmp_path: Path) -> None:
    # Two slices at z=0 (instances 5 and 2), two at z=4 with equal instance 9 (files b.dcm, a.dcm).
    write_mr(tmp_path / "1.dcm", constant(50), instance=5, position=(0.0, 0.0, 0.0))
    write_mr(tmp_path / "2.dcm", constant(20), instance=2, position=(0.0, 0.0, 1e-5))
    write_mr(tmp_path / "b.dcm", constant(91), instance=9, position=(0.0, 0.0, 4.0))
    write_mr(tmp_path / "a.dcm", constant(90), instance=9, position=(0.0, 0.0, 4.0))
    write_mr(tmp_path / "3.dcm", constant(1), instance=1, position=(0.0, 0.0, 8.0))
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume[:, 0, 0], [20, 50, 90, 91, 1])
    assert [g.file_name for g in series.stacks[0].geometry] == ["2.dcm", "1.dcm", "a.dcm", "b.dcm", "3.dcm"]


def test_missing_position_falls_back_to_instance_order(tmp_path: Path) -> None:
    for name, instance in [("a.dcm", 3), ("b.dcm", 1), ("c.dcm", 2)]:
        write_mr(tmp_path / name, constant(instance), instance=instance, position=None)
    series = read_series(tmp_path)
    stack = series.stacks[0]
    assert not stack.geometry_complete and not series.geometry_complete
    assert stack.normal is None and stack.orientation is None
    assert np.isnan(stack.positions_along_normal).all()
    np.testing.assert_array_equal(series.volume[:, 0, 0], [1, 2, 3])
    assert stack.instance_numbers == [1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Intensities


def test_rescale_slope_and_intercept_applied(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2], [100, 1000, 4095]], dtype=np.uint16)
    path = write_mr(tmp_path / "1.dcm", pixels, slope=2.5, intercept=-1024.0)
    decoded = read_slice(path)
    assert decoded.pixels.dtype == np.float32
    np.testing.assert_allclose(decoded.pixels, pixels * 2.5 - 1024.0)
    assert decoded.meta["RescaleSlope"] == 2.5 and decoded.meta["RescaleIntercept"] == -1024.0


def test_monochrome1_inverted_over_bits_stored_range(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2], [100, 1000, 4095]], dtype=np.uint16)
    path = write_mr(tmp_path / "1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12)
    np.testing.assert_array_equal(read_slice(path).pixels, 4095.0 - pixels)
    # With rescale: slope * (lo + hi - stored) + intercept.
    path = write_mr(tmp_path / "2.dcm", pixels, photometric="MONOCHROME1", bits_stored=12, slope=2.0, intercept=10.0)
    np.testing.assert_allclose(read_slice(path).pixels, 2.0 * (4095.0 - pixels) + 10.0)


# --------------------------------------------------------------------------------------------------
# Mixed shapes and orientations


def test_mixed_shapes_resized_to_modal_shape(tmp_path: Path) -> None:
    ramp_small = np.tile(np.arange(0, 64, 2, dtype=np.uint16), (16, 1))  # 16 x 32, value = 2 * column
    for k in range(3):
        write_mr(
            tmp_path / f"{k}.dcm",
            constant(7, (32, 64)),
            instance=k + 1,
            position=(0.0, 0.0, float(k)),
            spacing=(0.5, 0.5),
        )
    write_mr(tmp_path / "3.dcm", ramp_small, instance=4, position=(0.0, 0.0, 3.0), spacing=(1.0, 1.0))

    series = read_series(tmp_path)
    stack = series.stacks[0]
    assert series.volume.shape == (4, 32, 64)
    np.testing.assert_array_equal(stack.resized, [False, False, False, True])
    assert stack.geometry[3].shape == (16, 32) and stack.geometry[3].pixel_spacing == (1.0, 1.0)
    assert stack.geometry[0].shape == (32, 64)
    assert stack.stack_pixel_spacing(3) == (0.5, 0.5)
    assert "Rows" not in series.meta  # differs between files

    # A linear ramp is reproduced exactly by bilinear interpolation away from the clamped border, so the
    # value at a stack pixel must equal the ramp at the mapped original coordinate.
    x_stack = np.arange(2, 62, dtype=np.float64)
    x_orig, _ = stack.stack_to_original(3, x_stack, 10.0)
    np.testing.assert_allclose(stack.volume[3, 10, 2:62], 2.0 * x_orig, atol=1e-4)

    # Point mapping round trip, and identity for slices that kept their shape.
    x, y = stack.original_to_stack(3, 12.25, 7.5)
    assert (x, y) == pytest.approx((25.0, 15.5))
    back = stack.stack_to_original(3, x, y)
    assert back == pytest.approx((12.25, 7.5))
    assert stack.original_to_stack(0, 12.25, 7.5) == pytest.approx((12.25, 7.5))


def test_pixel_to_patient_follows_the_dicom_convention() -> None:
    # PixelSpacing is (row spacing, column spacing): a column step moves along the row direction (IOP[:3]).
    point = pixel_to_patient((10.0, -50.0, 80.0), SAGITTAL, (0.5, 0.8), column=9.5, row=4.5)
    np.testing.assert_allclose(point, [10.0, -50.0 + 9.5 * 0.8, 80.0 - 4.5 * 0.5])
    geometry = SliceGeometry(1, (10.0, -50.0, 80.0), SAGITTAL, (0.5, 0.8), (100, 120), None, "1.dcm")
    np.testing.assert_array_equal(geometry.pixel_to_patient(9.5, 4.5), point)
    with pytest.raises(ValueError, match="missing"):
        SliceGeometry(1, None, SAGITTAL, (0.5, 0.8), (100, 120), None, "1.dcm").pixel_to_patient(0.0, 0.0)


def test_pixel_patient_round_trip_on_an_oblique_plane() -> None:
    rng = np.random.default_rng(3)
    row_dir = np.array([0.8, 0.36, 0.48])  # a unit vector off every axis
    col_dir = np.cross(row_dir, [0.1, -0.3, 1.0])
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    orientation, position, spacing = (*row_dir, *col_dir), (-72.5, 13.0, 140.25), (0.45, 0.7)
    for column, row in rng.uniform(-5.0, 300.0, size=(20, 2)):
        point = pixel_to_patient(position, orientation, spacing, column, row)
        assert patient_to_pixel(position, orientation, spacing, point) == pytest.approx((column, row, 0.0), abs=1e-9)
        # off the plane: the same pixel, and the signed distance along row x column
        off = patient_to_pixel(position, orientation, spacing, point - 2.5 * normal)
        assert off == pytest.approx((column, row, -2.5), abs=1e-9)


def test_resize_bilinear_keeps_constant_and_shape() -> None:
    image = np.full((5, 7), 3.0, dtype=np.float32)
    out = resize_bilinear(image, (11, 4))
    assert out.shape == (11, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0)


def test_two_orientations_give_two_stacks(tmp_path: Path) -> None:
    tilt = np.radians(15.0)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    slightly_off = (1.0, 0.0, 0.0, 0.0, float(np.cos(1e-4)), float(np.sin(1e-4)))  # same group (< 1 degree)
    # Block A: instances 4-6 tilted; block B: instances 1-3 axial (one with float noise), files shuffled.
    write_mr(tmp_path / "1.dcm", constant(61), instance=6, position=(0.0, 0.0, 30.0), orientation=tilted)
    write_mr(tmp_path / "2.dcm", constant(12), instance=2, position=(0.0, 0.0, 2.0), orientation=slightly_off)
    write_mr(tmp_path / "3.dcm", constant(41), instance=4, position=(0.0, 0.0, 10.0), orientation=tilted)
    write_mr(tmp_path / "4.dcm", constant(13), instance=3, position=(0.0, 0.0, 1.0))
    write_mr(tmp_path / "5.dcm", constant(51), instance=5, position=(0.0, 0.0, 20.0), orientation=tilted)
    write_mr(tmp_path / "6.dcm", constant(11), instance=1, position=(0.0, 0.0, 3.0))

    series = read_series(tmp_path)
    assert len(series.stacks) == 2
    first, second = series.stacks
    # Stacks ordered by smallest InstanceNumber; each sorted along its own normal (+z-ish).
    np.testing.assert_array_equal(first.volume[:, 0, 0], [13, 12, 11])
    np.testing.assert_array_equal(second.volume[:, 0, 0], [41, 51, 61])
    np.testing.assert_allclose(first.normal, [0.0, 0.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(second.normal, [0.0, -np.sin(tilt), np.cos(tilt)], atol=1e-9)
    assert series.locate_instance(5) == (1, 1)
    with pytest.raises(ValueError, match="2 stacks"):
        _ = series.volume


# --------------------------------------------------------------------------------------------------
# Privacy


def _all_strings(value: object) -> list[str]:
    """Every string and number rendered as text inside nested meta values."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_all_strings(v)]]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _all_strings(v)]
    return [str(value)]


def test_phi_never_leaves_the_module(tmp_path: Path) -> None:
    for k in range(3):
        write_mr(tmp_path / f"{k}.dcm", constant(k), instance=k + 1, position=(0.0, 0.0, float(k)), phi=True)
    series = read_series(tmp_path)
    single = read_slice(tmp_path / "0.dcm")

    assert set(series.meta) <= set(WHITELISTED_TAGS)
    assert set(single.meta) <= set(WHITELISTED_TAGS)
    assert series.meta["Modality"] == "MR" and series.meta["SeriesDescription"] == "Sagittal T2/STIR"
    texts = [
        repr(series),
        repr(single),
        *(repr(g) for stack in series.stacks for g in stack.geometry),
        *_all_strings(series.meta),
        *_all_strings(single.meta),
    ]
    blob = "\n".join(texts)
    for keyword, value in PHI.items():
        assert keyword not in blob
        assert value not in blob
        assert value.split("^")[-1] not in blob
    for meta in (series.meta, single.meta):
        for value in meta.values():
            assert isinstance(value, (int, float, str, list))
            assert not isinstance(value, pydicom.Dataset)
            if isinstance(value, list):
                assert all(type(v) in (int, float, str) for v in value)
    assert not any(isinstance(v, pydicom.Dataset) for v in vars(series).values())


# --------------------------------------------------------------------------------------------------
# Multi-frame (Enhanced MR) files


def _item(**tags: object) -> Dataset:
    """One sequence item (a functional group macro) holding ``tags``."""
    item = Dataset()
    for keyword, value in tags.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_mr(
    path: Path,
    frames: np.ndarray,
    positions: list[tuple[float, float, float]],
    *,
    orientation: tuple[float, ...] = SAGITTAL,
    spacing: tuple[float, float] = (0.5, 0.5),
    rescale: list[tuple[float, float]] | None = None,
    frame_spacing: dict[int, tuple[float, float]] | None = None,
    orientation_per_frame: bool = False,
    rgb: bool = False,
    **tags: object,
) -> Path:
    """Write an Enhanced MR Image Storage file as Siemens XA and Philips do: geometry in functional groups.

    Orientation, pixel measures and the echo time are shared (orientation per frame when asked); each frame has
    its own plane position, optionally its own rescale (``rescale[i]``) and pixel spacing (``frame_spacing[i]``).
    """
    ds = new_dataset(ENHANCED_MR_IMAGE_STORAGE)
    ds.Modality = "MR"
    ds.SeriesDescription = "Sagittal T2/STIR"
    ds.InstanceNumber = 7  # the file's number: a frame reports its frame number instead
    ds.ImagePositionPatient = [99.0, 99.0, 99.0]  # not standard here, and it could not place several frames
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=list(spacing), SliceThickness=4.0)],
        MREchoSequence=[_item(EffectiveEchoTime=30.0)],
    )
    if not orientation_per_frame:
        shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(orientation))]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for index, position in enumerate(positions):
        group = _item(PlanePositionSequence=[_item(ImagePositionPatient=list(position))])
        if orientation_per_frame:
            group.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(orientation))]
        if rescale is not None:
            slope, intercept = rescale[index]
            group.PixelValueTransformationSequence = [
                _item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
            ]
        if frame_spacing and index in frame_spacing:
            group.PixelMeasuresSequence = [_item(PixelSpacing=list(frame_spacing[index]))]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    if rgb:  # colour frames (frames, rows, cols, 3), which the reader refuses
        ds.set_pixel_data(np.asarray(frames, dtype=np.uint8), "RGB", 8)
    else:
        ds.set_pixel_data(np.asarray(frames, dtype=np.uint16), "MONOCHROME2", 16)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _geometry_table(stack) -> dict[str, list]:
    """Per-slice geometry of a stack, field by field."""
    fields = ("instance_number", "position", "orientation", "pixel_spacing", "shape", "slice_thickness")
    return {name: [getattr(g, name) for g in stack.geometry] for name in fields}


@pytest.mark.parametrize("orientation_per_frame", [False, True])
def test_enhanced_multiframe_reads_like_the_same_classic_files(tmp_path: Path, orientation_per_frame: bool) -> None:
    rng = np.random.default_rng(5)
    n = 6
    frames = rng.integers(0, 4096, size=(n, 12, 10), dtype=np.uint16)
    # Frames stored out of spatial order (left-right shuffled), each with its own rescale; frame 3 has its own
    # pixel spacing, overriding the shared one.
    xs = [4.0, -8.0, 0.0, 12.0, -4.0, 8.0]
    positions = [(x, -30.0, 40.0) for x in xs]
    rescale = [(1.0 + 0.5 * k, -10.0 * k) for k in range(n)]
    frame_spacing = {3: (0.6, 0.6)}
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    write_enhanced_mr(
        enhanced / "1.dcm",
        frames,
        positions,
        rescale=rescale,
        frame_spacing=frame_spacing,
        orientation_per_frame=orientation_per_frame,
    )
    classic = tmp_path / "classic"
    classic.mkdir()
    for k in range(n):  # the same pixels and geometry as single-frame files, numbered like the frames
        write_mr(
            classic / f"{k + 1}.dcm",
            frames[k],
            instance=k + 1,
            position=positions[k],
            orientation=SAGITTAL,
            spacing=frame_spacing.get(k, (0.5, 0.5)),
            slope=rescale[k][0],
            intercept=rescale[k][1],
            EchoTime=30.0,
        )

    from_enhanced, from_classic = read_series(enhanced), read_series(classic)
    assert from_enhanced.n_files == 1 and from_classic.n_files == n
    assert len(from_enhanced.stacks) == 1 and from_enhanced.n_slices == n
    np.testing.assert_array_equal(from_enhanced.volume, from_classic.volume)
    a, b = from_enhanced.stacks[0], from_classic.stacks[0]
    assert _geometry_table(a) == _geometry_table(b)
    np.testing.assert_array_equal(a.positions_along_normal, b.positions_along_normal)
    np.testing.assert_array_equal(a.normal, b.normal)
    # Sorted along the normal (-x for sagittal): frame numbers say which frame each slice came from.
    assert a.instance_numbers == [4, 6, 1, 3, 5, 2]
    assert {g.file_name for g in a.geometry} == {"1.dcm"}
    assert from_enhanced.meta["EchoTime"] == 30.0 == from_classic.meta["EchoTime"]
    assert set(from_enhanced.meta) <= set(WHITELISTED_TAGS)


def test_multiframe_file_is_refused_by_read_slice(tmp_path: Path) -> None:
    path = write_enhanced_mr(tmp_path / "1.dcm", np.zeros((2, 4, 5)), [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)])
    with pytest.raises(DicomReadError, match="holds 2 frames") as info:
        read_slice(path)
    assert info.value.kind == "multi_frame"


def test_colour_files_are_not_grayscale(tmp_path: Path) -> None:
    rgb = write_mr(tmp_path / "2.dcm", constant(1), instance=2, position=(0.0, 0.0, 1.0))
    ds = pydicom.dcmread(rgb)
    ds.set_pixel_data(np.zeros((4, 5, 3), dtype=np.uint8), "RGB", 8)
    ds.save_as(rgb)
    with pytest.raises(DicomReadError, match="3 samples per pixel") as info:
        read_slice(rgb)
    assert info.value.kind == "not_grayscale"
    enhanced_rgb = write_enhanced_mr(
        tmp_path / "3.dcm", np.zeros((2, 4, 5, 3)), [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)], rgb=True
    )
    with pytest.raises(DicomReadError, match="3 samples per pixel") as info:
        read_slice(enhanced_rgb)
    assert info.value.kind == "not_grayscale"
    write_mr(tmp_path / "1.dcm", constant(1))
    series = read_series(tmp_path)
    assert series.n_slices == 1
    assert [(s.file_name, s.kind) for s in series.skipped] == [("2.dcm", "not_grayscale"), ("3.dcm", "not_grayscale")]


# --------------------------------------------------------------------------------------------------
# Series from a list of files, and grouping a request's files


def test_read_series_from_a_list_of_files_equals_the_folder(tmp_path: Path) -> None:
    for k in (1, 2, 10):
        write_mr(tmp_path / f"{k}.dcm", constant(k), instance=k, position=(0.0, 0.0, float(-k)))
    shuffled = [tmp_path / "10.dcm", str(tmp_path / "1.dcm"), tmp_path / "2.dcm"]
    from_list, from_folder = read_series(shuffled), read_series(tmp_path)
    np.testing.assert_array_equal(from_list.volume, from_folder.volume)
    assert _geometry_table(from_list.stacks[0]) == _geometry_table(from_folder.stacks[0])
    assert from_list.series_dir == str(tmp_path) and from_list.n_files == 3

    # Any names are read from a list (no .dcm needed), with the same skipping rules.
    other = tmp_path / "upload"
    other.mkdir()
    (tmp_path / "2.dcm").rename(other / "IM_0002")
    (other / "notes.txt").write_text("not DICOM")
    series = read_series([other / "IM_0002", other / "notes.txt"])
    assert series.n_slices == 1 and series.skipped[0].file_name == "notes.txt"
    with pytest.raises(DicomReadError, match="no DICOM files given") as info:
        read_series([])
    assert info.value.kind == "no_files"


def _write_header_only(path: Path, **tags: object) -> Path:
    """A DICOM file without an image (as a DICOMDIR or a structured report is)."""
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_group_series_files_groups_a_request_by_series(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sagittal_uid, axial_uid, enhanced_uid = generate_uid(), generate_uid(), generate_uid()
    for folder in "abcde":
        (tmp_path / folder).mkdir()
    sagittal_tags = {"SeriesInstanceUID": sagittal_uid, "SeriesDescription": "Sag T1"}
    axial_tags = {"SeriesInstanceUID": axial_uid, "SeriesDescription": "Ax T2"}
    # an enhanced file: its orientation only in its per-frame functional groups
    frames, positions = np.zeros((2, 4, 5)), [(0.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    enhanced_file = write_enhanced_mr(
        tmp_path / "e/1.dcm",
        frames,
        positions,
        orientation=AXIAL,
        orientation_per_frame=True,
        SeriesInstanceUID=enhanced_uid,
    )
    paths = [
        write_mr(
            tmp_path / "a/10.dcm", constant(1), orientation=(0, 2, 0, 0, 0, -2), **sagittal_tags
        ),  # not normalised
        write_mr(tmp_path / "a/2.dcm", constant(1), orientation=SAGITTAL, **sagittal_tags),
        write_mr(tmp_path / "b/1.dcm", constant(1), **axial_tags),  # the axial series spans two folders
        write_mr(tmp_path / "a/3.dcm", constant(1), **axial_tags),
        write_mr(tmp_path / "c/y.dcm", constant(1)),  # no SeriesInstanceUID: grouped by folder
        write_mr(tmp_path / "c/x.dcm", constant(1)),
        write_mr(tmp_path / "d/z.dcm", constant(1)),
        enhanced_file,
        _write_header_only(tmp_path / "DICOMDIR", SeriesInstanceUID=sagittal_uid),
        tmp_path / "notes.txt",
    ]
    (tmp_path / "notes.txt").write_text("not DICOM")
    order = list(paths)
    random.Random(1).shuffle(order)

    with caplog.at_level("WARNING", logger="lumbar_ray.data.dicom"):
        groups, skipped = group_series_files(order)
    assert [(s.file_name, s.kind) for s in skipped] == [("DICOMDIR", "no_pixels"), ("notes.txt", "not_dicom")]
    # Groups in the order of their first file (parent folder, then natural name); files likewise.
    assert [[str(p.relative_to(tmp_path)) for p in g.files] for g in groups] == [
        ["a/2.dcm", "a/10.dcm"],
        ["a/3.dcm", "b/1.dcm"],
        ["c/x.dcm", "c/y.dcm"],
        ["d/z.dcm"],
        ["e/1.dcm"],
    ]
    sagittal, axial, by_folder_c, by_folder_d, enhanced = groups
    assert sagittal.series_uid == sagittal_uid and axial.series_uid == axial_uid
    assert by_folder_c.series_uid == by_folder_d.series_uid == ""
    assert (sagittal.description, axial.description, by_folder_c.description) == ("Sag T1", "Ax T2", "Sagittal T2/STIR")
    assert sagittal.orientation == SAGITTAL and axial.orientation == AXIAL and enhanced.orientation == AXIAL
    assert sagittal.sop_instance_uids == tuple(pydicom.dcmread(p).SOPInstanceUID for p in sagittal.files)
    assert enhanced.series_uid == enhanced_uid and len(enhanced.sop_instance_uids) == 1
    # UIDs stay out of reprs and logs; each group reads as a series.
    text = repr(groups) + "\n".join(r.getMessage() for r in caplog.records)
    assert not any(uid in text for uid in (sagittal_uid, axial_uid, enhanced_uid, *sagittal.sop_instance_uids))
    assert any("notes.txt" in r.getMessage() for r in caplog.records)
    assert read_series(enhanced.files).n_slices == 2 and read_series(axial.files).n_slices == 2
