"""The one vocabulary of the RSNA 2024 lumbar spine task.

Every module names conditions, levels, severities, series types and submission rows through this module, so
the column order of label arrays and of submissions is defined exactly once.
"""

from __future__ import annotations

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
"""Conditions in the column order of ``train.csv``."""

LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
"""Intervertebral levels, cranial to caudal."""

SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
"""Severity labels as written in ``train.csv``; their index is the class id."""

SUBMISSION_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
"""Probability columns of a submission, in class-id order."""

SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
"""Per-class sample weights of the official score (by the TRUE class)."""

IGNORE_INDEX: int = -100
"""Label value of an empty ``train.csv`` cell; equals ``torch.nn.CrossEntropyLoss``'s default ignore_index."""

SERIES_TYPES: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
"""Values of ``series_description``."""

DETECTED_SERIES_TYPES: tuple[str, ...] = ("Sagittal T2/STIR", "Sagittal T1")
"""The series types a level detector is trained for, in training order (axial levels come from geometry)."""

POINT_COLUMNS: tuple[str, ...] = ("study_id", "target", "series_id", "slice", "x", "y")
"""A POINTS frame: one row per ``(study_id, target)``; ``slice`` indexes the cached volume, ``x``/``y`` are cache
pixels (pixel centres)."""

TARGETS: tuple[str, ...] = tuple(f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS)
"""The 25 targets in ``train.csv`` column order: condition-major, level-minor."""

CONDITION_TITLES: dict[str, str] = {
    "spinal_canal_stenosis": "Spinal Canal Stenosis",
    "left_neural_foraminal_narrowing": "Left Neural Foraminal Narrowing",
    "right_neural_foraminal_narrowing": "Right Neural Foraminal Narrowing",
    "left_subarticular_stenosis": "Left Subarticular Stenosis",
    "right_subarticular_stenosis": "Right Subarticular Stenosis",
}
"""Condition names as written in ``train_label_coordinates.csv``."""

LEVEL_TITLES: dict[str, str] = {
    "l1_l2": "L1/L2",
    "l2_l3": "L2/L3",
    "l3_l4": "L3/L4",
    "l4_l5": "L4/L5",
    "l5_s1": "L5/S1",
}
"""Level names as written in ``train_label_coordinates.csv``."""

CONDITION_GROUPS: dict[str, tuple[str, ...]] = {
    "spinal": ("spinal_canal_stenosis",),
    "foraminal": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
    "subarticular": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
}
"""The three scored groups of the official metric (the fourth, any_severe_spinal, derives from spinal)."""

GROUP_TARGET_INDICES: dict[str, tuple[int, ...]] = {
    group: tuple(TARGETS.index(f"{condition}_{level}") for condition in conditions for level in LEVELS)
    for group, conditions in CONDITION_GROUPS.items()
}
"""The columns of :data:`TARGETS` that belong to each condition group."""

CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}
"""The series type on which each condition is read (and labelled in the coordinates file)."""

SECOND_VIEW_SOURCES: dict[str, tuple[str, ...]] = {
    "spinal_canal_stenosis": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
    "left_neural_foraminal_narrowing": ("left_subarticular_stenosis",),
    "right_neural_foraminal_narrowing": ("right_subarticular_stenosis",),
}
"""The second view of a target (``crop.second_view``): per condition that has one, the conditions whose points at
the same level place it, in order of preference. Both pairs the 1st place of RSNA 2024 found useful read the
level's axial slices: the canal between the two subarticular points, each foramen at its own side's subarticular
point. Subarticular targets have no second view (a sagittal one did not help them)."""

MAX_VIEWS: int = 2
"""Views per target a study item can hold: its own series and, with ``crop.second_view``, the second view."""


def series_slug(description: str) -> str:
    """A folder-, tag- and metric-safe name of a series type: ``Sagittal T2/STIR`` -> ``sagittal_t2_stir``."""
    return "".join(c if c.isalnum() else "_" for c in description.lower())


def condition_group(condition: str) -> str:
    """Return the scored group (``spinal``, ``foraminal`` or ``subarticular``) of a condition.

    Raises:
        KeyError: if ``condition`` is not one of :data:`CONDITIONS`.
    """
    for group, members in CONDITION_GROUPS.items():
        if condition in members:
            return group
    raise KeyError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")


def row_id(study_id: int | str, condition: str, level: str) -> str:
    """Build a submission ``row_id``: ``<study_id>_<condition>_<level>``."""
    return f"{study_id}_{condition}_{level}"


def parse_row_id(value: str) -> tuple[int, str, str]:
    """Split a submission ``row_id`` into ``(study_id, condition, level)``.

    Raises:
        ValueError: if the id is not ``<int>_<condition>_<level>`` with a known condition and level.
    """
    study, _, rest = value.partition("_")
    level = rest[-5:]
    condition = rest[:-6]
    if not study.isdigit() or condition not in CONDITIONS or level not in LEVELS or rest[-6:-5] != "_":
        raise ValueError(f"malformed row_id {value!r}: expected <study_id>_<condition>_<level>")
    return int(study), condition, level


def target_index(condition: str, level: str) -> int:
    """Column of ``(condition, level)`` in a label array of shape ``(n_studies, 25)``."""
    return CONDITIONS.index(condition) * len(LEVELS) + LEVELS.index(level)
