"""Benchmark: a CV with its folds one after another against the same CV with ``train.parallel_folds``, one run.

Both CVs train the same config (same data, folds and seeds) under two run ids, on one Ray instance. Printed:

- the wall time of each CV and their ratio;
- the largest difference between the two CVs' out-of-fold probabilities, and their OOF scores (the folds keep their
  own seeds, so they must agree to 1e-6);
- each fold's MLflow run (start and end) and the times of its first and last logged epoch, relative to the CV's
  start, and whether every fold's training overlapped every other's.

Ray is started with ``--cpus`` logical CPUs (default: one per fold, so that every fold's worker can be placed at
once); on fewer physical cores the folds share them, which the wall times show.

    python benchmarks/parallel_folds.py --studies 60 --epochs 3 --folds 3 --cpus 3
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("parallel_folds")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=None, help="Ray's logical CPUs; default: one per fold")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return parser.parse_args()


def bench_config(workdir: Path, studies: int, epochs: int, folds: int):
    """A small CV: the tiny classifier on 1 worker of 1 CPU per fold, no registration or detectors."""
    from lumbar_ray.config import Config

    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": studies, "test_studies": 1, "image_sizes": [96], "seed": 3},
        "preprocess": {"image_size": 96, "workers": 1},
        "cv": {"n_folds": folds, "seed": 0},
        "crop": {"size": 16, "region": 24, "slices": 3},
        "augment": {"jitter_measured": False},
        "train": {"epochs": epochs, "num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "register_model": False},
    })  # fmt: skip


def run(cfg, parallel: int, run_id: str):
    """One CV under ``run_id`` with ``parallel`` folds at once; (result, wall seconds)."""
    from lumbar_ray.train.cv import run_cv

    train = cfg.train.model_copy(update={"parallel_folds": parallel, "run_id": run_id})
    start = time.perf_counter()
    result = run_cv(cfg.model_copy(update={"train": train}))
    return result, time.perf_counter() - start


def fold_intervals(cfg, parent: str) -> dict[int, dict[str, float]]:
    """Per fold: its MLflow run's start and end, and its first and last epoch's metric times (seconds, epoch)."""
    from mlflow import MlflowClient

    from lumbar_ray.train.report import FOLD_TAG

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    intervals = {}
    for child in children:
        epochs = sorted(m.timestamp for m in client.get_metric_history(child.info.run_id, "val_score"))
        intervals[int(child.data.tags[FOLD_TAG])] = {
            "run_start": child.info.start_time / 1000, "run_end": child.info.end_time / 1000,
            "first_epoch": epochs[0] / 1000, "last_epoch": epochs[-1] / 1000,
        }  # fmt: skip
    return intervals


def all_overlap(intervals: dict[int, dict[str, float]], start: str, end: str) -> bool:
    """Whether every pair of folds was in ``[start, end]`` at a common time (the latest start before the first end)."""
    return max(i[start] for i in intervals.values()) < min(i[end] for i in intervals.values())


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    from lumbar_ray.pipeline import complete_cache
    from lumbar_ray.train.cv import assemble_oof

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="parallel_folds_"))
    cfg = bench_config(workdir, args.studies, args.epochs, args.folds)
    ray.init(num_cpus=args.cpus or args.folds, log_to_driver=False, configure_logging=False)
    complete_cache(cfg)
    stamp = time.strftime("%H%M%S")
    sequential, sequential_s = run(cfg, 1, f"pf-seq-{stamp}")
    parallel, parallel_s = run(cfg, args.folds, f"pf-par-{stamp}")
    ray.shutdown()

    study_ids = sequential.folds["study_id"].to_numpy()
    difference = np.abs(assemble_oof(study_ids, parallel.outcomes) - assemble_oof(study_ids, sequential.outcomes))
    print(f"{args.folds} folds, {args.studies} studies, {args.epochs} epochs, Ray CPUs {args.cpus or args.folds}")
    print(f"wall time: sequential {sequential_s:.1f} s, parallel_folds={args.folds} {parallel_s:.1f} s "
          f"(ratio {sequential_s / parallel_s:.2f}x)")  # fmt: skip
    print(f"OOF score: sequential {sequential.score.total:.6f}, parallel {parallel.score.total:.6f}; "
          f"largest OOF probability difference {difference.max():.2e}")  # fmt: skip
    for name, result in (("sequential", sequential), ("parallel", parallel)):
        intervals = fold_intervals(cfg, result.mlflow_run_id)
        origin = min(i["run_start"] for i in intervals.values())
        print(f"{name}: fold runs overlap {all_overlap(intervals, 'run_start', 'run_end')}, "
              f"epochs overlap {all_overlap(intervals, 'first_epoch', 'last_epoch')}")  # fmt: skip
        for fold, i in sorted(intervals.items()):
            print(f"  fold {fold}: run {i['run_start'] - origin:6.1f} .. {i['run_end'] - origin:6.1f} s, "
                  f"epochs logged {i['first_epoch'] - origin:6.1f} .. {i['last_epoch'] - origin:6.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
