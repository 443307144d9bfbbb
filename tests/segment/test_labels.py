"""The label values of a segmentation volume: SPIDER's counting from the bottom, the project's own values, and the
folds into SPIDER's values and the training classes."""

from __future__ import annotations

import numpy as np
import pytest

from lumbar_ray.constants import LEVELS
from lumbar_ray.segment import labels as lab


def test_values_count_from_the_bottom_as_spider_does():
    assert [lab.vertebra_value(k) for k in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    assert [lab.disc_value(k) for k in range(7)] == [201, 202, 203, 204, 205, 206, 207]
    assert [lab.foramen_value(k, "left") for k in range(5)] == [301, 302, 303, 304, 305]
    assert [lab.foramen_value(k, -1) for k in range(5)] == [311, 312, 313, 314, 315]
    assert lab.foramen_value(0, 1) == lab.foramen_value(0, "left")  # +1 = patient left (+x in LPS)
    assert (lab.SACRUM, lab.CANAL, lab.LESION_OFFSET) == (90, 100, 1000)


@pytest.mark.parametrize(
    "call",
    [
        lambda: lab.vertebra_value(25),
        lambda: lab.disc_value(-1),
        lambda: lab.foramen_value(5, "left"),
        lambda: lab.foramen_value(0, "middle"),
        lambda: lab.foramen_value(0, 0),
    ],
)
def test_out_of_range_values_are_errors(call):
    with pytest.raises(ValueError):
        call()


def test_the_lowest_disc_is_l5_s1():
    assert lab.DISC_LEVELS == {201: "l5_s1", 202: "l4_l5", 203: "l3_l4", 204: "l2_l3", 205: "l1_l2"}
    for level in LEVELS:
        assert lab.level_of_disc_value(lab.disc_value(lab.bottom_index(level))) == level
    with pytest.raises(KeyError, match="206"):
        lab.level_of_disc_value(206)  # T12/L1 is no project level


def test_names_follow_the_values():
    assert lab.LABEL_TABLE[1] == "vertebra L5" and lab.LABEL_TABLE[6] == "vertebra T12"
    assert lab.LABEL_TABLE[201] == "disc L5/S1" and lab.LABEL_TABLE[206] == "disc T12/L1"
    assert lab.LABEL_TABLE[315] == "right foramen L1/L2" and lab.LABEL_TABLE[1301] == "lesion in the left foramen L5/S1"
    assert lab.LABEL_TABLE[1100] == "lesion in the spinal canal"
    assert not any(1000 + 200 < value < 1000 + 300 for value in lab.LABEL_TABLE), "lesions never narrow a disc"


def _every_kind() -> np.ndarray:
    return np.array([0, 1, 7, 25, 90, 100, 201, 207, 225, 301, 305, 311, 315, 1100, 1301, 1315, 26, 306], np.int16)


def test_semantic_classes():
    assert lab.SEMANTIC_CLASSES == ("background", "vertebra", "disc", "canal", "foramen", "lesion")
    got = lab.semantic(_every_kind().reshape(3, 6))
    assert got.dtype == np.uint8 and got.shape == (3, 6)
    assert got.ravel().tolist() == [0, 1, 1, 1, 1, 3, 2, 2, 2, 4, 4, 4, 4, 5, 5, 5, 0, 0]
    table = np.array(sorted(lab.LABEL_TABLE), dtype=np.int16)
    assert (lab.semantic(table)[1:] > 0).all(), "every documented structure has a class"


def test_to_spider_keeps_what_spider_knows():
    got = lab.to_spider(_every_kind())
    assert got.dtype == np.int16
    assert got.tolist() == [0, 1, 7, 25, 0, 100, 201, 207, 225, 0, 0, 0, 0, 100, 0, 0, 0, 0]


def test_footprint_includes_the_lesions_inside_a_structure():
    volume = np.array([100, 1100, 301, 1301, 302, 0])
    assert lab.footprint(volume, lab.CANAL).tolist() == [True, True, False, False, False, False]
    assert lab.footprint(volume, 301).tolist() == [False, False, True, True, False, False]
    assert (volume == lab.CANAL).sum() == 1  # the lumen alone


def test_mask_file_layout(tmp_path):
    assert lab.mask_file(tmp_path, "train", 12, 34) == tmp_path / "segmentation" / "train_images" / "12" / "34.npz"
    table = lab.label_table_json()
    assert table["values"]["201"] == "disc L5/S1" and table["lesion_offset"] == 1000
