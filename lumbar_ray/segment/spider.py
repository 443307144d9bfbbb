"""The SPIDER layout (lumbar MRI with vertebra, disc and canal masks): written from a dataset with masks, and read.

SPIDER (van der Graaf et al., 2024) ships one ``.mha`` image per scan and a mask of the same grid::

    images/<case>_t1.mha   images/<case>_t2.mha   masks/<case>_t1.mha   masks/<case>_t2.mha

with vertebrae 1..25 and discs 201..225 counted from the bottom and the canal 100
(:func:`~lumbar_ray.segment.labels.to_spider`). :func:`write_spider` writes a dataset with masks (the synthetic
one with ``synth.masks``) that way, each image carrying its series' true geometry in patient LPS: origin the
first slice's ImagePositionPatient, axes the row and column directions of ImageOrientationPatient and the stack
normal, spacing PixelSpacing and the slice distance (no other tag is read).

:func:`read_spider` takes the orientation from the image's direction matrix, never from the array's shape:
whatever the axis order on disk, the case comes back in the layout of a sagittal cache volume: slices along the
patient's left-right axis (from left to right, the normal ``row x column`` of a standard sagittal series), rows
from head to feet, columns from anterior to posterior. :func:`spider_levels` names the project's levels of the
discs present, counting from the lowest (201 = L5/S1), as SPIDER does.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumbar_ray.constants import LEVELS
from lumbar_ray.data.dicom import Stack, read_series
from lumbar_ray.data.rsna import load_series
from lumbar_ray.segment.labels import DISC_LEVELS, to_spider
from lumbar_ray.segment.masks import read_series_labels

logger = logging.getLogger(__name__)

SPIDER_SERIES = {"Sagittal T1": "t1", "Sagittal T2/STIR": "t2"}
"""The series types written, and their SPIDER suffix."""
LAYOUT = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
"""The LPS direction of each array axis of a case: slices to the patient's right, rows to the feet, columns to the
back (a sagittal cache volume's: its normal ``row x column`` is -x for the usual IOP (0, 1, 0, 0, 0, -1))."""


@dataclass
class SpiderCase:
    """One image (and its mask) in the sagittal layout of :data:`LAYOUT`.

    Attributes:
        name: the case, e.g. ``12_t2``.
        image: float32 ``(slices, rows, cols)``.
        labels: int16 of the same shape, or None without a mask.
        spacing: millimetres between neighbours along each array axis ``(slice, row, col)``.
        direction: ``(3, 3)``, row ``a`` the LPS unit vector of array axis ``a`` (close to :data:`LAYOUT`).
        origin: LPS position (mm) of voxel ``[0, 0, 0]``.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray


def write_spider(dataset_root: str | Path, out: str | Path, split: str = "train") -> int:
    """Write a dataset's sagittal series and masks in SPIDER's layout and values.

    Args:
        dataset_root: an RSNA-format folder with masks (``segmentation/``, e.g. ``synth.masks``).
        out: the SPIDER folder (``images/`` and ``masks/`` are made in it).
        split: ``train`` or ``test``.

    Returns:
        The number of cases written (one per study and sagittal series type).

    Raises:
        FileNotFoundError: if a series has no mask.
    """
    import SimpleITK as sitk

    out = Path(out)
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    written = 0
    for name, study_id, series_id in _sagittal_cases(dataset_root, split):
        image, labels = series_images(dataset_root, split, study_id, series_id)
        spider = sitk.GetImageFromArray(to_spider(sitk.GetArrayViewFromImage(labels)))
        spider.CopyInformation(labels)
        sitk.WriteImage(image, str(out / "images" / f"{name}.mha"), useCompression=True)
        sitk.WriteImage(spider, str(out / "masks" / f"{name}.mha"), useCompression=True)
        written += 1
    logger.info("wrote %d SPIDER-layout cases of %s (%s) to %s", written, dataset_root, split, out)
    return written


def dataset_cases(dataset_root: str | Path, split: str = "train") -> Iterator[SpiderCase]:
    """The sagittal series of a dataset with masks as cases in the project's own label values (foramina and
    lesions kept, unlike SPIDER's), named like :func:`write_spider`'s files."""
    for name, study_id, series_id in _sagittal_cases(dataset_root, split):
        image, labels = series_images(dataset_root, split, study_id, series_id)
        yield _case(name, image, labels)


def _sagittal_cases(dataset_root: str | Path, split: str) -> Iterator[tuple[str, int, int]]:
    """``(case name, study_id, series_id)`` of the first series of each sagittal type of every study."""
    series = load_series(Path(dataset_root) / f"{split}_series_descriptions.csv")
    firsts = series[series["series_description"].isin(SPIDER_SERIES)].drop_duplicates(
        ["study_id", "series_description"]
    )
    for row in firsts.itertuples():
        yield f"{row.study_id}_{SPIDER_SERIES[row.series_description]}", int(row.study_id), int(row.series_id)


def series_images(dataset_root: str | Path, split: str, study_id: int, series_id: int) -> tuple[Any, Any]:
    """One series and its label volume as SimpleITK images with the series' geometry (project label values).

    Raises:
        ValueError: if the series has several stacks or its slices are unevenly spaced.
    """
    import SimpleITK as sitk

    folder = Path(dataset_root) / f"{split}_images" / str(study_id) / str(series_id)
    series = read_series(folder)
    if len(series.stacks) != 1 or not series.stacks[0].geometry_complete:
        raise ValueError(f"{folder}: a SPIDER image needs one stack with full geometry, not {len(series.stacks)}")
    stack = series.stacks[0]
    labels, numbers = read_series_labels(dataset_root, split, study_id, series_id)
    index = {int(number): i for i, number in enumerate(numbers)}
    ordered = np.stack([labels[index[geometry.instance_number]] for geometry in stack.geometry])
    image = sitk.GetImageFromArray(_compact(stack.volume))
    _set_geometry(image, stack, folder)
    mask = sitk.GetImageFromArray(ordered.astype(np.int16))
    mask.CopyInformation(image)
    return image, mask


def _set_geometry(image: Any, stack: Stack, folder: Path) -> None:
    """Origin, spacing and direction of a stack's image (ITK axes: column, row, slice)."""
    first = stack.geometry[0]
    row_dir, col_dir = np.asarray(stack.orientation[:3]), np.asarray(stack.orientation[3:])
    gaps = np.diff(stack.positions_along_normal)
    if len(gaps) and np.ptp(gaps) > 0.01 * np.median(gaps):
        raise ValueError(f"{folder}: slices are unevenly spaced ({gaps.min():.3f}..{gaps.max():.3f} mm)")
    slice_spacing = float(np.median(gaps)) if len(gaps) else float(first.slice_thickness or 1.0)
    row_spacing, col_spacing = first.pixel_spacing
    image.SetOrigin(tuple(float(v) for v in first.position))
    image.SetSpacing((float(col_spacing), float(row_spacing), slice_spacing))
    image.SetDirection(tuple(np.stack([row_dir, col_dir, np.asarray(stack.normal)], axis=1).ravel().tolist()))


def _compact(volume: np.ndarray) -> np.ndarray:
    """int16 when the (rescaled) pixels are integers that fit, as MR pixels usually are; float32 otherwise."""
    if np.array_equal(volume, np.round(volume)) and volume.min() >= -32768 and volume.max() <= 32767:
        return volume.astype(np.int16)
    return volume.astype(np.float32)


def read_spider(image_path: str | Path, mask_path: str | Path | None = None) -> SpiderCase:
    """Read one SPIDER image (and mask) into the sagittal layout, whatever its axis order on disk.

    Args:
        image_path: the ``.mha`` (or any SimpleITK-readable) image.
        mask_path: its mask on the same grid, or None.

    Raises:
        ValueError: if the mask's grid is not the image's.
    """
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    labels = None if mask_path is None else sitk.ReadImage(str(mask_path))
    if labels is not None:
        _check_same_grid(image, labels, mask_path)
    return _case(Path(image_path).name.split(".")[0], image, labels)


def _check_same_grid(image: Any, labels: Any, mask_path: str | Path) -> None:
    same = (
        image.GetSize() == labels.GetSize()
        and np.allclose(image.GetSpacing(), labels.GetSpacing(), rtol=1e-3)
        and np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-3)
        and np.allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-2)
    )
    if not same:
        raise ValueError(f"{mask_path}: the mask's grid is not its image's")


