"""A synthetic RSNA-format dataset: DICOM phantoms of a lumbar spine with planted, learnable severities.

Every study is one analytic 3D phantom in patient coordinates (DICOM LPS, millimetres): six vertebral bodies
(L1-S1) with five discs between them, the spinal canal (CSF), posterior elements, and a fat-filled neural
foramen on each side of each level, inside a block of soft tissue. Each of the 25 targets is planted as a
local lesion whose size grows with its severity, where the real task sees it:

- spinal canal stenosis: a disc bulge filling the front of the canal at the level's disc; read on the mid-line
  Sagittal T2/STIR slice (and visible on the axial slices of the level);
- neural foraminal narrowing: tissue replacing the fat of the left or right foramen; read on the lateral
  Sagittal T1 slices of that side (patient left is +x in LPS, whatever the slice order);
- subarticular stenosis: an intrusion into the left or right lateral recess of the canal, on the Axial T2
  slice through the level's disc.

Every series is rendered by sampling that same phantom on its own slice planes (from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing), so sagittal and axial series agree in patient space exactly and the
coordinates file points at the lesions. Lesions only replace CSF or fat, so they narrow the canal or foramen
rather than drawing blobs elsewhere.

Severities follow the real per-condition-and-level class frequencies (an ordinal model with a per-study
degeneration factor, so targets of a study are correlated like real ones). Realistic quirks appear at
configurable rates: a missing series type, a second Axial T2 series, axial series made of tilted per-level
blocks (several orientations in one series), instance numbers not in spatial order, empty label cells. The
output is a deterministic function of the seed: same seed, same bytes.

With ``synth.masks``, the structure each pixel comes from is written too: one label volume per sagittal series
(values of :mod:`lumbar_ray.segment.labels`: vertebrae, discs per level, canal, foramina per level and side,
lesions as structure + 1000) under ``segmentation/``, rendered without a random number, so the DICOM files are
the same bytes with masks or without.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian

from lumbar_ray.config import SynthConfig
from lumbar_ray.constants import (
    CONDITIONS,
    IGNORE_INDEX,
    LEVELS,
    SEVERITIES,
    SUBMISSION_COLUMNS,
    TARGETS,
    row_id,
)
from lumbar_ray.data.grading import (
    HARD_READERS,
    MANIFEST_NAME,
    REAL_CLASS_FREQUENCIES,
    SEVERITY_NAME,
    bayes_floor,
    oracle_score,
)
from lumbar_ray.data.phantom import (
    BONE,
    CSF,
    DISC,
    FAT,
    LESION,
    POSTERIOR,
    SERIES_SEQUENCE,
    SOFT,
    Primitive,
    SeriesSpec,
    SliceSpec,
    label_coordinates,
    render_slice,
    render_tissue_and_labels,
    sample_look,
    tissue_to_pixels,
)
from lumbar_ray.data.spine import SpineCurve, annotate, axial_series, plan_hard_study
from lumbar_ray.paths import atomic_path
from lumbar_ray.segment.labels import (
    CANAL,
    LABELS_JSON,
    MASKS_DIR,
    SACRUM,
    disc_value,
    foramen_value,
    label_table_json,
    mask_file,
    vertebra_value,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
HARD_VERSION = 1  # the hard preset's own generator (lumbar_ray.data.spine); a change writes new data
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# Lesion size as a fraction of the structure it narrows: mean per severity, jittered per target so that the
# classes overlap a little, as real gradings do.
SEVERITY_FRACTION = (0.12, 0.55, 0.92)
SEVERITY_JITTER = 0.07
SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class Anatomy:
    """Where the structures of one study's spine are, in patient millimetres."""

    x0: float
    body_y: float
    disc_z: np.ndarray
    pitch: float
    canal_y: float
    canal_radii: tuple[float, float]
    foramen_offset: float
    foramen_y: float

    @property
    def spinal_point(self) -> np.ndarray:
        """Label points of spinal canal stenosis (canal centre at each disc), shape (5, 3)."""
        return np.stack([[self.x0, self.canal_y, z] for z in self.disc_z])

    def foramen_point(self, side: int) -> np.ndarray:
        """Label points of the foramina of one side (+1 = patient left), shape (5, 3)."""
        return np.stack([[self.x0 + side * self.foramen_offset, self.foramen_y, z] for z in self.disc_z])

    def subarticular_point(self, side: int) -> np.ndarray:
        """Label points of the lateral recesses of one side (+1 = patient left), shape (5, 3)."""
        y = self.canal_y - 0.45 * self.canal_radii[1]
        return np.stack([[self.x0 + side * 0.65 * self.canal_radii[0], y, z] for z in self.disc_z])


