"""Which of the three series types a DICOM series is, from its headers alone: the rule of a study without a CSV.

The competition's ``*_series_descriptions.csv`` names each series' type; a study that arrives as DICOM files (a
served request, a hospital export) has only its headers. The rule, first match wins:

1. **The description map**: ``SeriesDescription`` matched, case-insensitively, against regular expressions ->
   series type (:data:`DEFAULT_DESCRIPTION_MAP`, which a user can extend or override, e.g. for a site that calls its
   sagittal T2 ``"SAG FSE"``). The competition's own names match themselves.
2. **Orientation**: the slice normal (``row x column`` of ImageOrientationPatient) mostly along patient x is
   sagittal, mostly along z is axial (coronal and oblique series are none of the three).
3. **Weighting of a sagittal series** the description leaves open: EchoTime and RepetitionTime (T1: TE under 30 ms
   and TR under 1000 ms; T2 or STIR: TE of 60 ms or more, or an InversionTime, which STIR has); left open
   otherwise.

An axial series is taken as the task's Axial T2 whatever its weighting (the only axial type the models read).
A series the rule cannot type is reported, never guessed: its targets fall back to the prior downstream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lumbar_ray.constants import SERIES_TYPES

SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2 = SERIES_TYPES

DEFAULT_DESCRIPTION_MAP: dict[str, str] = {
    r"\bsag\w*\b.*\bt1": SAGITTAL_T1,
    r"\bt1\w*\b.*\bsag": SAGITTAL_T1,
    r"\bsag\w*\b.*\b(t2|stir)": SAGITTAL_T2,
    r"\b(t2|stir)\w*\b.*\bsag": SAGITTAL_T2,
    r"\bax\w*\b.*\bt2": AXIAL_T2,
    r"\bt2\w*\b.*\bax": AXIAL_T2,
    r"\btra\w*\b.*\bt2": AXIAL_T2,
    r"\bt2\w*\b.*\btra": AXIAL_T2,
}
"""SeriesDescription pattern -> series type (``re.search``, case-insensitive): the competition's names and the
usual spellings (``SAG T1``, ``t2_tse_sag``, ``T2 TRA``, ``STIR SAG``)."""

T1_MAX_ECHO_MS = 30.0
T1_MAX_REPETITION_MS = 1000.0
T2_MIN_ECHO_MS = 60.0
# The normal's largest component must be at least this (cos 35 degrees): a series tilted less than 35 degrees from
# a cardinal plane is of that plane (axial slices are tilted along a disc, sagittal ones hardly).
MIN_PLANE_COSINE = 0.82


def description_map(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The default map with the user's patterns first (they win), each checked.

    Raises:
        ValueError: a pattern that does not compile, or a type that is not one of :data:`SERIES_TYPES`.
    """
    merged = {
        **dict(overrides or {}),
        **{k: v for k, v in DEFAULT_DESCRIPTION_MAP.items() if k not in (overrides or {})},
    }
    for pattern, series_type in merged.items():
        if series_type not in SERIES_TYPES:
            raise ValueError(f"series map {pattern!r} -> {series_type!r}: the type must be one of {SERIES_TYPES}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"series map pattern {pattern!r} does not compile: {error}") from None
    return merged


def type_from_description(description: str, mapping: Mapping[str, str]) -> str | None:
    """The type the first matching pattern of ``mapping`` gives ``description``, or None.

    A pattern is tried on the description as it is, then with every run of other characters than letters and digits
    made one space (``t2_tse_sag`` -> ``t2 tse sag``: ``_`` is a word character to ``\\b``).
    """
    text = description.strip()
    if text in SERIES_TYPES:
        return text
    spaced = re.sub(r"[^0-9A-Za-z]+", " ", text)
    for pattern, kind in mapping.items():
        if re.search(pattern, text, re.IGNORECASE) or re.search(pattern, spaced, re.IGNORECASE):
            return kind
    return None


def plane(orientation: Sequence[float] | None) -> str | None:
    """``sagittal``, ``axial``, ``coronal`` or None (no orientation, or an oblique one) from ImageOrientationPatient."""
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in normal))
    if norm < 1e-6:
        return None
    largest = max(range(3), key=lambda axis: abs(normal[axis]))
    if abs(normal[largest]) / norm < MIN_PLANE_COSINE:
        return None
    return ("sagittal", "coronal", "axial")[largest]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def sagittal_weighting(meta: Mapping[str, Any]) -> str | None:
    """``Sagittal T1``, ``Sagittal T2/STIR`` or None from EchoTime, RepetitionTime and InversionTime (ms)."""
    echo, repetition = _number(meta.get("EchoTime")), _number(meta.get("RepetitionTime"))
    if _number(meta.get("InversionTime")) is not None and (echo is None or echo >= T1_MAX_ECHO_MS):
        return SAGITTAL_T2  # STIR: an inversion pulse and a long echo (FLAIR-like T1 sequences have a short TE)
    if echo is not None and echo >= T2_MIN_ECHO_MS:
        return SAGITTAL_T2
    if echo is not None and echo < T1_MAX_ECHO_MS and (repetition is None or repetition < T1_MAX_REPETITION_MS):
        return SAGITTAL_T1
    return None


def series_type(
    description: str, orientation: Sequence[float] | None, meta: Mapping[str, Any], mapping: Mapping[str, str]
) -> tuple[str | None, str]:
    """The series type of one series and how it was told (see the module docstring).

    Args:
        description: SeriesDescription ("" when absent).
        orientation: ImageOrientationPatient of its first slice, or None.
        meta: whitelisted acquisition tags (EchoTime, RepetitionTime, InversionTime), plain values.
        mapping: :func:`description_map`.

    Returns:
        ``(type or None, reason)``: the reason says which rule decided (for the response and the report).
    """
    kind = type_from_description(description, mapping)
    if kind is not None:
        return kind, "description"
    orientation_plane = plane(orientation)
    if orientation_plane == "axial":
        return AXIAL_T2, "orientation"
    if orientation_plane == "sagittal":
        weighting = sagittal_weighting(meta)
        if weighting is not None:
            return weighting, "orientation and echo time"
        return None, "sagittal, weighting unknown (no description match, no usable EchoTime)"
    return None, f"not sagittal or axial ({orientation_plane or 'no usable orientation'})"
