"""A segmentation's post-processing into the localiser's detections: the canal along each disc's own axis, the
foramina with their levels, points maps; and ground-truth masks through it reproduce the labelled points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.constants import TARGETS, target_index
from lumbar_ray.localize.evaluate import point_errors
from lumbar_ray.localize.levels import DETECTION_COLUMNS, LOCATE_COLUMNS, detector_targets
from lumbar_ray.localize.study import SAG_T1, SAG_T2, LevelDetector, localise_study
from lumbar_ray.segment.labels import semantic
from lumbar_ray.segment.masks import point_maps
from lumbar_ray.segment.post import (
    CANAL,
    DISC,
    FORAMEN,
    LESION,
    MaskLocator,
    Segmentation,
    canal_run,
    detections_from_masks,
    detections_from_points,
    discs_bottom_up,
    known_segmentations,
    lesion_split,
    locate_from_masks,
)
from tests.segment.studies import masked_studies

VERTEBRA = 1
SIZE = 96
SAGITTAL = [index for index, name in enumerate(TARGETS) if "subarticular" not in name]


# ----------------------------------------------------------------------------------------------- a drawn phantom


def _rotated(rows, cols, centre, angle_deg):
    """Coordinates of the grid in a frame turned by ``angle_deg`` about ``centre`` (x = column, y = row)."""
    angle = np.deg2rad(angle_deg)
    dx, dy = cols - centre[0], rows - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return along, across


def _spine_slice(angle_deg=0.0, bulge=0.0, canal_half=7.0, disc_rows=(20, 36, 52, 68, 84)):
    """One sagittal slice: discs (half-length 14, half-height 2.5) turned by ``angle_deg``, each with the canal
    behind it along its own axis (centred 23 px from the disc's centre, an ellipse of AP half-width ``canal_half``:
    7 on the mid-line, less beside it), a bulge filling ``bulge`` of the canal's depth from the front. Returns the
    slice and each disc's canal centre (x, y)."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = np.zeros((SIZE, SIZE), np.uint8)
    centres = []
    for row in disc_rows:
        disc_centre = (30.0, float(row))
        along, across = _rotated(rows, cols, disc_centre, angle_deg)
        out[(np.abs(along) <= 14) & (np.abs(across) <= 2.5)] = DISC
        offset = 23.0
        centre = (disc_centre[0] + offset * np.cos(np.deg2rad(angle_deg)),
                  disc_centre[1] + offset * np.sin(np.deg2rad(angle_deg)))  # fmt: skip
        c_along, c_across = _rotated(rows, cols, centre, angle_deg)
        canal = (c_along / canal_half) ** 2 + (c_across / 6.0) ** 2 <= 1
        out[canal] = CANAL
        if bulge:
            out[canal & (c_along <= -canal_half + 2 * bulge * canal_half) & (np.abs(c_across) <= 3)] = LESION
        centres.append(centre)
    return out, np.array(centres)


def _volume(slices: list[np.ndarray]) -> np.ndarray:
    return np.stack(slices)


@pytest.mark.parametrize("angle", [0.0, 15.0, -12.0])
@pytest.mark.parametrize("bulge", [0.0, 0.8])
def test_the_canal_point_is_the_middle_of_the_discs_axis_through_the_canal_and_its_bulge(angle, bulge):
    image, centres = _spine_slice(angle, bulge)
    footprint, _ = lesion_split(image[None])
    for row, centre in zip((20, 36, 52, 68, 84), centres, strict=True):
        disc = np.zeros_like(image, bool)
        disc[max(row - 8, 0) : row + 9] = image[max(row - 8, 0) : row + 9] == DISC
        run = canal_run(footprint[0], disc)
        assert run is not None
        assert np.hypot(run.x - centre[0], run.y - centre[1]) <= 0.6
        assert run.length_mm == pytest.approx(14.0, abs=1.5)  # the canal's whole depth, the bulge included


def test_a_tilted_spine_keeps_its_levels_from_the_bottom_and_the_slab_centre_on_the_widest_canal():
    middle, centres = _spine_slice(12.0, 0.6)
    side, _ = _spine_slice(12.0, 0.6, canal_half=4.0)  # neighbouring slices: a narrower canal
    edge = np.where(np.isin(middle, [CANAL, LESION]), 0, middle).astype(np.uint8)  # beyond the canal: discs only
    volume = _volume([edge, side, middle, side, edge])
    located = locate_from_masks(volume, SAG_T2)
    assert list(located.columns) == list(LOCATE_COLUMNS)
    assert located["target"].tolist() == detector_targets(SAG_T2) and not located["filled"].any()
    assert (located["slice"] == 2).all()
    np.testing.assert_allclose(located[["x", "y"]].to_numpy(), centres, atol=0.8)