@dataclass
class StudySpec:
    """Everything drawn for one study: labels, anatomy, series and the label coordinates."""

    study_id: int
    labels: np.ndarray
    anatomy: Anatomy | SpineCurve
    primitives: list[Primitive]
    series: list[SeriesSpec]
    coordinates: list[dict]
    severity: np.ndarray | None = None  # the hard preset's latent severities (severity units), TARGETS order


def sample_severities(rng: np.random.Generator, correlation: float = 0.5) -> np.ndarray:
    """Draw the 25 severities of one study (TARGETS order) with the real marginal frequencies.

    An ordinal probit model: a shared per-study degeneration factor plus independent noise, thresholded at the
    quantiles of each target's real class frequencies, so marginals match exactly and targets co-vary.
    """
    study_factor = rng.standard_normal()
    noise = rng.standard_normal(len(TARGETS))
    latent = correlation * study_factor + np.sqrt(1 - correlation**2) * noise
    labels = np.empty(len(TARGETS), dtype=np.int64)
    for index, target in enumerate(TARGETS):
        condition, level = target[:-6], target[-5:]
        p_normal, p_moderate, _ = REAL_CLASS_FREQUENCIES[condition][LEVELS.index(level)]
        low = NormalDist().inv_cdf(p_normal)
        high = NormalDist().inv_cdf(min(p_normal + p_moderate, 1 - 1e-9))
        labels[index] = 0 if latent[index] < low else (1 if latent[index] < high else 2)
    return labels


