"""Benchmark: the U-Net localiser against YOLO on the same held-out fold, one run.

On one synthetic dataset (the quickstart's, with masks; ``--preset hard`` for the hard one) and one preprocessing
cache, both localisers train on the studies outside ``localize.val_fold`` and place the points of the studies in
it. Printed side by side:

- the U-Net's held-out Dice per structure (``lumbar-ray segment``);
- per series type, each localiser's share of points within 5 and 10 cache px of the labelled point, and its slice
  exact and within one (the CV of :func:`lumbar_ray.localize.evaluate.summarise_errors`);
- with ``--cv``: for each localiser a CV (its training jitter measured from that localiser's held-out errors, as
  the quickstart trains), registered with it, and its held-out fold scored at the localiser's predicted points
  against the same models at the labelled points (and the prior) (:func:`lumbar_ray.pipeline.compare_points_on_fold`).

    python benchmarks/localize.py --workdir bench_localize --cv
    python benchmarks/localize.py --workdir bench_localize_hard --preset hard

Every stage is resumable: a rerun with the same workdir reuses what it finished.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

logger = logging.getLogger("localize_bench")

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--preset", choices=("easy", "hard"), default="easy")
    parser.add_argument("--studies", type=int, default=None, help="training studies; default: the quickstart's")
    parser.add_argument("--cv", action="store_true", help="also train, register and score a CV at U-Net points")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. segment.epochs=30)")
    return parser.parse_args()


def bench_config(args: argparse.Namespace):
    """The quickstart config with masks, on ``--preset``, in ``--workdir`` (MLflow in its SQLite)."""
    from lumbar_ray.config import load_config

    overrides = [f"workdir={args.workdir}", "synth.masks=true", f"synth.preset={args.preset}",
                 f"tracking.tracking_uri=sqlite:///{args.workdir.resolve()}/mlflow.db"]  # fmt: skip
    if args.studies:
        overrides.append(f"synth.train_studies={args.studies}")
    return load_config(ROOT / "configs" / "quickstart.yaml", [*overrides, *args.overrides])


def headline(summary: pd.DataFrame) -> pd.DataFrame:
    """The ``all``-levels row of each sagittal series type."""
    rows = summary[(summary["level"] == "all") & summary["series_type"].str.startswith("Sagittal")]
    columns = ["series_type", "points", "within_5px", "within_10px", "slice_accuracy", "slice_within_1"]
    return rows[columns].set_index("series_type")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args()
    from lumbar_ray.config import save_config
    from lumbar_ray.data.synthetic import write_dataset
    from lumbar_ray.paths import data_root_for
    from lumbar_ray.pipeline import complete_cache, localize, segment

    cfg = bench_config(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.workdir / "bench_config.yaml")
    write_dataset(data_root_for(cfg), cfg.synth)
    complete_cache(cfg)
    unet_cfg = cfg.model_copy(update={"localize": cfg.localize.model_copy(update={"method": "unet"})})

    started = time.perf_counter()
    yolo = localize(cfg)
    yolo_seconds = time.perf_counter() - started
    started = time.perf_counter()
    segmented = segment(unet_cfg)
    unet = localize(unet_cfg)
    unet_seconds = time.perf_counter() - started

    print(f"\n== localisation on the held-out fold {cfg.localize.val_fold} ({args.preset} preset) ==")
    print(segmented.format())
    table = pd.concat({"yolo": headline(yolo.summary), "unet": headline(unet.summary)}, axis=1)
    print(table.round(3).to_string())
    print(f"wall time (training + evaluation, reruns reuse): yolo {yolo_seconds:.0f} s, unet {unet_seconds:.0f} s")
    if args.cv:
        gaps = {name: cv_at_predicted_points(c) for name, c in (("unet", unet_cfg), ("yolo", cfg))}
        print(f"\n== the CV's held-out fold {cfg.localize.val_fold}: predicted - labelled points ==")
        for name, (comparison, gap) in gaps.items():
            print(
                f"{name}: {comparison.format()}; predicted - labelled {gap:+.5f} "
                f"(paired bootstrap SE over studies {comparison.gap_se():.5f})"
            )


def cv_at_predicted_points(cfg):
    """Train and register a CV whose training jitter is this localiser's held-out error (the recipe's
    ``augment.jitter_measured``); score its held-out fold at the localiser's points. (comparison, gap)."""
    from lumbar_ray.pipeline import compare_points_on_fold, with_measured_jitter
    from lumbar_ray.train.cv import run_cv
    from lumbar_ray.train.register import register_cv

    trained = with_measured_jitter(cfg)
    cv = run_cv(trained)
    if register_cv(trained, cv) is None:
        raise RuntimeError("the CV registered no model")
    comparison = compare_points_on_fold(trained, cv, cfg.localize.val_fold)
    return comparison, comparison.predicted_points.total - comparison.labelled_points.total


if __name__ == "__main__":
    main()
