"""2.5D crops around each target's point: points from the label coordinates, the crop itself, the dataset.

A study item is 25 crops in :data:`TARGETS` order, one per target, each ``slices`` adjacent slices of the series
the target's point lies on, centred on the point's slice, a ``region`` cache-pixel square around the point
resampled to ``size x size``. This is the 2.5D input of the strongest RSNA 2024 solutions: spinal canal crops
come from the mid-line Sagittal T2/STIR slices of the point, foraminal crops from the lateral Sagittal T1 slices
around the labelled point, subarticular crops from the Axial T2 slices around the level's point. Because the
point carries its series and slice, the crop is simply cut around the point in its own series; where the points
come from is an argument (a POINTS frame), so inference can pass predicted points instead of the labelled ones.
A crop's slices all come from the point's own block of slices (:func:`point_block`): an axial series made of
several blocks (tilted per level, or one orientation with gaps) never mixes two blocks in one crop.

With ``region_mm`` the square's side is that many millimetres instead, converted to cache pixels with the pixel
spacing of the point's own slice (:func:`crop_region`): the crop shows the same anatomy whatever the study's field
of view, where a cache-pixel square is a share of each series' field of view. The point jitter stays in cache
pixels (:mod:`lumbar_ray.data.augment`): it stands for a localiser's error, which is measured in cache pixels.

POINTS frame: one row per ``(study_id, target)`` with ``study_id`` (int), ``target`` (int 0..24), ``series_id``
(int), ``slice`` (int, index into the cached volume), ``x``, ``y`` (float, cache pixels; x = column, y = row).

A target without a point gets an all-zero crop, ``mask`` False and an :data:`IGNORE_INDEX` label: it drops out
of the loss, never its study.

Second view (``crop.second_view``): the item then holds ``25 * 2`` crops, view-major: the 25 crops above in
:data:`TARGETS` order, then each target's second view in the same order, cut by the same code from the level's
axial slices (:func:`second_view_points`: the spinal canal between the level's two subarticular points, each
foramen at its side's subarticular point; subarticular targets have none, their second crop stays all-zero, as
does any second view whose points are missing). Each crop draws its own jitter, bounded by the series type it is
cut on, and the flip swaps the sided targets within each block of 25
(:func:`lumbar_ray.data.augment.flip_permutation`). ``labels`` and ``mask`` stay 25 wide: a target is masked only
when it has no view at all. Because the second-view points derive from a study's own points, labelled and
predicted points give second views by one rule.

Slice targets (the auxiliary slice loss, :mod:`lumbar_ray.losses`): given the label points (``slice_points``),
an item also says, per target, at which index of its crop's ``S`` slices the labelled slice lies
(``slice_target``, :func:`slice_target`). The crop is centred on the (jittered) point's slice, so a slice jitter
of ``+j`` moves the labelled slice from the centre ``S // 2`` to ``S // 2 - j``; a left/right flip reverses the
slice axis of sagittal crops and swaps the sided targets, and the targets follow
(:func:`lumbar_ray.data.augment.flip_slice_targets`). It is :data:`IGNORE_INDEX` where it is unknown: no crop, no
label point, a label point on another series than the crop's (crops cut at predicted points), or a labelled
slice outside the crop (jittered out of it, or in another block of the series).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lumbar_ray.config import AugmentConfig, CropConfig
from lumbar_ray.constants import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    IGNORE_INDEX,
    LEVEL_TITLES,
    LEVELS,
    POINT_COLUMNS,
    SECOND_VIEW_SOURCES,
    TARGETS,
    target_index,
)
from lumbar_ray.data.augment import Augmenter, AugmentParams, flip_slice_targets
from lumbar_ray.data.cache import CachedSeries, SeriesCache

logger = logging.getLogger(__name__)

SKIPPED_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "reason")
PROGRESS_MIN_SERIES = 50  # fewer series map in well under a second: no progress bar

_CONDITION_KEYS = {title: key for key, title in CONDITION_TITLES.items()}
_LEVEL_KEYS = {title: key for key, title in LEVEL_TITLES.items()}


# --- points


@dataclass
class PointsResult:
    """The mapped label points and the coordinate rows that could not be used.

    Attributes:
        points: POINTS frame (see the module docstring), sorted by study and target.
        skipped: one row per unused coordinate row: ``study_id``, ``series_id``, ``instance_number``,
            ``condition``, ``level`` (as in the coordinates file) and ``reason``.
    """

    points: pd.DataFrame
    skipped: pd.DataFrame

    def reasons(self) -> dict[str, int]:
        """Skipped rows counted by reason."""
        return {str(k): int(v) for k, v in self.skipped["reason"].value_counts().items()}


def _empty_points() -> pd.DataFrame:
    frame = pd.DataFrame({column: pd.Series(dtype="int64") for column in POINT_COLUMNS})
    return frame.astype({"x": "float64", "y": "float64"})


def _skip(row, reason: str) -> dict:
    return {
        "study_id": int(row.study_id),
        "series_id": int(row.series_id),
        "instance_number": int(row.instance_number),
        "condition": str(row.condition),
        "level": str(row.level),
        "reason": reason,
    }


def _with_targets(coordinates: pd.DataFrame) -> pd.DataFrame:
    """The coordinates with a ``target`` column (-1 where the condition or level is unknown), in file order."""
    frame = coordinates.reset_index(drop=True).copy()
    targets = []
    for condition, level in zip(frame["condition"].astype(str), frame["level"].astype(str), strict=True):
        key, lvl = _CONDITION_KEYS.get(condition), _LEVEL_KEYS.get(level)
        targets.append(-1 if key is None or lvl is None else target_index(key, lvl))
    frame["target"] = np.asarray(targets, dtype=np.int64)
    return frame


def _progress(iterable, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=description, unit="series", leave=False, disable=total < PROGRESS_MIN_SERIES
    )


def _usable_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Rows with a known target, the first of each ``(study, target)``; the others as skipped rows with a reason."""
    skipped = [_skip(row, "unknown condition or level") for row in frame[frame["target"] < 0].itertuples(index=False)]
    frame = frame[frame["target"] >= 0]
    duplicate = frame.duplicated(["study_id", "target"], keep="first")
    if duplicate.any():
        logger.info("%d coordinate rows repeat a (study, target): the first row of each is kept", int(duplicate.sum()))
    skipped += [_skip(row, "duplicate (study, target): first row kept")
                for row in frame[duplicate].itertuples(index=False)]  # fmt: skip
    return frame[~duplicate], skipped


