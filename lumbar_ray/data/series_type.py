"""Which of the three series types a DICOM series is, from its headers alone: the rule of a study without a CSV.

The competition's ``*_series_descriptions.csv`` names each series' type; a study that arrives as DICOM files (a
served request, a hospital export) has only its headers. The rule, first match wins:

1. **The description map**: ``SeriesDescription`` matched, case-insensitively, against regular expressions ->
   series type (:data:`DEFAULT_DESCRIPTION_MAP`, which a user can extend or override, e.g. for a site that calls its
   sagittal T2 ``"SAG FSE"``). The competition's own names match themselves.
2. **Orientation**: the slice normal (``row x column`` of ImageOrientationPatient) mostly along patient x is
   sagittal, mostly along z is axial (coronal and oblique series are none of the three).
3. **Weighting**: a description that names one (``T1``, ``T2``, ``STIR``) without matching the map, else the echo
   time (:func:`weighting`: with an inversion pulse, TE under 30 ms is T1 FLAIR, longer is STIR; without one, TE
   of 60 ms or more is T2, TE under 30 ms with TR under 1000 ms is T1); a sagittal series of unknown weighting is
   left open.

An axial series is the task's Axial T2 unless it is known to be T1 (the models read axial T2 only).
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


def weighting(meta: Mapping[str, Any]) -> str | None:
    """``T1``, ``T2`` (T2 or STIR) or None from EchoTime, RepetitionTime and InversionTime (ms).

    With an inversion pulse the echo time decides alone (STIR has a long echo; T1 FLAIR, the usual 3 T sagittal T1,
    a short one and a long TR); without one, a long echo is T2 and a short echo with a short TR is T1.
    """
    echo, repetition = _number(meta.get("EchoTime")), _number(meta.get("RepetitionTime"))
    if _number(meta.get("InversionTime")) is not None and echo is not None:
        return "T1" if echo < T1_MAX_ECHO_MS else "T2"
    if echo is not None and echo >= T2_MIN_ECHO_MS:
        return "T2"
    if echo is not None and echo < T1_MAX_ECHO_MS and (repetition is None or repetition < T1_MAX_REPETITION_MS):
        return "T1"
    return None


def _named_weighting(description: str) -> str | None:
    """``T1`` or ``T2`` when the description names one weighting (``STIR`` counts as T2), else None."""
    spaced = f" {re.sub(r'[^0-9a-z]+', ' ', description.lower())} "
    named = {name for name, token in (("T1", " t1"), ("T2", " t2"), ("T2", " stir")) if token in spaced}
    return next(iter(named)) if len(named) == 1 else None


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
    # A description that names the weighting outright is believed over the echo time (which can be missing or odd).
    sequence = _named_weighting(description) or weighting(meta)
    how = "description's weighting" if _named_weighting(description) else "echo time"
    orientation_plane = plane(orientation)
    if orientation_plane == "axial":
        if sequence == "T1":
            return None, f"axial T1 ({how}): the models read axial T2 only"
        return AXIAL_T2, "orientation" if sequence is None else f"orientation and {how}"
    if orientation_plane == "sagittal":
        if sequence is not None:
            return (SAGITTAL_T1 if sequence == "T1" else SAGITTAL_T2), f"orientation and {how}"
        return None, "sagittal, weighting unknown (no description match, no EchoTime that tells T1 from T2)"
    return None, f"not sagittal or axial ({orientation_plane or 'no usable orientation'})"
