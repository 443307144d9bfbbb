"""Helpers of the data tests: cache metadata of multi-stack series built by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumbar_ray.data.cache import SeriesMeta, SliceTable, StackMeta

ORIGIN = np.array([-40.0, -40.0, 0.0])


def stacked_meta(
    stacks: Sequence[tuple[float, Sequence[float]]],
    size: int = 32,
    series_id: int = 1,
    dicom: dict | None = None,
    spacing: tuple[float, float] = (1.0, 1.0),
    scale: tuple[float, float] = (1.0, 1.0),
) -> SeriesMeta:
    """The metadata of a cached Axial T2 series built by hand, one stack per ``(tilt_degrees, offsets_mm)``.

    A stack's slices lie at ``offsets_mm`` along its normal (tilted about the patient's x axis, as per-level axial
    blocks are), with 1 mm pixels on a ``size x size`` grid cached at scale 1 unless ``spacing`` (PixelSpacing:
    row, column mm) and ``scale`` (cache pixels per original pixel: y, x) say otherwise; stacks follow each other
    in the volume, as the cache stores them.
    """
    rows, metas = [], []
    for stack_index, (tilt_degrees, offsets) in enumerate(stacks):
        tilt = np.deg2rad(tilt_degrees)
        orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
        normal = np.cross(orientation[:3], orientation[3:])
        start = len(rows)
        for offset in offsets:
            position = ORIGIN + offset * normal
            number = len(rows) + 1
            original = (round(size / scale[0]), round(size / scale[1]))
            rows.append((number, stack_index, tuple(float(v) for v in position), orientation, tuple(spacing),
                         original, tuple(scale), False, float(position @ normal), f"{number}.dcm"))  # fmt: skip
        metas.append(StackMeta(start, len(rows), orientation, tuple(float(v) for v in normal)))
    slices = SliceTable(*zip(*rows, strict=True))
    return SeriesMeta(size, (0.0, 1.0), tuple(metas), slices, dict(dicom or {}), (), study_id=1, series_id=series_id,
                      split="train", series_description="Axial T2")  # fmt: skip
