"""An export in nnU-Net v2's raw-dataset layout, for users who want nnU-Net itself::

    Dataset<id>_<name>/dataset.json
    Dataset<id>_<name>/imagesTr/<case>_0000.mha     one channel per case
    Dataset<id>_<name>/labelsTr/<case>.mha

nnU-Net needs consecutive class ids from 0: the labels are the :func:`~lumbar_ray.segment.labels.semantic` classes
(background, vertebra, disc, canal, foramen, lesion), declared up to the highest one any case holds (SPIDER masks
hold no foramen or lesion, so they stop at the canal). Images keep their geometry (SimpleITK writes it into the
``.mha`` headers, which nnU-Net's SimpleITKIO reads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lumbar_ray.segment.labels import SEMANTIC_CLASSES, semantic
from lumbar_ray.segment.spider import SpiderCase, case_images

logger = logging.getLogger(__name__)

FILE_ENDING = ".mha"


def export_nnunet(cases: Iterable[SpiderCase], out: str | Path, dataset_id: int = 501, name: str = "LumbarRay") -> Path:
    """Write cases with labels (project or SPIDER values) as an nnU-Net raw dataset.

    Args:
        cases: e.g. :func:`~lumbar_ray.segment.spider.dataset_cases` or :func:`~lumbar_ray.segment.spider.read_spider`
            over a SPIDER folder; every case needs labels.
        out: the ``nnUNet_raw`` folder the dataset goes into.
        dataset_id: nnU-Net's three-digit dataset id.
        name: the dataset's name (letters, digits, ``_``).

    Returns:
        The ``Dataset<id>_<name>`` folder.

    Raises:
        ValueError: on a case without labels, a repeated case name, no case, or a bad id or name.
    """
    import SimpleITK as sitk

    if not 1 <= dataset_id <= 999 or not name.replace("_", "").isalnum():
        raise ValueError(f"nnU-Net needs a dataset id in 1..999 and an alphanumeric name, not {dataset_id}, {name!r}")
    root = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    highest = 0
    for case in cases:
        classes = _checked_classes(case, names)
        highest = max(highest, int(classes.max()))
        image, labels = case_images(case, classes)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case.name}_0000{FILE_ENDING}"), useCompression=True)
        sitk.WriteImage(labels, str(root / "labelsTr" / f"{case.name}{FILE_ENDING}"), useCompression=True)
    if not names:
        raise ValueError("no case to export")
    (root / "dataset.json").write_text(json.dumps(dataset_json(len(names), highest, name), indent=2))
    logger.info("exported %d cases with %d classes to %s", len(names), highest + 1, root)
    return root


def _checked_classes(case: SpiderCase, names: set[str]) -> np.ndarray:
    """The case's semantic classes (uint8), after checking it has labels and a new name."""
    if case.labels is None:
        raise ValueError(f"case {case.name} has no labels")
    if case.name in names:
        raise ValueError(f"case {case.name} appears twice")
    names.add(case.name)
    return semantic(case.labels)


def dataset_json(n_training: int, highest_class: int, name: str) -> dict:
    """nnU-Net v2's ``dataset.json``: one MRI channel, the semantic classes 0..``highest_class``, ``.mha`` files."""
    return {
        "name": name,
        "description": "lumbar spine MRI from lumbar_ray (lumbar_ray.segment.labels.semantic classes)",
        "channel_names": {"0": "MRI"},
        "labels": {label: index for index, label in enumerate(SEMANTIC_CLASSES[: highest_class + 1])},
        "numTraining": n_training,
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
    }
