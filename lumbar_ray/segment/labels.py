"""The label values of a segmentation volume: SPIDER's where SPIDER has them, the project's own elsewhere.

- ``0`` background: soft tissue, posterior elements, air.
- vertebral bodies, counted **from the bottom** as SPIDER does: L5 = 1, L4 = 2, ... L1 = 5, T12 = 6, T11 = 7
  (:func:`vertebra_value`); the sacrum is :data:`SACRUM` (90, SPIDER has none).
- the spinal canal: :data:`CANAL` (100, SPIDER's value).
- discs, from the bottom: L5/S1 = 201, L4/L5 = 202, ... L1/L2 = 205, T12/L1 = 206, T11/T12 = 207
  (:func:`disc_value`); the project's :data:`~lumbar_ray.constants.LEVELS` are ``LEVELS[4 - k]`` for ``k < 5``.
- neural foramina (the project's own): left 301..305, right 311..315, from the bottom (:func:`foramen_value`);
  left is the patient's left, +x in DICOM's LPS.
- a lesion (tissue narrowing the structure it lies in) keeps the structure's value plus :data:`LESION_OFFSET`:
  a narrowed canal pixel is 1100, a narrowed left L5/S1 foramen pixel 1301. A structure's whole extent is its
  :func:`footprint`; ``volume == value`` alone is its lumen or fat.

Volumes are int16. :func:`to_spider` keeps what SPIDER knows; :func:`semantic` folds the values into the
:data:`SEMANTIC_CLASSES` a segmentation network trains on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumbar_ray.constants import LEVELS

BACKGROUND = 0
SACRUM = 90
CANAL = 100
LESION_OFFSET = 1000
MAX_VERTEBRAE = 25  # SPIDER's vertebra (and disc) values run up to 25 above their base
DISC_BASE = 200
FORAMEN_BASE = {"left": 300, "right": 310}
LUMBAR_LEVELS = len(LEVELS)
GENERATED_LEVELS = 7  # the hard preset's column: L5 up to T11, L5/S1 up to T11/T12
SEMANTIC_CLASSES: tuple[str, ...] = ("background", "vertebra", "disc", "canal", "foramen", "lesion")
"""The classes of :func:`semantic`, in class-id order."""


def _side_name(side: int | str) -> str:
    names = {1: "left", -1: "right", "left": "left", "right": "right"}
    if side not in names:
        raise ValueError(f"unknown side {side!r}; expected 'left', 'right', +1 (patient left) or -1")
    return names[side]


def _check_index(k: int, count: int, what: str) -> None:
    if not 0 <= int(k) < count:
        raise ValueError(f"{what} index {k} out of range 0..{count - 1} (counted from the bottom)")


_VERTEBRA_NAMES = (
    *(f"L{5 - i}" for i in range(5)),
    *(f"T{12 - i}" for i in range(12)),
    *(f"C{7 - i}" for i in range(7)),
)


def vertebra_value(k: int) -> int:
    """The value of the ``k``-th vertebral body from the bottom (0 = L5, 5 = T12).

    Raises:
        ValueError: if ``k`` is outside ``0..24``.
    """
    _check_index(k, MAX_VERTEBRAE, "vertebra")
    return k + 1


def disc_value(k: int) -> int:
    """The value of the ``k``-th disc from the bottom (0 = L5/S1, 4 = L1/L2, 5 = T12/L1).

    Raises:
        ValueError: if ``k`` is outside ``0..24``.
    """
    _check_index(k, MAX_VERTEBRAE, "disc")
    return DISC_BASE + 1 + k


def foramen_value(k: int, side: int | str) -> int:
    """The value of the foramen at the ``k``-th lumbar level from the bottom (0 = L5/S1) on one side.

    Args:
        k: level from the bottom, ``0..4``.
        side: ``"left"`` or ``"right"``, or the synthetic generator's ``+1`` (patient left, +x in LPS) or ``-1``.

    Raises:
        ValueError: on a level outside ``0..4`` or an unknown side.
    """
    _check_index(k, LUMBAR_LEVELS, "foramen level")
    return FORAMEN_BASE[_side_name(side)] + 1 + k


def bottom_index(level: str) -> int:
    """``k`` (from the bottom) of one of the project's :data:`LEVELS`: ``l5_s1`` -> 0, ``l1_l2`` -> 4."""
    return LUMBAR_LEVELS - 1 - LEVELS.index(level)


DISC_LEVELS: dict[int, str] = {disc_value(k): LEVELS[LUMBAR_LEVELS - 1 - k] for k in range(LUMBAR_LEVELS)}
"""The five lumbar discs' values -> the project's level names (201 -> ``l5_s1`` ... 205 -> ``l1_l2``)."""