def test_only_the_lowest_five_discs_count_and_specks_are_no_discs():
    image, centres = _spine_slice(0.0, disc_rows=(6, 20, 36, 52, 68, 84))  # a sixth disc (T12/L1) at the top
    image[90:92, 10:12] = DISC  # a speck
    located = locate_from_masks(image[None], SAG_T2)
    np.testing.assert_allclose(located["y"], centres[1:, 1], atol=0.6)  # L1/L2 is the second from the top
    assert len(discs_bottom_up(image[None])) == 6


def test_a_lesion_goes_with_the_canal_it_lies_in_or_the_foramen_it_fills():
    volume = np.zeros((3, 40, 40), np.uint8)
    volume[:, 5:25, 5:15] = CANAL  # a tube along the spine
    volume[1, 12:17, 5:12] = LESION  # a bulge filling the front of the canal, canal above, below and behind it
    volume[1, 12:17, 5:15] = np.where(volume[1, 12:17, 5:15] == LESION, LESION, 0)  # ...or its whole depth
    volume[1, 26:31, 16:21] = LESION  # a foramen filled by its lesion, touching the canal's side...
    volume[1, 24:26, 14:16] = CANAL  # ...at a corner
    volume[:, 26:31, 30:35] = FORAMEN
    volume[0, 27:30, 29] = LESION  # a lesion narrowing the fat of another foramen
    volume[2, 14:18, 5:9] = LESION  # on the next slice, the bulge touches the foramen's lesion in 3D
    volume[2, 18:20, 9:16] = LESION
    volume[2, 20:27, 15:17] = LESION
    canal, foramen = lesion_split(volume)
    assert canal[1, 12:17, 5:12].all() and not foramen[1, 12:17, 5:15].any()
    assert foramen[1, 26:31, 16:21].all() and not canal[1, 26:31, 16:21].any()
    assert foramen[0, 27:30, 29].all()
    assert canal[2, 14:18, 5:9].all()


def _foramen_volume(n_slices=12, rows=(20, 36, 52, 68, 84), discs=True):
    """Foramina on slices 1-3 (one side) and 8-10 (the other), widest on slices 2 and 9, with the discs."""
    volume = np.zeros((n_slices, SIZE, SIZE), np.uint8)
    for centre_slice in (2, 9):
        for offset, radius in ((-1, 2), (0, 4), (1, 3)):
            for row in rows:
                yy, xx = np.mgrid[0:SIZE, 0:SIZE]
                blob = (xx - 60) ** 2 + (yy - (row - 3)) ** 2 <= radius**2
                volume[centre_slice + offset][blob] = FORAMEN
    if discs:
        volume[:, np.isin(np.arange(SIZE), [r + d for r in rows for d in (-1, 0, 1)]), 20:45] = DISC
    return volume


@pytest.mark.parametrize("discs", [True, False])
def test_foramina_take_the_level_of_the_nearest_disc_and_a_provisional_side(discs):
    volume = _foramen_volume(discs=discs)
    volume[9, 50:53, 58:61] = LESION  # a lesion in a foramen belongs to it
    detections = detections_from_masks(volume, SAG_T1, left_first=True)
    assert list(detections.columns) == list(DETECTION_COLUMNS)
    left, right = detector_targets(SAG_T1)[:5], detector_targets(SAG_T1)[5:]
    assert set(detections.loc[detections["slice"] <= 3, "target"]) == set(left)
    assert set(detections.loc[detections["slice"] >= 8, "target"]) == set(right)
    located = locate_from_masks(volume, SAG_T1, left_first=True)
    assert not located["filled"].any()
    assert located["slice"].tolist() == [2] * 5 + [9] * 5
    np.testing.assert_allclose(located["y"], [17, 33, 49, 65, 81] * 2, atol=0.3)
    flipped = locate_from_masks(volume, SAG_T1, left_first=False)
    assert flipped["slice"].tolist() == [9] * 5 + [2] * 5