def _map_series_points(
    entry: CachedSeries, group: pd.DataFrame, study_id: int, series_id: int, description: str | None
) -> tuple[list[dict], list[dict], int]:
    """The label points of one series in cache pixels, the rows that do not map (with the reason), and how many
    mapped points belong to a condition read on another series type than ``description``."""
    size = int(entry.meta.size)
    rows, skipped, mismatched = [], [], 0
    for row in group.itertuples(index=False):
        try:
            index, x, y = entry.original_to_cache(int(row.instance_number), float(row.x), float(row.y))
        except KeyError:
            skipped.append(_skip(row, "instance not in the cached series"))
            continue
        if not (-0.5 <= x <= size - 0.5 and -0.5 <= y <= size - 0.5):
            skipped.append(_skip(row, "point outside the image"))
            continue
        mismatched += description != CONDITION_SERIES[_CONDITION_KEYS[str(row.condition)]]
        rows.append({"study_id": study_id, "target": int(row.target), "series_id": series_id, "slice": index,
                     "x": x, "y": y})  # fmt: skip
    return rows, skipped, mismatched


def points_from_coordinates(coordinates: pd.DataFrame, cache: SeriesCache, series: pd.DataFrame) -> PointsResult:
    """Map the ground-truth label coordinates (original pixels) to POINTS in the cache grid.

    Each series' metadata is read once. A row is skipped, with its reason, when its condition or level is
    unknown, it repeats a ``(study, target)`` already seen (the first row in file order is kept), its series is
    not in ``series`` or not in the cache, its instance is not in the cached series, or its point maps outside
    the cached image.

    Args:
        coordinates: ``train_label_coordinates`` (study_id, series_id, instance_number, condition as
            "Spinal Canal Stenosis", level as "L1/L2", x, y in the instance's original pixels).
        cache: the cache version the crops will be cut from.
        series: ``train_series_descriptions`` (study_id, series_id, series_description).

    Returns:
        The POINTS frame and the skipped rows.
    """
    frame, skipped = _usable_rows(_with_targets(coordinates))
    listed = set(zip(series["study_id"].astype(int), series["series_id"].astype(int), strict=True))
    descriptions = dict(zip(series["series_id"].astype(int), series["series_description"].astype(str), strict=True))
    cached = cache.cached_keys()
    rows: list[dict] = []
    mismatched = 0
    groups = frame.groupby(["study_id", "series_id"], sort=True)
    for (study_id, series_id), group in _progress(groups, groups.ngroups, "mapping label points"):
        entry, reason = _series_entry(cache, int(study_id), int(series_id), listed, cached)
        if entry is None:
            skipped.extend(_skip(row, reason) for row in group.itertuples(index=False))
            continue
        mapped, not_mapped, other_type = _map_series_points(entry, group, int(study_id), int(series_id),
                                                            descriptions.get(int(series_id)))  # fmt: skip
        rows += mapped
        skipped += not_mapped
        mismatched += other_type
    if mismatched:
        # Kept: the point is still a valid point of its own series; the crop just shows another contrast.
        logger.warning("%d label points lie on a series of another type than their condition's", mismatched)
    points = pd.DataFrame(rows, columns=list(POINT_COLUMNS)) if rows else _empty_points()
    points = points.astype({"study_id": "int64", "target": "int64", "series_id": "int64", "slice": "int64"})
    points = points.sort_values(["study_id", "target"], kind="stable").reset_index(drop=True)
    result = PointsResult(points, pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)))
    logger.info(
        "label points: %d mapped, %d skipped %s", len(result.points), len(result.skipped), result.reasons() or ""
    )
    return result