def _case(name: str, image: Any, labels: Any | None) -> SpiderCase:
    """A SimpleITK image (and mask) turned into :data:`LAYOUT` by its direction matrix."""
    import SimpleITK as sitk

    directions = np.asarray(image.GetDirection()).reshape(3, 3).T[::-1]  # rows: numpy axes (slice, row, col)
    spacing = np.asarray(image.GetSpacing())[::-1]
    order, flips = _layout_of(directions)
    array = sitk.GetArrayFromImage(image)
    origin = np.asarray(image.TransformIndexToPhysicalPoint(_corner(array.shape, order, flips)))
    signs = np.where(flips, -1.0, 1.0)[:, None]
    oriented = _apply(array, order, flips).astype(np.float32)
    mask = None if labels is None else _apply(sitk.GetArrayFromImage(labels), order, flips).astype(np.int16)
    spacing_out = tuple(float(s) for s in spacing[list(order)])
    return SpiderCase(name, oriented, mask, spacing_out, directions[list(order)] * signs, origin)


def _layout_of(directions: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Which array axis becomes each axis of :data:`LAYOUT` (the most aligned assignment), and which to flip."""
    order = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(float(directions[p[t]] @ LAYOUT[t])) for t in range(3)),
    )
    flips = np.array([float(directions[order[t]] @ LAYOUT[t]) < 0 for t in range(3)])
    return order, flips


def _apply(array: np.ndarray, order: tuple[int, ...], flips: np.ndarray) -> np.ndarray:
    moved = np.transpose(array, order)
    return np.ascontiguousarray(moved[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])


def _corner(shape: tuple[int, ...], order: tuple[int, ...], flips: np.ndarray) -> tuple[int, int, int]:
    """The ITK index (column, row, slice order) of the voxel that becomes ``[0, 0, 0]``."""
    numpy_index = [0, 0, 0]
    for t, axis in enumerate(order):
        numpy_index[axis] = shape[axis] - 1 if flips[t] else 0
    return tuple(int(i) for i in numpy_index[::-1])


def spider_levels(labels: np.ndarray) -> dict[str, int]:
    """The project's levels of the lumbar discs present in a SPIDER mask, counted from the lowest (201 = L5/S1).

    Returns:
        level name -> disc value, in :data:`LEVELS` order, for each level whose disc shows.
    """
    present = set(np.unique(labels).tolist())
    by_level = {level: value for value, level in DISC_LEVELS.items() if value in present}
    return {level: by_level[level] for level in LEVELS if level in by_level}


def case_images(case: SpiderCase, values: np.ndarray | None = None) -> tuple[Any, Any]:
    """A case as SimpleITK images with its geometry: the image (float32) and ``values`` (default: its labels)."""
    import SimpleITK as sitk

    def with_geometry(array: np.ndarray) -> Any:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in case.spacing[::-1]))
        image.SetOrigin(tuple(float(v) for v in case.origin))
        image.SetDirection(tuple(np.asarray(case.direction)[::-1].T.ravel().tolist()))
        return image

    values = case.labels if values is None else values
    return with_geometry(case.image), None if values is None else with_geometry(values)