def test_points_maps_give_one_detection_per_level_and_slice_with_area_or_probability_confidence():
    points = np.array([[3, 40.0, 20.0, 0], [3, 40.0, 35.0, 1], [4, 41.0, 35.0, 1], [9, 60.0, 50.0, 2]])
    maps = point_maps(points, 12, SIZE, radius_px=3.0)
    maps[4, 30:32, 60:62] = 2  # a smaller stray blob of the same level: the largest blob counts
    detections = detections_from_points(maps, SAG_T1, left_first=True)
    by = detections.set_index(["target", "slice"])
    left_l1, left_l2 = target_index("left_neural_foraminal_narrowing", "l1_l2"), detector_targets(SAG_T1)[1]
    right_l3 = target_index("right_neural_foraminal_narrowing", "l3_l4")
    assert by.loc[(left_l1, 3), ["x", "y"]].tolist() == pytest.approx([40.0, 20.0])
    assert by.loc[(left_l2, 4), ["x", "y"]].tolist() == pytest.approx([41.0, 35.0])
    assert by.loc[(right_l3, 9), "confidence"] == 1.0 and len(detections) == 4
    probabilities = np.zeros((12, 6, SIZE, SIZE), np.float32)
    probabilities[:, 0] = 1.0
    probabilities[3, 1][maps[3] == 1], probabilities[3, 2][maps[3] == 2] = 0.9, 0.4
    probabilities[4, 2][maps[4] == 2], probabilities[9, 3][maps[9] == 3] = 0.7, 0.8
    scored = detections_from_points(maps, SAG_T2, probabilities=probabilities).set_index(["target", "slice"])
    assert scored.loc[(1, 3), "confidence"] == pytest.approx(0.4)
    assert scored.loc[(1, 4), "confidence"] == pytest.approx(0.7)
    assert detections_from_points(np.zeros((4, 8, 8), np.uint8), SAG_T2).empty


def test_probabilities_scale_the_confidence_and_bad_inputs_are_refused():
    image, _ = _spine_slice()
    volume = np.stack([image, image])
    probabilities = np.zeros((2, 6, SIZE, SIZE), np.float32)
    probabilities[0, CANAL], probabilities[1, CANAL] = 1.0, 0.5
    detections = detections_from_masks(volume, SAG_T2, probabilities=probabilities)
    first, second = (detections[detections["slice"] == s].sort_values("target") for s in (0, 1))
    np.testing.assert_allclose(second["confidence"].to_numpy(), 0.5 * first["confidence"].to_numpy())
    with pytest.raises(ValueError, match="Axial"):
        detections_from_masks(volume, "Axial T2")
    with pytest.raises(ValueError, match="probabilities"):
        detections_from_masks(volume, SAG_T2, probabilities=probabilities[:, :, :10])
    assert detections_from_masks(np.zeros((3, 8, 8), np.uint8), SAG_T1).empty


def test_a_mask_locator_is_a_level_detector_over_its_segmenter():
    image, centres = _spine_slice()
    volume = np.full((1, SIZE, SIZE), 7, np.uint8)
    locator = MaskLocator(SAG_T2, known_segmentations([(volume, image[None])]))
    assert isinstance(locator, LevelDetector)
    located = locator.locate(volume)
    np.testing.assert_allclose(located["y"], centres[:, 1], atol=0.6)
    with pytest.raises(KeyError):
        locator.detect(volume + 1)
    wrong = MaskLocator(SAG_T2, lambda v: Segmentation(np.zeros((2, SIZE, SIZE), np.uint8)))
    with pytest.raises(ValueError, match="slices"):
        wrong.detect(volume)
    with pytest.raises(ValueError, match="kind"):
        MaskLocator(SAG_T2, lambda v: v, kind="boxes")


# ---------------------------------------------------------------------------- ground truth through the localiser


def localise_with_masks(studies, kind: str = "anatomy") -> pd.DataFrame:
    """Every study's sagittal points from :func:`localise_study` with a :class:`MaskLocator` over its ground truth
    (``anatomy``: the semantic classes of its label volumes; ``points``: points maps of its labelled points)."""
    found = []
    for study_id, series in studies.series.items():
        pairs = []
        for entries in series.values():
            for entry in entries:
                labels = studies.labels[(study_id, int(entry.meta.series_id))]
                if kind == "anatomy":
                    pairs.append((entry.volume, semantic(labels)))
                else:
                    pairs.append((entry.volume, _points_map(studies.points, entry)))
        segment = known_segmentations(pairs)
        locators = {description: MaskLocator(description, segment, kind) for description in series}
        found.append(localise_study(study_id, series, locators).points)
    return pd.concat(found, ignore_index=True)