def _series_entry(
    cache: SeriesCache, study_id: int, series_id: int, listed: set, cached: set
) -> tuple[CachedSeries | None, str]:
    """The series' cache entry for point mapping (metadata only), or ``None`` and the reason."""
    if (study_id, series_id) not in listed:
        return None, "series not in the series descriptions"
    if (study_id, series_id) not in cached:
        return None, "series not in the cache manifest"
    try:
        meta = cache.read_meta(study_id, series_id)
    except (OSError, ValueError) as error:  # listed by the manifest but gone or damaged since
        logger.warning("cache entry %s/%s unreadable: %s", study_id, series_id, error)
        return None, "series entry missing from the cache"
    # Mapping needs only the per-slice geometry: skip loading the volume (a download on a remote cache).
    return CachedSeries(volume=np.zeros((0, 0, 0), dtype=np.uint8), meta=meta), ""


# --- second views


def _second_view_sources() -> pd.DataFrame:
    """One row per second view and point placing it: ``served`` target, ``source`` target (same level) and the
    source's ``rank`` (0 = preferred) in :data:`~lumbar_ray.constants.SECOND_VIEW_SOURCES`."""
    rows = [{"served": target_index(condition, level), "source": target_index(source, level), "rank": rank}
            for condition, sources in SECOND_VIEW_SOURCES.items() for level in LEVELS
            for rank, source in enumerate(sources)]  # fmt: skip
    return pd.DataFrame(rows, columns=["served", "source", "rank"])


def second_view_points(points: pd.DataFrame) -> pd.DataFrame:
    """Each study's second-view points, derived from its own points (labelled and predicted ones alike).

    The second view of a target lies where the points of its sources
    (:data:`~lumbar_ray.constants.SECOND_VIEW_SOURCES`, at the same level) lie: on the series and slice of its
    preferred source that has a point, at the mean ``(x, y)`` of the sources on that same series. So the spinal
    canal's second view at a level is midway between the level's left and right subarticular points (on the left
    one's slice when a reader put them on two), else at the one that exists: the canal, which lies between the
    recesses, whether the points are labelled or predicted; a foramen's is its side's subarticular point; no
    source point (and no subarticular target) means no second view. Rows without coordinates and repeated
    ``(study_id, target)`` rows are dropped first, as the dataset drops them (:func:`usable_points`).

    Args:
        points: POINTS frame.

    Returns:
        POINTS frame whose ``target`` is the target each point serves, sorted by study and target.
    """
    frame = usable_points(points).merge(_second_view_sources(), left_on="target", right_on="source")
    if frame.empty:
        return _empty_points()
    frame = frame.sort_values(["study_id", "served", "rank"], kind="stable")
    keys = ["study_id", "served"]
    frame = frame[frame["series_id"] == frame.groupby(keys)["series_id"].transform("first")]
    served = frame.groupby(keys, as_index=False).agg(series_id=("series_id", "first"), slice=("slice", "first"),
                                                     x=("x", "mean"), y=("y", "mean"))  # fmt: skip
    served = served.rename(columns={"served": "target"})[list(POINT_COLUMNS)]
    return served.astype(_empty_points().dtypes.to_dict()).reset_index(drop=True)


