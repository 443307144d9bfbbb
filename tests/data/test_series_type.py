"""Series types from headers alone: the description map, then orientation and echo time."""

from __future__ import annotations

import pytest

from lumbar_ray.data.series_type import description_map, plane, series_type

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along y, columns down z: normal along x
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("Sagittal T1", "Sagittal T1"),
        ("Sagittal T2/STIR", "Sagittal T2/STIR"),
        ("Axial T2", "Axial T2"),
        ("SAG T1 FSE", "Sagittal T1"),
        ("t2_tse_sag_384", "Sagittal T2/STIR"),
        ("STIR SAG", "Sagittal T2/STIR"),
        ("T2 TRA 3mm", "Axial T2"),
        ("ax t2 frfse", "Axial T2"),
    ],
)
def test_descriptions_of_the_usual_spellings_give_their_type(description, expected):
    assert series_type(description, None, {}, description_map()) == (expected, "description")


def test_a_user_map_wins_over_the_defaults_and_is_checked():
    mapping = description_map({r"^sag fse$": "Sagittal T2/STIR"})
    assert series_type("SAG FSE", SAGITTAL, {"EchoTime": 10.0}, mapping)[0] == "Sagittal T2/STIR"
    with pytest.raises(ValueError, match="must be one of"):
        description_map({"x": "Coronal T1"})
    with pytest.raises(ValueError, match="does not compile"):
        description_map({"(": "Axial T2"})


def test_without_a_description_orientation_and_echo_time_decide():
    mapping = description_map()
    assert series_type("", AXIAL, {}, mapping) == ("Axial T2", "orientation")
    assert series_type("", SAGITTAL, {"EchoTime": 12.0, "RepetitionTime": 600.0}, mapping)[0] == "Sagittal T1"
    assert series_type("", SAGITTAL, {"EchoTime": 95.0, "RepetitionTime": 3500.0}, mapping)[0] == "Sagittal T2/STIR"
    assert series_type("", SAGITTAL, {"EchoTime": 40.0, "InversionTime": 150.0}, mapping)[0] == "Sagittal T2/STIR"
    kind, reason = series_type("", SAGITTAL, {}, mapping)
    assert kind is None and "weighting unknown" in reason
    kind, reason = series_type("localizer", CORONAL, {}, mapping)
    assert kind is None and "coronal" in reason


def test_t1_flair_is_t1_and_an_axial_t1_is_no_axial_t2():
    mapping = description_map()
    flair = {"EchoTime": 12.0, "RepetitionTime": 2200.0, "InversionTime": 860.0}
    assert series_type("", SAGITTAL, flair, mapping)[0] == "Sagittal T1"
    assert series_type("", SAGITTAL, {"EchoTime": 70.0, "InversionTime": 150.0}, mapping)[0] == "Sagittal T2/STIR"
    kind, reason = series_type("AX T1", AXIAL, {}, mapping)
    assert kind is None and "axial T1" in reason
    assert series_type("", AXIAL, {"EchoTime": 9.0, "RepetitionTime": 550.0}, mapping)[0] is None
    assert series_type("T2 FSE", SAGITTAL, {"EchoTime": 9.0, "RepetitionTime": 550.0}, mapping)[0] == "Sagittal T2/STIR"


def test_a_tilted_axial_block_is_still_axial_and_an_oblique_plane_is_none():
    tilt = 0.3  # ~17 degrees along a disc
    import math

    tilted = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    assert plane(tilted) == "axial"
    oblique = (1.0, 0.0, 0.0, 0.0, math.cos(math.pi / 4), math.sin(math.pi / 4))
    assert plane(oblique) is None and plane(None) is None
