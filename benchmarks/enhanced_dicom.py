"""Check that the reader gives the same volume and geometry from classic and Enhanced MR exports of one scan.

The public repository ``neurolabusc/dcm_qa_sag`` holds, in ``In/XA30/``, one Siemens XA30 sagittal EPI acquisition
exported both ways: ``classic/<n>_.../`` (one file per slice, one folder per volume) and ``enhanced/<m>_.../`` (one
multi-frame file per volume, named by its last classic instance). This script pairs them and compares, per pair,
the slice count, the volume (max absolute difference) and each slice's position, orientation and pixel spacing.

Usage (not part of the test suite: it needs that repository's files, about 60 MB)::

    git clone https://github.com/neurolabusc/dcm_qa_sag && python benchmarks/enhanced_dicom.py dcm_qa_sag/In/XA30
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from lumbar_ray.data.dicom import DicomSeries, read_series

logger = logging.getLogger("enhanced_dicom")


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    """(classic folder, enhanced file) of each volume: classic ``<s><k:03d>`` folders in order against the enhanced
    series' files in order, per acquisition (series ``5`` is classic ``5001..5005``)."""
    pairs = []
    for enhanced_dir in sorted((root / "enhanced").iterdir()):
        series = enhanced_dir.name.split("_", 1)[0]
        classic = sorted(p for p in (root / "classic").iterdir() if p.name.split("_", 1)[0].startswith(series + "00"))
        files = sorted(enhanced_dir.glob("*.dcm"))
        if len(classic) != len(files):
            raise SystemExit(f"{enhanced_dir}: {len(files)} enhanced files but {len(classic)} classic folders")
        pairs += list(zip(classic, files, strict=True))
    return pairs


def _geometry_difference(a: DicomSeries, b: DicomSeries) -> float:
    """Largest absolute difference over every slice's position, orientation and pixel spacing."""
    worst = 0.0
    for ga, gb in zip(a.stacks[0].geometry, b.stacks[0].geometry, strict=True):
        for field in ("position", "orientation", "pixel_spacing"):
            worst = max(worst, float(np.max(np.abs(np.subtract(getattr(ga, field), getattr(gb, field))))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="dcm_qa_sag's In/XA30 folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    same_geometry = same_pixels = 0
    pairs = _pairs(args.root)
    for classic_dir, enhanced_file in pairs:
        classic, enhanced = read_series(classic_dir), read_series([enhanced_file])
        shapes = (classic.stacks[0].volume.shape, enhanced.stacks[0].volume.shape)
        if len(classic.stacks) != 1 or len(enhanced.stacks) != 1 or shapes[0] != shapes[1]:
            logger.info("%s vs %s: stacks %d/%d, shapes %s", classic_dir.name, enhanced_file.name,
                        len(classic.stacks), len(enhanced.stacks), shapes)  # fmt: skip
            continue
        geometry = _geometry_difference(classic, enhanced)
        pixels = float(np.max(np.abs(classic.stacks[0].volume - enhanced.stacks[0].volume)))
        same_geometry += geometry < 1e-4
        same_pixels += pixels == 0.0
        logger.info("%-32s vs %-42s %s slices, geometry max |diff| %.2g, pixels max |diff| %.3g", classic_dir.name,
                    f"{enhanced_file.parent.name}/{enhanced_file.name}", shapes[0], geometry, pixels)  # fmt: skip
    logger.info("%d pairs: geometry identical (<1e-4) in %d, pixels identical in %d", len(pairs), same_geometry,
                same_pixels)  # fmt: skip


if __name__ == "__main__":
    main()
