"""Benchmark: feeding a GPU: studies/s one CPU core prepares against studies/s one GPU consumes, side by side.

CPU side, measured. The trainer's own loaders (:func:`lumbar_ray.train.steps.fold_loaders`: the ``CropDataset`` of
25 x 5-slice crops per study, augmented for training, and DataLoader's default collate, ``train.batch_size``
studies a batch) run at ``configs/rsna-gpu.yaml``'s crop and augment settings over fold 0 of a small synthetic
cache at the config's ``preprocess.image_size``. They run here, in this process, with every thread pool at one
thread (torch, OpenCV, BLAS): one process on one core, which is what one DataLoader worker process of a training
worker is. Three item paths:

- training items (augmented), volumes memory-mapped from a local cache;
- the same, each series read whole, as ``SeriesCache.read`` reads a remote cache directly (training reads its
  node-local copy instead, the first path; network and TLS not included);
- validation items (deterministic crops, no augmentation), memory-mapped.

Figures are studies per CPU second of this process (user + system time: other jobs on a shared machine do not
count) and per wall second, over ``--passes`` passes of each, taking turns, after a warm-up pass of each.

GPU side, ESTIMATED where no GPU is lent: the studies/s one GPU consumes follows from the FLOPs of the config's
model per study, as ``benchmarks/gpu_hours.py`` counts them (a training step = 3 forwards; a prediction with the
flip), at an assumed sustained rate (``--peak-tflops`` x ``--mfu``: an A10G's dense bf16 peak at 20 % by default):

    GPU studies/s = peak FLOP/s x utilisation / FLOPs per study

Cores of this machine per GPU = GPU studies/s / studies/s of one core, per path (training, validation); the worst
path, divided by what one CPU of the training node does beside one core here (``--core-share``: 0.4 for a g5
vCPU, assumed) and times the chance that the GPU is faster than estimated (``--gpu-upside``: 2), rounded up, is
``train.loader_workers``; ``train.cpus_per_worker`` is that plus 2 (the training process: step loop, NCCL,
pin-memory thread; and its reads). The script prints both beside what the config sets; ``benchmarks/README.md``
argues the headroom. Run from the repository root (the FLOP count builds the real model without weights)::

    python benchmarks/loader.py --studies 40 --passes 3
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one process = one core, as a DataLoader worker

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from gpu_hours import (  # noqa: E402  (benchmarks/ is the script's folder, so on sys.path)
    A10G_BF16_TFLOPS,
    ASSUMED_MFU,
    BACKWARD_PER_FORWARD,
    forward_flops,
    study_crops,
)

from lumbar_ray.config import Config, load_config  # noqa: E402

logger = logging.getLogger("loader")

# A g5.12xlarge vCPU (cluster.yaml's gpu_worker) against one core of this development machine, ASSUMED, not
# measured: a hyperthread of a 2nd-generation EPYC (Zen 2, 3.3 GHz) whose sibling is busy yields ~0.6 of its core,
# and a Zen 2 core does ~1/1.6 of the work of this machine's Zen 5 core (AMD's +19 %, +13 %, +16 % per generation).
G5_VCPU_SHARE = 0.4
TRAINER_CPUS = 2  # beside the loaders: the training process (step loop, NCCL, pin-memory thread) and its reads


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--config", type=Path, default=Path("configs/rsna-gpu.yaml"), help="the config to feed")
    parser.add_argument("--studies", type=int, default=40, help="synthetic studies cached (fold 0 trains on 4/5)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over each loader, after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=A10G_BF16_TFLOPS, help="the GPU's dense bf16 peak")
    parser.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="the share of the peak the training sustains")
    parser.add_argument("--core-share", type=float, default=G5_VCPU_SHARE, help="a node CPU / one core here")
    parser.add_argument("--gpu-upside", type=float, default=2.0, help="how much faster than estimated the GPU may be")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    return parser.parse_args()


def bench_config(path: Path, workdir: Path, studies: int, overrides: list[str]) -> Config:
    """The config at ``path`` with only what points it at a small local synthetic cache changed.

    The crop, augment, model and batch settings stay the config's. ``train.loader_workers=0`` makes this process
    cut the items (the one core measured); ``train.use_gpu=false`` only drops ``pin_memory``, which the training
    process's pin thread does, not the loader processes; ``model.pretrained=false``: FLOPs need no weights.
    """
    return load_config(path, [
        f"workdir={workdir}", "data.root=null", f"preprocess.cache={workdir / 'cache'}", "preprocess.workers=1",
        f"synth.train_studies={studies}", "synth.test_studies=0", "train.loader_workers=0", "train.use_gpu=false",
        "model.pretrained=false", *overrides,
    ])  # fmt: skip


def build_cache(cfg) -> None:
    """Write the config's synthetic dataset and cache its training series in this process (no Ray: nothing else
    should compete for the cores), with the library's own preprocessing and manifest."""
    import pandas as pd

    from lumbar_ray.config import cache_settings
    from lumbar_ray.data.cache import SeriesCache, manifest_row
    from lumbar_ray.data.preprocess import process_row, series_items
    from lumbar_ray.paths import cache_root_for
    from lumbar_ray.pipeline import prepare_data

    root = prepare_data(cfg)
    cache = SeriesCache(cache_root_for(cfg), cache_settings(cfg.preprocess))
    cache.prepare()
    rows = []
    for item in series_items(root, splits=["train"]):
        if process_row(item, cache, cfg.preprocess)["status"] in ("done", "recovered"):
            rows.append(manifest_row(cache.read_meta(item["study_id"], item["series_id"])))
    cache.write_manifest(pd.DataFrame(rows))
    logger.info("cached %d series of %d studies at %d px under %s", len(rows), cfg.synth.train_studies,
                cfg.preprocess.image_size, cache.path)  # fmt: skip


