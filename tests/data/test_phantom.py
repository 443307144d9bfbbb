"""The phantom's label maps: painted like the tissue map, pixel for pixel, with the documented values."""

from __future__ import annotations

import numpy as np
import pytest

from lumbar_ray.config import SynthConfig
from lumbar_ray.data import phantom, synthetic
from lumbar_ray.segment import labels as lab

# The semantic class each tissue must carry in the label map (lumbar_ray.segment.labels.SEMANTIC_CLASSES).
EXPECTED_CLASS = {phantom.AIR: 0, phantom.SOFT: 0, phantom.POSTERIOR: 0, phantom.BONE: 1, phantom.DISC: 2,
                  phantom.CSF: 3, phantom.FAT: 4, phantom.LESION: 5}  # fmt: skip


def _studies(preset: str, count: int = 3) -> list[synthetic.StudySpec]:
    cfg = SynthConfig(preset=preset, image_sizes=[96], missing_series_rate=0.0)
    studies = []
    for index in range(count):
        rng = np.random.default_rng([11, index])
        studies.append(synthetic.plan_study(100 + index, [10 * index + j for j in range(4)], rng, cfg))
    return studies


@pytest.mark.parametrize("preset", ["easy", "hard"])
def test_labels_agree_with_the_tissue_map(preset):
    """Every bone pixel is a vertebra or the sacrum, every disc pixel a disc, CSF the canal, fat a foramen, lesion
    tissue a narrowed structure, and nothing else is labelled: on every slice of every series."""
    lookup = np.array([EXPECTED_CLASS[t] for t in range(len(EXPECTED_CLASS))], dtype=np.uint8)
    for study in _studies(preset):
        for series in study.series:
            for spec in series.slices:
                tissue, labels = phantom.render_tissue_and_labels(study.primitives, spec, series)
                assert labels.dtype == np.int16 and labels.shape == (series.rows, series.cols)
                np.testing.assert_array_equal(tissue, phantom.render_slice(study.primitives, spec, series))
                np.testing.assert_array_equal(labels, phantom.render_labels(study.primitives, spec, series))
                np.testing.assert_array_equal(lab.semantic(labels), lookup[tissue])
                assert set(np.unique(labels).tolist()) <= set(lab.LABEL_TABLE)


@pytest.mark.parametrize("preset", ["easy", "hard"])
def test_every_structure_shows_on_its_series_and_left_is_plus_x(preset):
    """The five discs and the canal on Sagittal T2/STIR, the ten foramina on Sagittal T1; the left foramina
    (301..305) on slices of larger x (patient left in LPS) than the right ones (311..315)."""
    for study in _studies(preset):
        by_type = {series.description: series for series in study.series}
        t2 = _values(study, by_type["Sagittal T2/STIR"])
        assert {lab.CANAL, *(lab.disc_value(k) for k in range(5))} <= _structures(t2)
        assert {lab.vertebra_value(k) for k in range(5)} | {lab.SACRUM} <= _structures(t2)
        t1 = _values(study, by_type["Sagittal T1"])
        foramina = {lab.foramen_value(k, side) for k in range(5) for side in ("left", "right")}
        assert foramina <= _structures(t1)
        left = [x for value, xs in t1.items() if 301 <= value % lab.LESION_OFFSET <= 305 for x in xs]
        right = [x for value, xs in t1.items() if 311 <= value % lab.LESION_OFFSET <= 315 for x in xs]
        assert min(left) > max(right)


def _structures(found: dict[int, list[float]]) -> set[int]:
    """The structures whose footprint shows (a severe lesion can fill a whole foramen: 1301 without 301)."""
    return {value % lab.LESION_OFFSET for value in found}


def _values(study: synthetic.StudySpec, series: phantom.SeriesSpec) -> dict[int, list[float]]:
    """Label value -> the patient x of every slice of ``series`` it shows on."""
    found: dict[int, list[float]] = {}
    for spec in series.slices:
        for value in np.unique(phantom.render_labels(study.primitives, spec, series)).tolist():
            found.setdefault(value, []).append(float(spec.position[0]))
    return found


def test_the_hard_preset_labels_its_thoracic_levels():
    values = set()
    for study in _studies("hard"):
        series = next(s for s in study.series if s.description == "Sagittal T2/STIR")
        values |= set(_values(study, series))
    assert {lab.disc_value(5), lab.disc_value(6)} & values, "T12/L1 or T11/T12 shows in some field of view"


def test_a_lesion_keeps_the_structure_it_narrows():
    """A primitive with ``replaces`` marks structure + 1000 where it paints, and leaves unlabelled pixels alone."""
    series = phantom.SeriesSpec(1, "Axial T2", 40, 40, (1.0, 1.0), 1.0)
    spec = phantom.SliceSpec(np.array([-20.0, -20.0, 0.0]), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 1)  # axial, z = 0
    parts = [
        phantom.Primitive((0.0, 0.0, 0.0), (30.0, 30.0, 0.0), phantom.CSF, half_height=1e9),  # CSF with no label
        phantom.Primitive((0.0, 0.0, 0.0), (10.0, 10.0, 0.0), phantom.CSF, half_height=1e9, label=lab.CANAL),
        phantom.Primitive((0.0, 0.0, 0.0), (15.0, 15.0, 15.0), phantom.LESION, replaces=(phantom.CSF,), label=7),
    ]
    tissue, labels = phantom.render_tissue_and_labels(parts, spec, series)
    inner = np.hypot(*np.mgrid[-20:20, -20:20] + 0.0) < 9.5  # the canal (radius 10), centred
    assert (labels[inner] == lab.CANAL + lab.LESION_OFFSET).all() and (tissue[inner] == phantom.LESION).all()
    assert set(np.unique(labels).tolist()) == {0, lab.CANAL + lab.LESION_OFFSET}
    assert (tissue == phantom.LESION).sum() > inner.sum(), "the lesion covers unlabelled CSF too, which stays 0"