# --- one crop


def crop_region(cfg: CropConfig, series: CachedSeries, index: int) -> tuple[float, float]:
    """``(x, y)`` sides, in cache pixels, of the region a crop around a point on slice ``index`` cuts.

    ``cfg.region`` on both axes; with ``cfg.region_mm``, that many millimetres through the slice's own millimetres
    per cache pixel (:meth:`~lumbar_ray.data.cache.CachedSeries.mm_per_pixel`; the two axes differ where the cache
    resized a non-square image or the pixels are not square). A slice without PixelSpacing falls back to
    ``cfg.region``, with a warning.
    """
    if cfg.region_mm is None:
        return cfg.region, cfg.region
    try:
        mm_x, mm_y = series.mm_per_pixel(int(np.clip(index, 0, len(series.meta.slices) - 1)))
    except (ValueError, IndexError) as error:
        logger.warning("crop.region_mm: %s; this crop cuts crop.region=%d cache pixels", error, cfg.region)
        return cfg.region, cfg.region
    return cfg.region_mm / float(mm_x), cfg.region_mm / float(mm_y)


def crop_affine(
    x: float,
    y: float,
    cfg: CropConfig,
    angle_deg: float = 0.0,
    zoom: float = 1.0,
    region: tuple[float, float] | None = None,
) -> np.ndarray:
    """The 2x3 matrix mapping crop pixels ``(u, v)`` to cache pixels ``(x, y)`` (cv2's inverse map).

    The crop centre lands on the point; one crop pixel covers ``region / zoom / size`` cache pixels (per axis:
    ``region`` is ``(x, y)``, None = ``cfg.region`` on both); a positive angle turns the content counter-clockwise
    as displayed (rows down), like :func:`cv2.getRotationMatrix2D`. The rotation acts on the crop's square before
    the per-axis scaling, so a region of equal millimetres on pixels that are not square stays a square in mm.
    """
    region_x, region_y = (cfg.region, cfg.region) if region is None else region
    step_x, step_y = region_x / zoom / cfg.size, region_y / zoom / cfg.size
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    linear = np.array([[cos * step_x, -sin * step_x], [sin * step_y, cos * step_y]])
    centre = (cfg.size - 1) / 2.0
    offset = np.array([x, y]) - linear @ np.array([centre, centre])
    return np.hstack([linear, offset[:, None]])


