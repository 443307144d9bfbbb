"""Benchmark: the Ray Train worker loop against a bare PyTorch loop, same model, data and machine, one run.

Both sides build the fold with the very same :func:`lumbar_ray.train.steps.build_fold` and run each epoch with
the very same :func:`lumbar_ray.train.steps.run_epoch` (crops cut from the preprocessing cache, augmented), so the
difference is what Ray Train adds: ``prepare_model``/``prepare_data_loader``, the worker process, per-epoch
``ray.train.report`` with a checkpoint (the bare loop saves the same state with ``torch.save``).

Figures, steady state (the first epoch is warm-up and left out):

- training samples/s inside ``train_epoch``;
- whole-epoch samples/s: train + validation + checkpoint/report, from epoch start to the next epoch's start;
- wall time of the whole fold, Ray's start-up included (a fixed cost, not a rate).

Target (issue 4): Ray's overhead under 10 % on 1 worker. The bare loop runs before and after Ray; its mean is used.

    python benchmarks/train.py --studies 150 --epochs 4 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side (= Ray worker CPUs)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return parser.parse_args()


def bench_config(workdir: Path, studies: int, epochs: int, threads: int):
    from lumbar_ray.config import Config

    return Config.model_validate({
        "workdir": str(workdir),
        "synth": {"train_studies": studies, "test_studies": 1, "image_sizes": [128], "seed": 11},
        "preprocess": {"image_size": 128, "workers": 1},
        "cv": {"n_folds": 3, "seed": 0},
        "train": {"epochs": epochs, "num_workers": 1, "cpus_per_worker": threads, "max_failures": 0,
                  "run_id": f"bench-{time.time_ns()}"},
        "tracking": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "register_model": False},
    })  # fmt: skip


def bare_loop(cfg, payload, out: Path) -> dict[str, list[float]]:
    """The same epochs as the Ray worker loop, in this process, without Ray."""
    import torch

    from lumbar_ray.train.steps import build_fold, run_epoch, training_state

    torch.manual_seed(cfg.train.seed)
    fold = build_fold(cfg, payload, torch.device("cpu"))
    figures: dict[str, list[float]] = {"train": [], "epoch_start": [], "samples": []}
    for epoch_index in range(cfg.train.epochs):
        metrics = run_epoch(fold, epoch_index).metrics
        state = training_state(fold) | {"epoch": epoch_index}  # what the worker checkpoints, minus predictions
        torch.save(state, out / "state.pt")
        figures["epoch_start"].append(metrics["epoch_started_at"])
        figures["train"].append(metrics["train_samples_per_s"])
        figures["samples"].append(metrics["train_samples"])
    figures["epoch_start"].append(time.time())
    return figures


def ray_loop(cfg, payload) -> tuple[dict[str, list[float]], float]:
    """One fold on Ray Train with one worker; per-epoch figures from the checkpointed history."""
    from lumbar_ray.train.cv import build_trainer
    from lumbar_ray.train.worker import FoldJob, load_checkpoint_state

    start = time.perf_counter()
    result = build_trainer(cfg, FoldJob(0, payload), cfg.train.run_id).fit()
    wall = time.perf_counter() - start
    history = load_checkpoint_state(result.checkpoint)["history"]
    print(f"Ray worker: {history[0]['torch_threads']} torch threads")
    figures = {
        "train": [entry["train_samples_per_s"] for entry in history],
        "epoch_start": [entry["epoch_started_at"] for entry in history],
        "samples": [entry["train_samples"] for entry in history],
    }
    return figures, wall


def steady(figures: dict[str, list[float]]) -> tuple[float, float]:
    """(training samples/s, whole-epoch samples/s) over epochs 1.. (epoch 0 warms up).

    Whole epochs are measured between consecutive epoch starts, so the last epoch (no next start on the Ray
    side) is left out of that figure.
    """
    train = float(np.mean(figures["train"][1:]))
    starts, samples = figures["epoch_start"], figures["samples"]
    epochs = [samples[i] / (starts[i + 1] - starts[i]) for i in range(1, len(starts) - 1) if i < len(samples)]
    return train, float(np.mean(epochs))


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import ray
    import torch

    from lumbar_ray.paths import run_dir_for
    from lumbar_ray.pipeline import complete_cache
    from lumbar_ray.train.inputs import fold_payload, prepare_inputs

    torch.set_num_threads(args.threads)  # Ray gives its worker OMP_NUM_THREADS = its CPUs: the same here
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = bench_config(workdir.resolve(), args.studies, args.epochs, args.threads)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    complete_cache(cfg)
    inputs = prepare_inputs(cfg, run_dir_for(cfg, cfg.train.run_id))
    payload = fold_payload(inputs, 0)
    n_train = len(payload.train_ids)

    t0 = time.perf_counter()
    bare_a = bare_loop(cfg, payload, workdir)
    bare_wall_a = time.perf_counter() - t0
    ray_figures, ray_wall = ray_loop(cfg, payload)
    t0 = time.perf_counter()
    bare_b = bare_loop(cfg, payload, workdir)
    bare_wall_b = time.perf_counter() - t0

    bare_train = np.mean([steady(bare_a)[0], steady(bare_b)[0]])
    bare_epoch = np.mean([steady(bare_a)[1], steady(bare_b)[1]])
    ray_train, ray_epoch = steady(ray_figures)
    bare_wall = (bare_wall_a + bare_wall_b) / 2
    print(f"fold 0: {n_train} training studies x 25 targets, crops {cfg.crop.slices}x{cfg.crop.size}^2, "
          f"model {cfg.model.arch}, {args.epochs} epochs, {args.threads} threads per side, 1 Ray worker")  # fmt: skip
    print(f"{'':<30} {'bare':>10} {'ray':>10} {'ray/bare':>9}")
    print(f"{'training samples/s':<30} {bare_train:>10.2f} {ray_train:>10.2f} {ray_train / bare_train:>9.3f}")
    print(f"{'whole-epoch samples/s':<30} {bare_epoch:>10.2f} {ray_epoch:>10.2f} {ray_epoch / bare_epoch:>9.3f}")
    print(f"{'fold wall s (with start-up)':<30} {bare_wall:>10.1f} {ray_wall:>10.1f} {ray_wall / bare_wall:>9.3f}")
    print(f"bare runs, training samples/s: {steady(bare_a)[0]:.2f} before Ray, {steady(bare_b)[0]:.2f} after")
    overhead = 1 - ray_epoch / bare_epoch
    print(
        f"Ray Train overhead per epoch: {100 * overhead:.1f} % (target < 10 %): {'met' if overhead < 0.1 else 'MISSED'}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