def _series_cache_class():
    from lumbar_ray.data.cache import SeriesCache

    class WholeReads(SeriesCache):
        """A local cache read the way an ``s3://`` one is: each series' bytes in full, then parsed (no mmap)."""

        def read(self, study_id: int, series_id: int, mmap: bool = False):
            return super().read(study_id, series_id, mmap=False)

    return WholeReads


@dataclass
class Rate:
    """Studies delivered by a loader and the CPU and wall seconds they took."""

    studies: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.studies / self.cpu_s

    @property
    def per_wall_s(self) -> float:
        return self.studies / self.wall_s


def drain(loader, rate: Rate) -> None:
    """One pass over ``loader``, its studies and seconds added to ``rate``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in loader:
        rate.studies += len(batch["labels"])
    rate.cpu_s += time.process_time() - cpu
    rate.wall_s += time.perf_counter() - wall


def loader_rates(cfg, passes: int) -> dict[str, Rate]:
    """Per-core rates of the three item paths (module docstring), on the same fold in one run.

    The paths take turns, one pass each per round, so that a shared machine's noise falls on all of them alike;
    round 0 warms up (page cache, memory maps, the allocator's thresholds) and is not counted. Each round is a
    new epoch: a new augmentation stream, as ``run_epoch`` sets it.
    """
    import cv2
    import torch

    from lumbar_ray.paths import cv_run_id, run_dir_for
    from lumbar_ray.train.inputs import fold_payload, prepare_inputs
    from lumbar_ray.train.steps import fold_loaders

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    payload = fold_payload(prepare_inputs(cfg, run_dir_for(cfg, cv_run_id(cfg))), 0)
    train_set, train_loader, val_loader = fold_loaders(cfg, payload)
    caches = {"mmap": train_set.cache, "whole": _series_cache_class()(payload.cache_root, payload.cache_settings)}
    paths = {
        "training items (mmap, local cache)": (train_loader, "mmap"),
        "training items (whole series, as s3://)": (train_loader, "whole"),
        "validation items (mmap, no augmentation)": (val_loader, "mmap"),
    }
    rates = {name: Rate() for name in paths}
    for epoch in range(passes + 1):
        train_set.set_epoch(epoch)
        for name, (loader, reads) in paths.items():
            train_set.cache = caches[reads]
            drain(loader, rates[name] if epoch else Rate())
        logger.info("round %d of %d done", epoch, passes)
    return rates


def gpu_rates(cfg, sustained_flops: float) -> tuple[dict[str, float], dict[str, float]]:
    """(GFLOP per study, estimated GPU studies/s) for a training step and for a prediction, by gpu_hours' count."""
    from lumbar_ray.models import build_model

    model = build_model(cfg.model, cfg.crop)
    crops = study_crops(cfg)
    flops = {"training": forward_flops(model, crops, train=True) * (1 + BACKWARD_PER_FORWARD),
             "validation": float(forward_flops(model, crops, train=False))}  # fmt: skip
    return {k: v / 1e9 for k, v in flops.items()}, {k: sustained_flops / v for k, v in flops.items()}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_loader_")))
        cfg = bench_config(args.config, workdir.resolve(), args.studies, args.overrides)
        build_cache(cfg)
        rates = loader_rates(cfg, args.passes)
    logger.info("counting the model's FLOPs per study (one forward in training mode, one with the flip)")
    sustained = args.peak_tflops * 1e12 * args.mfu
    gflops, gpu = gpu_rates(cfg, sustained)

    crop_mb = study_crops(cfg).numel() * 4 / 2**20
    phase = {name: "validation" if name.startswith("validation") else "training" for name in rates}
    lines = [
        f"# Feeding a GPU: `{args.config}` {' '.join(args.overrides)}".rstrip(),
        "",
        f"crops {cfg.crop.views * 25} x {cfg.crop.slices} x {cfg.crop.size}^2 per study ({crop_mb:.1f} MiB float32) "
        f"from a {cfg.preprocess.image_size} px cache, region {cfg.crop.region} px, batch {cfg.train.batch_size}; "
        f"fold 0 of {args.studies} synthetic studies, {args.passes} passes; one process, one thread",
        f"GPU side ESTIMATED, not measured: {args.peak_tflops:g} TFLOP/s peak x {args.mfu:g} utilisation = "
        f"{sustained / 1e12:.1f} TFLOP/s sustained; model {cfg.model.arch}: training step {gflops['training']:.0f} "
        f"GFLOP/study -> {gpu['training']:.1f} studies/s, prediction {gflops['validation']:.0f} GFLOP/study -> "
        f"{gpu['validation']:.1f} studies/s",
        "",
        f"{'item path':<42} {'studies':>7} {'CPU s':>7} {'wall s':>7} {'/CPU s':>7} {'/wall s':>7} "
        f"{'GPU/s (est.)':>12} {'cores/GPU':>9}",
    ]
    needs = {name: gpu[phase[name]] / rate.per_cpu_s for name, rate in rates.items()}
    for name, rate in rates.items():
        figures = f"{rate.studies:>7} {rate.cpu_s:>7.2f} {rate.wall_s:>7.2f} "
        figures += f"{rate.per_cpu_s:>7.2f} {rate.per_wall_s:>7.2f}"
        lines.append(f"{name:<42} {figures} {gpu[phase[name]]:>12.1f} {needs[name]:>9.2f}")
    worst = max(needs.values())
    headroom = worst / args.core_share * args.gpu_upside
    loaders = math.ceil(headroom)
    shipped = load_config(args.config).train
    lines += [
        "",
        f"cores of this machine per GPU (worst path): {worst:.2f}; / {args.core_share:g} (a node CPU's share of one "
        f"here) x {args.gpu_upside:g} (the GPU that much faster than estimated) = {headroom:.2f}",
        f"-> train.loader_workers = {loaders}, train.cpus_per_worker = {loaders + TRAINER_CPUS} (+ the training "
        f"process and its reads); x {shipped.num_workers} GPUs = {shipped.num_workers * (loaders + TRAINER_CPUS)} "
        f"CPUs of a node. {args.config} sets {shipped.loader_workers} and {shipped.cpus_per_worker:g}",
    ]
    print("\n".join(lines))  # a benchmark's report is its output


if __name__ == "__main__":
    main()
