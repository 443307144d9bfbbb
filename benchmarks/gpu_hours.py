"""Benchmark: the expected GPU hours of one fold of a config, from the FLOPs its model costs per study.

Counts, with ``torch.utils.flop_counter``, the floating-point operations of one forward pass of one study at the
config's crop geometry and model (in eval mode too, where the test-time flip doubles it), takes a training step as
three forwards (the backward computes the gradients of the inputs and of the weights, each about a forward; torch's
counter cannot be used for it: it ignores the groups of a grouped convolution's backward, so it counts a
depthwise convolution's backward as many times too high as the convolution has channels), measures how long a
training step takes on this machine's CPU, and turns the counts into GPU hours per fold::

    fold FLOPs = epochs x (training studies x step FLOPs + validation studies x prediction FLOPs)
    GPU hours  = fold FLOPs / (peak FLOP/s x utilisation) / 3600

The peak and the utilisation are assumptions, printed with the estimate (``--peak-tflops``, ``--mfu``): the default
peak is an A10G's dense bf16 tensor rate (the GPU of the g5 nodes in ``cluster.yaml``), and the default utilisation
is a conservative share for a small convolutional backbone on 128 px crops. Where the task is lent a GPU, measure
instead; this is what a machine without one can say::

    python benchmarks/gpu_hours.py --config configs/rsna-gpu.yaml --studies 1975
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger("gpu_hours")

RSNA_TRAIN_STUDIES = 1975  # train.csv of the RSNA 2024 competition
A10G_BF16_TFLOPS = 70.0  # the g5 nodes' GPU (cluster.yaml): dense bf16 tensor peak, TFLOP/s
ASSUMED_MFU = 0.2  # a conservative share of the peak for a small convolutional backbone on 128 px crops


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--config", type=Path, default=Path("configs/rsna-gpu.yaml"), help="the config to cost")
    parser.add_argument("--studies", type=int, default=RSNA_TRAIN_STUDIES, help="labelled studies of the data")
    parser.add_argument("--peak-tflops", type=float, default=A10G_BF16_TFLOPS, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--mfu", type=float, default=ASSUMED_MFU, help="the share of the peak the training sustains")
    return parser.parse_args()


def study_crops(cfg):
    """One study's input: ``(1, 25 x views, S, H, W)`` random crops of the config's geometry."""
    import torch

    from lumbar_ray.constants import TARGETS

    return torch.rand(1, len(TARGETS) * cfg.crop.views, cfg.crop.slices, cfg.crop.size, cfg.crop.size)


BACKWARD_PER_FORWARD = 2.0  # gradients of the activations and of the weights, each about a forward


def forward_flops(model, crops, train: bool) -> int:
    """FLOPs of one forward of ``model`` on ``crops``, in training or in eval mode (the test-time flip)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train(train)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(crops)
    return int(counter.get_total_flops())


def cpu_seconds(model, crops, repeats: int = 2) -> float:
    """The fastest of ``repeats`` training steps (forward and backward) of one study on this CPU, in seconds."""
    model.train()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model(crops).float().sum().backward()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lumbar_ray.config import load_config
    from lumbar_ray.models import build_model

    cfg = load_config(args.config, ["model.pretrained=false", *args.overrides])  # the FLOPs do not need weights
    model = build_model(cfg.model, cfg.crop)
    crops = study_crops(cfg)
    step = int(forward_flops(model, crops, train=True) * (1 + BACKWARD_PER_FORWARD))
    prediction = forward_flops(model, crops, train=False)
    seconds = cpu_seconds(model, crops)
    folds = cfg.cv.n_folds
    val_studies = args.studies / folds
    train_studies = args.studies - val_studies
    fold_flops = cfg.train.epochs * (train_studies * step + val_studies * prediction)
    sustained = args.peak_tflops * 1e12 * args.mfu
    hours = fold_flops / sustained / 3600
    lines = [
        f"# GPU hours of `{args.config}` {' '.join(args.overrides)}".rstrip(),
        "",
        f"model {cfg.model.arch} (in_chans {cfg.model.in_chans}, pool {cfg.model.pool}, test-time flip "
        f"{cfg.model.tta_flip}), crops {tuple(crops.shape[1:])} per study",
        f"one study: training step {step / 1e9:.1f} GFLOP, prediction {prediction / 1e9:.1f} GFLOP; "
        f"the step takes {seconds:.2f} s on this CPU ({step / seconds / 1e9:.0f} GFLOP/s)",
        f"one fold: {cfg.train.epochs} epochs x ({train_studies:.0f} training + {val_studies:.0f} validation "
        f"studies) = {fold_flops / 1e15:.1f} PFLOP",
        f"assumed: {args.peak_tflops:g} TFLOP/s peak x {args.mfu:g} utilisation = {sustained / 1e12:.1f} TFLOP/s",
        f"estimate: {hours:.2f} GPU hours per fold ({hours * folds:.1f} for {folds} folds; "
        f"{hours * 60 / cfg.train.num_workers:.0f} min wall per fold on {cfg.train.num_workers} GPUs with DDP)",
    ]
    print("\n".join(lines))  # a benchmark's report is its output


if __name__ == "__main__":
    main()