def _lesion_fraction(rng: np.random.Generator, severity: int, strength: float) -> float:
    mean = SEVERITY_FRACTION[severity] * strength
    return float(np.clip(mean + SEVERITY_JITTER * rng.standard_normal(), 0.0, 1.0))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one spine: position in the scanner, vertebral pitch, canal size."""
    pitch = rng.uniform(31.0, 37.0)
    centre_z = rng.uniform(-15.0, 15.0)
    body_y = rng.uniform(-12.0, 12.0)
    canal_radii = (rng.uniform(9.0, 11.0), rng.uniform(6.0, 7.5))
    return Anatomy(
        x0=rng.uniform(-4.0, 4.0),
        body_y=body_y,
        disc_z=centre_z + pitch * (2 - np.arange(len(LEVELS))),
        pitch=pitch,
        canal_y=body_y + 16.0 + canal_radii[1] + 1.0,
        canal_radii=canal_radii,
        foramen_offset=rng.uniform(15.0, 17.0),
        foramen_y=body_y + 19.0,
    )


def build_primitives(anatomy: Anatomy, labels: np.ndarray, rng: np.random.Generator, strength: float) -> list:
    """The phantom of one study, painted in list order (later primitives cover earlier ones)."""
    a = anatomy
    disc_height = 0.26 * a.pitch
    parts = [
        Primitive((a.x0, a.body_y + 15.0, 0.0), (95.0, 75.0, 0.0), SOFT, half_height=1e9),
        Primitive((a.x0, a.canal_y + 11.0, 0.0), (15.0, 12.0, 0.0), POSTERIOR, half_height=1e9),
    ]
    body_z = np.concatenate([a.disc_z + a.pitch / 2, a.disc_z[-1:] - a.pitch / 2])  # L1..L5, then S1
    last = len(LEVELS) - 1
    body_labels = [vertebra_value(last - k) for k in range(len(LEVELS))] + [SACRUM]
    for z, label in zip(body_z, body_labels, strict=True):
        half = (a.pitch - disc_height) / 2
        parts.append(Primitive((a.x0, a.body_y, z), (21.0, 15.0, 0.0), BONE, half_height=half, label=label))
    for k, z in enumerate(a.disc_z):
        half = disc_height / 2
        parts.append(
            Primitive((a.x0, a.body_y, z), (21.0, 15.0, 0.0), DISC, half_height=half, label=disc_value(last - k))
        )
    parts.append(Primitive((a.x0, a.canal_y, 0.0), (*a.canal_radii, 0.0), CSF, half_height=1e9, label=CANAL))
    for side in (1, -1):
        for k, point in enumerate(a.foramen_point(side)):
            parts.append(Primitive(tuple(point), (5.0, 5.5, 6.5), FAT, label=foramen_value(last - k, side)))
    parts.extend(_lesions(a, labels, rng, strength))
    return parts


def _lesions(a: Anatomy, labels: np.ndarray, rng: np.random.Generator, strength: float) -> list[Primitive]:
    """One lesion per target, its size a jittered fraction of the structure it narrows."""
    lesions = []
    front_y = a.canal_y - a.canal_radii[1]
    for k, z in enumerate(a.disc_z):
        grade = _lesion_fraction(rng, labels[k], strength)
        if grade > 0:  # disc bulge from the front of the canal, filling `grade` of its depth
            radii = (0.5 * a.canal_radii[0], 2 * grade * a.canal_radii[1], 5.0)
            lesions.append(Primitive((a.x0, front_y, z), radii, LESION, replaces=(CSF,)))
    for side, condition in ((1, "left_neural_foraminal_narrowing"), (-1, "right_neural_foraminal_narrowing")):
        offset = CONDITIONS.index(condition) * len(LEVELS)
        for k, point in enumerate(a.foramen_point(side)):
            grade = _lesion_fraction(rng, labels[offset + k], strength)
            if grade > 0:
                lesions.append(
                    Primitive(tuple(point), (5.5 * grade, 6.0 * grade, 7.0 * grade), LESION, replaces=(FAT,))
                )
    for side, condition in ((1, "left_subarticular_stenosis"), (-1, "right_subarticular_stenosis")):
        offset = CONDITIONS.index(condition) * len(LEVELS)
        for k, point in enumerate(a.subarticular_point(side)):
            grade = _lesion_fraction(rng, labels[offset + k], strength)
            if grade > 0:
                radius = 0.5 * a.canal_radii[0] * grade
                lesions.append(Primitive(tuple(point), (radius, radius, 4.0), LESION, replaces=(CSF,)))
    return lesions


def _sagittal_series(rng, anatomy: Anatomy, series_id: int, description: str, size: int) -> SeriesSpec:
    n_slices = int(rng.integers(15, 19))
    spacing_x = rng.uniform(3.3, 4.0)
    fov = rng.uniform(210.0, 240.0)
    rows = size
    cols = size if rng.random() > 0.2 else int(size * 0.875)  # some sagittal grids are not square
    series = SeriesSpec(series_id, description, rows, cols, (fov / rows, fov / rows), spacing_x * 0.9)
    centre = np.array([anatomy.x0 + rng.uniform(-2, 2), anatomy.body_y + 14.0, anatomy.disc_z[2]])
    row_spacing, col_spacing = series.spacing
    top_left = centre + np.array([0.0, -(cols - 1) / 2 * col_spacing, (rows - 1) / 2 * row_spacing])
    xs = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing_x
    for index, x in enumerate(xs[::-1]):  # instance 1 on the patient's left, as many scanners number them
        position = top_left + np.array([x, 0.0, 0.0])
        series.slices.append(SliceSpec(position, SAGITTAL_ORIENTATION, index + 1))
    return series


def _axial_orientation(tilt_degrees: float) -> tuple[float, ...]:
    tilt = np.deg2rad(tilt_degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)))


def _axial_series(rng, anatomy: Anatomy, series_id: int, size: int, levels: range, tilted: bool) -> SeriesSpec:
    """Axial T2 blocks of slices through the discs of ``levels``; tilted blocks follow each disc's angle."""
    fov = rng.uniform(150.0, 180.0)
    series = SeriesSpec(series_id, "Axial T2", size, size, (fov / size, fov / size), 4.0)
    per_level = int(rng.integers(3, 5))
    spacing = rng.uniform(3.6, 4.4)
    instance = 1
    for k in levels:
        orientation = _axial_orientation(rng.uniform(-12, 12) if tilted else 0.0)
        row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        normal = np.cross(row_dir, col_dir)
        # The block's middle plane passes through the level's subarticular points (both sides lie on it).
        anchor = anatomy.subarticular_point(1)[k] * np.array([0.0, 1.0, 1.0]) + np.array([anatomy.x0, 0.0, 0.0])
        centre = anchor + (anatomy.body_y + 14.0 - anchor[1]) * col_dir  # in-plane shift: still on the plane
        top_left = centre - (size - 1) / 2 * series.spacing[1] * row_dir - (size - 1) / 2 * series.spacing[0] * col_dir
        offsets = (np.arange(per_level) - (per_level - 1) // 2) * spacing
        for offset in offsets[::-1]:  # cranial slice first, as axial stacks are usually acquired
            series.slices.append(SliceSpec(top_left + offset * normal, orientation, instance))
            instance += 1
    return series


def _blank_cells(rng: np.random.Generator, labels: np.ndarray, rate: float) -> np.ndarray:
    """Empty some label cells, mostly subarticular L1/L2 and L2/L3 as in the real data."""
    weights = np.full(len(TARGETS), 0.5)
    for condition in ("left_subarticular_stenosis", "right_subarticular_stenosis"):
        for level in ("l1_l2", "l2_l3"):
            weights[TARGETS.index(f"{condition}_{level}")] = 6.0
    probability = np.clip(rate * weights / weights.mean(), 0, 1)
    labels = labels.copy()
    labels[rng.random(len(TARGETS)) < probability] = -1
    return labels


def plan_study(study_id: int, series_ids: list[int], rng: np.random.Generator, cfg: SynthConfig) -> StudySpec:
    """Draw one study: severities, anatomy, phantom, series geometry (with quirks) and label coordinates."""
    if cfg.preset == "hard":
        return _plan_hard_study(study_id, series_ids, rng, cfg)
    severities = sample_severities(rng)
    anatomy = sample_anatomy(rng)
    primitives = build_primitives(anatomy, severities, rng, cfg.signal_strength)
    size = int(rng.choice(cfg.image_sizes))
    series = [
        _sagittal_series(rng, anatomy, series_ids[0], "Sagittal T1", size),
        _sagittal_series(rng, anatomy, series_ids[1], "Sagittal T2/STIR", size),
        _axial_series(rng, anatomy, series_ids[2], size, range(len(LEVELS)), rng.random() < cfg.tilted_axial_rate),
    ]
    series = _add_quirks(
        rng, series, cfg, lambda: _axial_series(rng, anatomy, series_ids[3], size, range(2, len(LEVELS)), False)
    )
    labels = _blank_cells(rng, severities, cfg.empty_label_rate)
    coordinates = label_coordinates(study_id, labels, anatomy, series)
    return StudySpec(study_id, labels, anatomy, primitives, series, coordinates)


def _plan_hard_study(study_id: int, series_ids: list[int], rng: np.random.Generator, cfg: SynthConfig) -> StudySpec:
    """The hard preset's study (:mod:`lumbar_ray.data.spine`), with the same quirks as the easy one."""
    size = int(rng.choice(cfg.image_sizes))
    hard = plan_hard_study(rng, series_ids, size, cfg.signal_strength, cfg.noise)

    def extra_axial() -> SeriesSpec:
        extra = axial_series(rng, hard.spine, series_ids[3], size, range(2, len(LEVELS)))
        extra.look = sample_look(rng, extra.description, cfg.noise)
        return extra

    series = _add_quirks(rng, hard.series, cfg, extra_axial)
    labels = _blank_cells(rng, hard.labels, cfg.empty_label_rate)
    coordinates = annotate(study_id, labels, hard.spine, series, rng)
    return StudySpec(study_id, labels, hard.spine, hard.primitives, series, coordinates, severity=hard.severity)


def _add_quirks(
    rng: np.random.Generator, series: list[SeriesSpec], cfg: SynthConfig, extra_axial: Callable[[], SeriesSpec]
) -> list[SeriesSpec]:
    """A repeated axial acquisition, a missing series type, instance numbers out of spatial order (at cfg's rates)."""
    if rng.random() < cfg.extra_axial_rate:  # a repeat acquisition over the lower levels
        series.append(extra_axial())
    if rng.random() < cfg.missing_series_rate:
        series.pop(int(rng.integers(0, 3)))
    for spec in series:
        if rng.random() < cfg.shuffled_instances_rate:
            numbers = rng.permutation([s.instance_number for s in spec.slices])
            for slice_spec, number in zip(spec.slices, numbers, strict=True):
                slice_spec.instance_number = int(number)
    return series


def _uid(*parts: int) -> str:
    return PYDICOM_ROOT_UID + ".".join(str(p) for p in parts)


def _series_dataset(study: StudySpec, series: SeriesSpec, study_index: int) -> Dataset:
    """The tags shared by every slice of a series (identifying tags hold fakes, to test the reader)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.Modality = "MR"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = f"SYN{study.study_id}"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240101"
    ds.StudyInstanceUID = _uid(study.study_id)
    ds.SeriesInstanceUID = _uid(study.study_id, series.series_id)
    ds.FrameOfReferenceUID = _uid(study.study_id, 0)
    ds.SeriesNumber = study_index
    ds.SeriesDescription = series.description
    ds.MagneticFieldStrength = 1.5
    ds.RepetitionTime = 600.0 if SERIES_SEQUENCE[series.description] == "T1" else 3500.0
    ds.EchoTime = 10.0 if SERIES_SEQUENCE[series.description] == "T1" else 100.0
    ds.SliceThickness = round(series.thickness, 4)
    ds.PixelSpacing = [round(series.spacing[0], 6), round(series.spacing[1], 6)]
    ds.Rows, ds.Columns = series.rows, series.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    return ds


def write_study(root: Path, split: str, study: StudySpec, rng: np.random.Generator, cfg: SynthConfig) -> int:
    """Render and write every slice of a study under ``root/<split>_images``; returns the number of DICOM files.

    With ``cfg.masks``, each sagittal series' label volume goes to :func:`~lumbar_ray.segment.labels.mask_file` too.
    """
    written = 0
    for number, series in enumerate(study.series, start=1):
        folder = root / f"{split}_images" / str(study.study_id) / str(series.series_id)
        folder.mkdir(parents=True, exist_ok=True)
        ds = _series_dataset(study, series, number)
        gain = rng.uniform(1800.0, 3600.0) if series.look is None else None
        sequence = SERIES_SEQUENCE[series.description]
        with_masks = cfg.masks and series.description.startswith("Sagittal")
        labels = []
        for spec in series.slices:
            if with_masks:  # the same painting as render_slice's, and no random numbers: the pixels do not change
                tissue, slice_labels = render_tissue_and_labels(study.primitives, spec, series)
                labels.append(slice_labels)
            else:
                tissue = render_slice(study.primitives, spec, series)
            if series.look is None:
                pixels = tissue_to_pixels(tissue, sequence, rng, cfg.noise, gain)
            else:
                pixels = series.look.pixels(tissue, rng)
            uid = _uid(study.study_id, series.series_id, spec.instance_number)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = spec.instance_number
            ds.ImagePositionPatient = [round(float(v), 4) for v in spec.position]
            ds.ImageOrientationPatient = [round(float(v), 6) for v in spec.orientation]
            ds.PixelData = pixels.tobytes()
            dcmwrite(folder / f"{spec.instance_number}.dcm", ds, enforce_file_format=True)
            written += 1
        if with_masks:
            _write_masks(mask_file(root, split, study.study_id, series.series_id), series, labels)
    return written


def _write_masks(path: Path, series: SeriesSpec, labels: list[np.ndarray]) -> None:
    """One series' label volume and its slices' instance numbers, written atomically (an ``.npz``)."""
    numbers = np.array([spec.instance_number for spec in series.slices], dtype=np.int64)
    with atomic_path(path) as temporary, temporary.open("wb") as handle:  # a handle: numpy adds no suffix
        np.savez_compressed(handle, labels=np.stack(labels).astype(np.int16), instance_number=numbers)


def _draw_ids(rng: np.random.Generator, count: int) -> list[int]:
    """Unique RSNA-like ids (up to 10 digits)."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.update(int(v) for v in rng.integers(1_000_000, 4_290_000_000, size=count - len(ids)))
    return sorted(ids, key=lambda v: rng.random())


def _severity_frame(studies: list[StudySpec]) -> pd.DataFrame:
    table = {"study_id": [s.study_id for s in studies]}
    for index, target in enumerate(TARGETS):
        table[target] = [SEVERITIES[s.labels[index]] if s.labels[index] >= 0 else None for s in studies]
    return pd.DataFrame(table)


def _series_frame(studies: list[StudySpec]) -> pd.DataFrame:
    rows = [(s.study_id, spec.series_id, spec.description) for s in studies for spec in s.series]
    return pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"])


def _sample_submission(studies: list[StudySpec]) -> pd.DataFrame:
    ids = [row_id(s.study_id, target[:-6], target[-5:]) for s in studies for target in TARGETS]
    frame = pd.DataFrame({"row_id": ids})
    for column in SUBMISSION_COLUMNS:
        frame[column] = 1.0 / 3.0
    return frame


@dataclass
class SynthResult:
    """What :func:`write_dataset` produced.

    ``bayes_floor`` (hard preset only, else None) is the official score of a perfect model, by term, over the real
    label distribution; ``oracle_train`` is that perfect model's score on this dataset's own training labels.
    """

    root: Path
    train_studies: int
    test_studies: int
    files: int
    reused: bool
    bayes_floor: dict[str, float] | None = None
    oracle_train: dict[str, float] | None = None


def _manifest(cfg: SynthConfig) -> dict:
    """What makes a dataset: the generator, its settings and, for the hard preset, the readers' model."""
    config = cfg.model_dump(mode="json")
    if not cfg.masks:  # added with the masks: at its default, folders written before stay reusable
        del config["masks"]
    if cfg.preset == "easy":  # added with the hard preset: at its default, folders written before stay reusable
        del config["preset"]
        return {"generator_version": GENERATOR_VERSION, "config": config}
    return {"generator_version": GENERATOR_VERSION, "hard_version": HARD_VERSION, "config": config,
            "readers": asdict(HARD_READERS)}  # fmt: skip


def _reusable(manifest: dict | None, cfg: SynthConfig) -> bool:
    """Whether a folder's manifest serves ``cfg``: the same one, or ``cfg`` without masks and a folder with them
    (the DICOM files and tables are the same bytes either way)."""
    if manifest is None:
        return False
    return manifest == _manifest(cfg) or (
        not cfg.masks and manifest == _manifest(cfg.model_copy(update={"masks": True}))
    )


def write_dataset(out: str | Path, cfg: SynthConfig | None = None, overwrite: bool = False) -> SynthResult:
    """Write a complete RSNA-format folder of synthetic studies.

    The manifest ``synthetic.json`` is written last, so a folder holding it is complete. A folder already
    holding the same manifest is reused as is; anything else in the way is an error unless ``overwrite``.

    Args:
        out: destination folder.
        cfg: generator settings (defaults: :class:`SynthConfig`).
        overwrite: delete an existing different or incomplete folder first.

    Raises:
        FileExistsError: if ``out`` holds something else and ``overwrite`` is False.
    """
    cfg = cfg or SynthConfig()
    root = Path(out)
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file() and _reusable(json.loads(manifest_path.read_text()).get("manifest"), cfg):
        summary = json.loads(manifest_path.read_text())
        logger.info("synthetic dataset at %s is complete for this config; reusing it", root)
        return SynthResult(
            root,
            cfg.train_studies,
            cfg.test_studies,
            summary["files"],
            reused=True,
            bayes_floor=summary.get("bayes_floor"),
            oracle_train=summary.get("oracle_train"),
        )
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not a synthetic dataset of this config; pass overwrite")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    total = cfg.train_studies + cfg.test_studies
    # The hard preset draws other ids: a cache or workdir shared with the easy dataset never confuses their series.
    master = np.random.default_rng(cfg.seed if cfg.preset == "easy" else [cfg.seed, 1])
    study_ids = _draw_ids(master, total)
    series_ids = _draw_ids(master, 4 * total)
    studies = {"train": [], "test": []}
    files = 0
    for index in _progress(range(total), "synthesising studies"):
        rng = np.random.default_rng([cfg.seed, index])
        study = plan_study(study_ids[index], series_ids[4 * index : 4 * index + 4], rng, cfg)
        split = "train" if index < cfg.train_studies else "test"
        files += write_study(root, split, study, rng, cfg)
        studies[split].append(study)
    _write_tables(root, studies["train"], studies["test"])
    if cfg.masks:
        (root / MASKS_DIR / LABELS_JSON).write_text(json.dumps(label_table_json(), indent=2))
    floors = _floors(root, studies["train"]) if cfg.preset == "hard" else {}
    manifest_path.write_text(json.dumps({"manifest": _manifest(cfg), "files": files, **floors}, indent=2))
    logger.info(
        "wrote %d train + %d test synthetic studies (%d DICOM files) to %s",
        cfg.train_studies,
        cfg.test_studies,
        files,
        root,
    )
    return SynthResult(root, cfg.train_studies, cfg.test_studies, files, reused=False, **floors)


def _floors(root: Path, train: list[StudySpec]) -> dict[str, dict[str, float]]:
    """The hard preset's Bayes floor, a perfect model's score on these labels, and the latents (a CSV)."""
    severity = np.stack([study.severity for study in train])
    frame = pd.DataFrame(severity, columns=list(TARGETS))
    frame.insert(0, "study_id", [study.study_id for study in train])
    frame.to_csv(root / SEVERITY_NAME, index=False, float_format="%.6f")
    labels = np.stack([study.labels for study in train])
    floor = bayes_floor(HARD_READERS)
    oracle = oracle_score(np.where(labels < 0, IGNORE_INDEX, labels), severity, HARD_READERS)
    logger.info("hard preset: Bayes floor %s; a perfect model on these training labels: %s", floor, oracle)
    return {"bayes_floor": floor.to_dict(), "oracle_train": oracle.to_dict()}


def _write_tables(root: Path, train: list[StudySpec], test: list[StudySpec]) -> None:
    _severity_frame(train).to_csv(root / "train.csv", index=False)
    _series_frame(train).to_csv(root / "train_series_descriptions.csv", index=False)
    coordinates = [row for study in train for row in study.coordinates]
    columns = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    pd.DataFrame(coordinates, columns=columns).to_csv(root / "train_label_coordinates.csv", index=False)
    _series_frame(test).to_csv(root / "test_series_descriptions.csv", index=False)
    _sample_submission(test).to_csv(root / "sample_submission.csv", index=False)


def _progress(iterable, description: str):
    """tqdm when available (it is a dependency); a plain iterator otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, unit="study", leave=False)