def level_of_disc_value(value: int) -> str:
    """The project's level name of a lumbar disc value (201 -> ``l5_s1``).

    Raises:
        KeyError: if ``value`` is not one of the five lumbar discs (201..205).
    """
    try:
        return DISC_LEVELS[int(value)]
    except KeyError:
        raise KeyError(f"{value} is not a lumbar disc value; expected one of {sorted(DISC_LEVELS)}") from None


def footprint(volume: np.ndarray, structure: int) -> np.ndarray:
    """Where a structure is, lesions inside it included: ``volume == s`` or ``volume == s + LESION_OFFSET``."""
    return (volume == structure) | (volume == structure + LESION_OFFSET)


def semantic(volume: np.ndarray) -> np.ndarray:
    """The :data:`SEMANTIC_CLASSES` of a label volume, uint8 of the same shape (every lesion is class 5)."""
    v = np.asarray(volume)
    out = np.zeros(v.shape, dtype=np.uint8)
    out[((v >= 1) & (v <= MAX_VERTEBRAE)) | (v == SACRUM)] = 1
    out[(v > DISC_BASE) & (v <= DISC_BASE + MAX_VERTEBRAE)] = 2
    out[v == CANAL] = 3
    out[_is_foramen(v)] = 4
    out[v >= LESION_OFFSET] = 5
    return out


def _is_foramen(v: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce([(v > base) & (v <= base + LUMBAR_LEVELS) for base in FORAMEN_BASE.values()])


def to_spider(volume: np.ndarray) -> np.ndarray:
    """The label volume in SPIDER's values (int16): vertebrae 1..25, canal 100 (a narrowed canal too), discs
    201..225; the sacrum, foramina and foraminal lesions become background, as SPIDER has none."""
    v = np.asarray(volume)
    keep = ((v >= 1) & (v <= MAX_VERTEBRAE)) | (v == CANAL) | ((v > DISC_BASE) & (v <= DISC_BASE + MAX_VERTEBRAE))
    out = np.where(keep, v, 0).astype(np.int16)
    out[v == CANAL + LESION_OFFSET] = CANAL
    return out


def vertebra_name(k: int) -> str:
    """``L5``, ``L4``, ... ``T12`` ... for the ``k``-th vertebra from the bottom."""
    _check_index(k, len(_VERTEBRA_NAMES), "vertebra")
    return _VERTEBRA_NAMES[k]


def disc_name(k: int) -> str:
    """``L5/S1``, ``L4/L5``, ... for the ``k``-th disc from the bottom."""
    return f"{vertebra_name(k)}/{vertebra_name(k - 1) if k > 0 else 'S1'}"


def _label_table() -> dict[int, str]:
    """Every value the synthetic generator writes -> its name (:data:`LABEL_TABLE`)."""
    table = {BACKGROUND: "background"}
    table |= {vertebra_value(k): f"vertebra {vertebra_name(k)}" for k in range(GENERATED_LEVELS)}
    table[SACRUM] = "sacrum"
    table[CANAL] = "spinal canal"
    table |= {disc_value(k): f"disc {disc_name(k)}" for k in range(GENERATED_LEVELS)}
    for side in FORAMEN_BASE:
        table |= {foramen_value(k, side): f"{side} foramen {disc_name(k)}" for k in range(LUMBAR_LEVELS)}
    narrowed = [value for value in table if value == CANAL or value > FORAMEN_BASE["left"]]
    return table | {value + LESION_OFFSET: f"lesion in the {table[value]}" for value in narrowed}


LABEL_TABLE: dict[int, str] = _label_table()
"""Value -> name of every label the synthetic generator writes (lesions only narrow the canal and the foramina)."""


MASKS_DIR = "segmentation"
"""The folder of a dataset (beside ``train_images/``) that holds its label volumes."""
LABELS_JSON = "labels.json"
"""The table of :data:`LABEL_TABLE` written in :data:`MASKS_DIR`."""


def mask_file(root: str | Path, split: str, study_id: int, series_id: int) -> Path:
    """``<root>/segmentation/<split>_images/<study_id>/<series_id>.npz``: one sagittal series' label volume, with
    ``labels`` (int16, n_slices x rows x cols on the series' DICOM grid) and ``instance_number`` (n_slices,)."""
    return Path(root) / MASKS_DIR / f"{split}_images" / str(study_id) / f"{series_id}.npz"


def label_table_json() -> dict:
    """What ``labels.json`` holds: every value's name, the lesion offset and the semantic classes."""
    return {
        "values": {str(value): name for value, name in sorted(LABEL_TABLE.items())},
        "lesion_offset": LESION_OFFSET,
        "semantic_classes": list(SEMANTIC_CLASSES),
        "spider": "vertebrae 1..25 and discs 201..225 from the bottom, canal 100 (lumbar_ray.segment.labels)",
    }