def _points_map(points: pd.DataFrame, entry) -> np.ndarray:
    rows = points[points["series_id"] == int(entry.meta.series_id)]
    table = np.stack([rows["slice"], rows["x"], rows["y"], rows["target"] % 5], axis=1)
    return point_maps(table, len(entry.volume), entry.meta.size, radius_px=3.0)


def sagittal_errors(studies, predicted: pd.DataFrame) -> pd.DataFrame:
    truth = studies.points[studies.points["target"].isin(SAGITTAL)]
    errors = point_errors(predicted, truth, lambda s, i: studies.cache.read(s, i, mmap=True))
    assert len(errors) == len(truth)  # every labelled sagittal point was placed
    return errors


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return masked_studies(tmp_path_factory.mktemp("easy"), "easy", studies=6)


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """The hard preset's studies and their points from ground-truth masks."""
    studies = masked_studies(tmp_path_factory.mktemp("hard"), "hard", studies=5)
    return studies, localise_with_masks(studies)


def test_ground_truth_masks_reproduce_every_labelled_sagittal_point_on_the_easy_preset(easy):
    errors = sagittal_errors(easy, localise_with_masks(easy))
    assert len(errors) == 6 * 15
    assert errors["error_px"].max() <= 1.0
    assert (errors["slice_error"] <= 1).all()
    canal = errors[errors["series_type"] == SAG_T2]
    # The canal's widest slice is the labelled mid-line one, but a structure halfway between two slices is as wide
    # on both (the masks are sampled at 2-3 mm a pixel): 87 % of the canal and 94 % of the foramen points on 30
    # studies.
    assert canal["slice_correct"].mean() >= 0.75 and errors["slice_correct"].mean() >= 0.8


def test_a_label_volume_reads_as_its_semantic_classes(easy):
    (study_id, series), *_ = easy.series.items()
    for description, entries in series.items():
        labels = easy.labels[(study_id, int(entries[0].meta.series_id))]
        assert labels.max() > 100  # label values, not classes
        from_labels = detections_from_masks(labels, description, left_first=False)
        pd.testing.assert_frame_equal(from_labels, detections_from_masks(semantic(labels), description, False))


def test_ground_truth_points_maps_reproduce_the_labelled_points(easy):
    errors = sagittal_errors(easy, localise_with_masks(easy, kind="points"))
    assert errors["error_px"].max() <= 0.5 and errors["slice_correct"].all()


def test_ground_truth_masks_on_the_hard_preset_land_within_the_annotators_scatter(hard):
    # Labels there scatter by 1.2 mm (SD, per axis) and 4 % lie on a neighbouring slice; a cache pixel is 2-3 mm.
    errors = sagittal_errors(*hard)
    assert errors["error_px"].median() <= 1.0 and errors["error_px"].max() <= 3.0
    assert (errors["slice_error"] <= 1).mean() >= 0.95


def test_ground_truth_masks_on_the_hard_preset_find_the_anatomy_itself(hard):
    # Against the generator's noise-free points: what the post-processing adds, without the annotators' scatter.
    from lumbar_ray.localize.geometry import cache_point_to_patient

    studies, predicted = hard
    worst = 0.0
    for study_id in studies.series:
        anatomy = studies.plan(study_id).anatomy
        truth = np.concatenate([anatomy.spinal_point, anatomy.foramen_point(1), anatomy.foramen_point(-1)])
        for row in predicted[(predicted["study_id"] == study_id) & predicted["target"].isin(SAGITTAL)].itertuples():
            entry = studies.cache.read(study_id, int(row.series_id), mmap=True)
            point = cache_point_to_patient(entry, int(row.slice), float(row.x), float(row.y))
            in_plane = np.hypot(*(point - truth[row.target])[1:]) / float(np.mean(entry.mm_per_pixel(int(row.slice))))
            worst = max(worst, in_plane)
    assert worst <= 1.5  # the canal's outline itself strays from the curve its centre follows by up to ~0.4 px