def crop_slices(slice: int, count: int, n: int, bounds: tuple[int, int] | None = None) -> np.ndarray:
    """The volume index of each of a crop's ``count`` slices: ``slice - count//2 .. slice + count//2``, indices
    outside ``bounds`` (None = ``0 .. n``) repeating its edge slice. ``n`` must be positive."""
    first, stop = (0, n) if bounds is None else (max(0, bounds[0]), min(n, bounds[1]))
    return np.clip(np.arange(slice - count // 2, slice + count // 2 + 1), first, stop - 1)


def slice_target(label_slice: int, indices: np.ndarray, centre: int) -> int:
    """Where the labelled slice lies in a crop: the position of ``label_slice`` in ``indices``, else IGNORE_INDEX.

    Args:
        label_slice: volume index of the slice the label point lies on.
        indices: the crop's slices (:func:`crop_slices`).
        centre: the crop's (jittered) centre slice.

    Returns:
        ``label_slice - (centre - S//2)`` when that position shows the labelled slice. Where the crop repeats an
        edge slice of its block (the centre jittered near or past the block's end), the labelled slice can fill
        several positions: the one nearest that unclamped position is taken. :data:`IGNORE_INDEX` when the crop
        does not show the labelled slice at all.
    """
    positions = np.flatnonzero(indices == label_slice)
    if len(positions) == 0:
        return IGNORE_INDEX
    unclamped = label_slice - (centre - len(indices) // 2)
    return int(positions[np.argmin(np.abs(positions - unclamped))])


def crop_stack(
    volume: np.ndarray,
    slice: int,
    x: float,
    y: float,
    cfg: CropConfig,
    angle_deg: float = 0.0,
    zoom: float = 1.0,
    bounds: tuple[int, int] | None = None,
    region: tuple[float, float] | None = None,
) -> np.ndarray:
    """Cut the 2.5D crop of one target.

    Args:
        volume: uint8 ``(n, H, W)`` cached volume (a memory map is fine: only the rows needed are read).
        slice: index of the centre slice; the stack is ``slice - S//2 .. slice + S//2``, indices outside
            ``bounds`` repeat its edge slice.
        x: point column, cache pixels (may lie outside the image: the outside is zero).
        y: point row, cache pixels.
        cfg: output size, region and number of slices.
        angle_deg: in-plane rotation (content turns counter-clockwise as displayed).
        zoom: magnification; > 1 cuts a smaller region.
        bounds: ``(start, stop)``: the only slices the crop may use, those of the point's own block
            (:meth:`~lumbar_ray.data.cache.SeriesMeta.block_bounds`); None = the whole volume.
        region: ``(x, y)`` sides of the region cut, cache pixels (:func:`crop_region`); None = ``cfg.region``.

    Returns:
        float32 ``(cfg.slices, cfg.size, cfg.size)`` in [0, 1].
    """
    n, height, width = volume.shape
    out = np.zeros((cfg.slices, cfg.size, cfg.size), dtype=np.float32)
    if n == 0:
        return out
    matrix = crop_affine(x, y, cfg, angle_deg, zoom, region)
    # Read only the bounding box of the rotated square (plus the interpolation margin), not the whole slice.
    half = 0.5 * (cfg.region if region is None else max(region)) / zoom * math.sqrt(2.0) + 2.0
    x0, x1 = max(0, math.floor(x - half)), min(width, math.ceil(x + half) + 1)
    y0, y1 = max(0, math.floor(y - half)), min(height, math.ceil(y + half) + 1)
    if x0 >= x1 or y0 >= y1:
        return out  # the whole region lies outside the image
    matrix[:, 2] -= (x0, y0)
    indices = crop_slices(slice, cfg.slices, n, bounds)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for k, index in enumerate(indices):
        patch = np.ascontiguousarray(volume[index, y0:y1, x0:x1], dtype=np.float32)
        out[k] = cv2.warpAffine(
            patch, matrix, (cfg.size, cfg.size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0
        )
    out *= 1.0 / 255.0
    return np.clip(out, 0.0, 1.0, out=out)


# --- the dataset


def point_block(series: CachedSeries, slice: int) -> tuple[int, int]:
    """``(start, stop)`` of the block of slices a point on ``slice`` belongs to: its crop's slices come from there.

    The point's own (labelled or located) slice fixes the block, before any slice jitter: a jittered or edge
    crop repeats its block's end slice rather than reaching into a neighbouring block, whose slices are another
    orientation or another level (:meth:`~lumbar_ray.data.cache.SeriesMeta.block_bounds`).
    """
    n = len(series.meta.slices)
    if n == 0:
        return 0, len(series.volume)
    return series.meta.block_bounds(int(np.clip(slice, 0, n - 1)))


def usable_points(points: pd.DataFrame) -> pd.DataFrame:
    """The rows of a POINTS frame that place a crop: those with both coordinates, the first of each
    ``(study_id, target)`` (a repeat is logged)."""
    frame = points[points[["x", "y"]].notna().all(axis=1)]
    repeated = frame.duplicated(["study_id", "target"], keep="first")
    if repeated.any():
        logger.warning("POINTS frame repeats %d (study, target) pairs: the first of each is used", int(repeated.sum()))
        frame = frame[~repeated]
    return frame


def _point_arrays(study_ids: np.ndarray, points: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """Per study and target: series id, slice, (x, y) and whether a point exists."""
    n = len(study_ids)
    series = np.full((n, len(TARGETS)), -1, dtype=np.int64)
    slices = np.zeros((n, len(TARGETS)), dtype=np.int64)
    xy = np.zeros((n, len(TARGETS), 2), dtype=np.float64)
    mask = np.zeros((n, len(TARGETS)), dtype=bool)
    row_of = {int(study): i for i, study in enumerate(study_ids)}
    frame = usable_points(points[points["study_id"].isin(row_of)])
    rows = frame["study_id"].map(row_of).to_numpy(dtype=np.int64)
    targets = frame["target"].to_numpy(dtype=np.int64)
    series[rows, targets] = frame["series_id"].to_numpy(dtype=np.int64)
    slices[rows, targets] = frame["slice"].to_numpy(dtype=np.int64)
    xy[rows, targets] = frame[["x", "y"]].to_numpy(dtype=np.float64)
    mask[rows, targets] = True
    return series, slices, xy, mask


def _view_arrays(study_ids: np.ndarray, points: pd.DataFrame, views: int) -> tuple[np.ndarray, ...]:
    """:func:`_point_arrays` of every crop: ``(n, 25 * views)`` view-major, the points themselves, then (two
    views) their :func:`second_view_points`."""
    points = usable_points(points[points["study_id"].isin(study_ids)])  # once, so a repeat is logged once
    view_points = [points]
    if views > 1:
        view_points.append(second_view_points(points))
    arrays = [_point_arrays(study_ids, frame) for frame in view_points]
    return tuple(np.concatenate(parts, axis=1) for parts in zip(*arrays, strict=True))


class CropDataset(Dataset):
    """One item per study: its ``25 * crop.views`` crops, 25 labels and target mask (see the module docstring).

    Volumes are opened per item (memory-mapped on a local cache), so the dataset holds no file handle: it
    pickles (Ray ships it, DataLoader workers may spawn) and forks safely.

    Args:
        cache: the cache version the points refer to.
        study_ids: the studies of this dataset, in item order.
        points: POINTS frame (may hold other studies; those are ignored).
        crop: crop geometry.
        labels: ``(n, 25)`` int64 labels aligned with ``study_ids`` (IGNORE_INDEX = empty); None = unlabelled.
        augment: training augmentations; None = deterministic evaluation crops.
        seed: base seed of the augmentation stream (per item ``[seed, epoch, index]``).
        slice_points: POINTS frame of the label points, whose slices the ``slice_target`` of an item locates in
            its crops (see the module docstring); may be ``points`` itself when the crops are cut at the label
            points. None = no slice targets (all IGNORE_INDEX): the points' slices are not known to be true.
    """

    def __init__(
        self,
        cache: SeriesCache,
        study_ids: Sequence[int] | np.ndarray,
        points: pd.DataFrame,
        crop: CropConfig,
        labels: np.ndarray | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        slice_points: pd.DataFrame | None = None,
    ) -> None:
        self.cache = cache
        self.study_ids = np.asarray(study_ids, dtype=np.int64).reshape(-1)
        self.crop = crop
        if labels is None:
            labels = np.full((len(self.study_ids), len(TARGETS)), IGNORE_INDEX, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(self.study_ids), len(TARGETS)):
            raise ValueError(f"labels must have shape ({len(self.study_ids)}, {len(TARGETS)}), got {labels.shape}")
        self.labels = labels
        self.augmenter = Augmenter(augment) if augment is not None else None
        self.seed = int(seed)
        # Per crop (25 * views, view-major): the point's series, slice, (x, y) and whether it exists.
        self.series, self.slices, self.xy, self.mask = _view_arrays(self.study_ids, points, crop.views)
        # The label points' series and slices (of the targets' own crops): -1 series (never a crop's) where no
        # label point is known.
        if slice_points is None:
            shape = (len(self.study_ids), len(TARGETS))
            self.label_series, self.label_slices = np.full(shape, -1, np.int64), np.zeros(shape, np.int64)
        else:
            self.label_series, self.label_slices, _, _ = _point_arrays(self.study_ids, slice_points)
        # Shared memory: DataLoader workers (forked, spawned or persistent) see the epoch set on the main copy.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        own = self.mask[:, : len(TARGETS)]
        logger.info("crop dataset: %d studies, %d of %d crop points missing", len(self), int((~own).sum()), own.size)
        if crop.views > 1:  # only the spinal and foraminal targets can have one
            possible = len(self) * len(SECOND_VIEW_SOURCES) * len(LEVELS)
            logger.info("second views: %d of %d possible", int(self.mask[:, len(TARGETS) :].sum()), possible)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # A plain pickle (Ray shipping the dataset) copies the epoch tensor: share it again so that DataLoader
        # workers forked from this copy still follow set_epoch. Torch's own pickler keeps it shared.
        if not self._epoch.is_shared():
            self._epoch.share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch (call before iterating it)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.study_ids)

    def params(self, index: int) -> AugmentParams:
        """The augmentation draw of item ``index`` in the current epoch (identity without augmentation)."""
        if self.augmenter is None:
            return AugmentParams.identity(self.mask.shape[1])
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.augmenter.sample(rng, self.mask.shape[1])

    def _volumes(self, index: int, mask: np.ndarray) -> tuple[dict[int, CachedSeries], np.ndarray]:
        """The series of an item (each opened once); targets whose series is unreadable are dropped."""
        study_id = int(self.study_ids[index])
        volumes: dict[int, CachedSeries] = {}
        mask = mask.copy()
        for series_id in np.unique(self.series[index][mask]):
            try:
                volumes[int(series_id)] = self.cache.read(study_id, int(series_id), mmap=True)
            except (OSError, ValueError) as error:  # lose the targets of that series, never the study
                logger.warning(
                    "study %s: series %s unreadable (%s); its targets are masked", study_id, series_id, error
                )
                mask &= self.series[index] != series_id
        return volumes, mask

    def _slice_target(self, index: int, target: int, series: CachedSeries, centre: int, bounds: tuple[int, int]) -> int:
        """Where the labelled slice lies in ``target``'s own crop (:func:`slice_target`), IGNORE_INDEX where the
        label point is unknown or on another series than the crop's."""
        if self.label_series[index, target] != self.series[index, target] or len(series.volume) == 0:
            return IGNORE_INDEX
        indices = crop_slices(centre, self.crop.slices, len(series.volume), bounds)
        return slice_target(int(self.label_slices[index, target]), indices, centre)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        params = self.params(index)
        volumes, crop_mask = self._volumes(index, self.mask[index])
        slices, xs, ys = Augmenter.jitter_points(self.slices[index], self.xy[index, :, 0], self.xy[index, :, 1], params)
        crops = np.zeros((len(crop_mask), self.crop.slices, self.crop.size, self.crop.size), dtype=np.float32)
        slice_targets = np.full(len(TARGETS), IGNORE_INDEX, dtype=np.int64)
        for c in np.flatnonzero(crop_mask):
            series = volumes[int(self.series[index, c])]
            bounds = point_block(series, int(self.slices[index, c]))
            crops[c] = crop_stack(
                series.volume,
                int(slices[c]),
                float(xs[c]),
                float(ys[c]),
                self.crop,
                angle_deg=float(params.angle_deg[c]),
                zoom=float(params.zoom[c]),
                bounds=bounds,
                region=crop_region(self.crop, series, int(self.slices[index, c])),
            )
            if c < len(TARGETS):  # the slice targets are about each target's own crop (the first view) only
                slice_targets[c] = self._slice_target(index, c, series, int(slices[c]), bounds)
        labels = np.where(_target_mask(crop_mask), self.labels[index], IGNORE_INDEX).astype(np.int64)
        if self.augmenter is not None:
            crops, labels, crop_mask = self.augmenter.apply(crops, labels, crop_mask, params)
            if params.flip:
                slice_targets = flip_slice_targets(slice_targets, self.crop.slices)
        return {
            "crops": torch.from_numpy(np.ascontiguousarray(crops)),
            "labels": torch.from_numpy(labels),
            "mask": torch.from_numpy(np.ascontiguousarray(_target_mask(crop_mask))),
            "slice_target": torch.from_numpy(slice_targets),
            "study_id": torch.tensor(int(self.study_ids[index]), dtype=torch.int64),
        }


def _target_mask(crop_mask: np.ndarray) -> np.ndarray:
    """``(25,)`` whether each target has a crop in any view, from the ``(25 * views,)`` mask of the crops."""
    return crop_mask.reshape(-1, len(TARGETS)).any(axis=0)
