"""Benchmark: DICOM preprocessing, side by side in one run on the same files.

(a) the floor: ``pydicom.dcmread(f).pixel_array`` over every file, one process;
(b) a plain sequential Python loop doing the full preprocessing (read_series + normalise + resize + write);
(c) the Ray Data pipeline (``run_on_ray``) with an actor pool of 1 and of 2 workers.

Targets (issue 3): per-worker throughput of (c) >= 0.8x the floor (a); 2 workers >= 1.7x one worker.

    python benchmarks/preprocess.py --studies 40 --size 384                   # uncompressed (decode ~ memcpy)
    python benchmarks/preprocess.py --studies 20 --size 384 --compress j2k    # JPEG 2000 lossless, as many PACS

The Ray figures include starting the actor pool; the fixed cost of that is measured separately on a single
series and reported, with the marginal throughput beyond it.

Numeric libraries are pinned to one thread per process so that one worker is one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import pydicom  # noqa: E402

from lumbar_ray.config import (  # noqa: E402
    PreprocessConfig,
    SynthConfig,
    cache_settings,
)
from lumbar_ray.data.cache import SeriesCache  # noqa: E402
from lumbar_ray.data.preprocess import process_row, run_on_ray, series_items  # noqa: E402
from lumbar_ray.data.synthetic import write_dataset  # noqa: E402

cv2.setNumThreads(1)


def floor(files: list[Path]) -> float:
    """Seconds to read and decode every file with pydicom alone."""
    start = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    return time.perf_counter() - start


def sequential(items: list[dict], cache_root: Path, cfg: PreprocessConfig) -> float:
    """Seconds for the same preprocessing as the pipeline, in a plain loop."""
    cache = SeriesCache(cache_root, cache_settings(cfg))
    cache.prepare()
    start = time.perf_counter()
    for item in items:
        assert process_row(item, cache, cfg)["status"] == "done"
    return time.perf_counter() - start


def pipeline(items: list[dict], cache_root: Path, cfg: PreprocessConfig) -> float:
    """Seconds for the Ray Data pipeline (actors started inside the timing: a real run pays for them)."""
    cache = SeriesCache(cache_root, cache_settings(cfg))
    cache.prepare()
    start = time.perf_counter()
    statuses = run_on_ray(items, cache, cfg)
    assert all(s["status"] == "done" for s in statuses)
    return time.perf_counter() - start


def compress(files: list[Path], codec: str) -> None:
    """Re-encode the synthetic files in place (JPEG 2000 lossless or RLE), as real archives often store them."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    syntax = {"j2k": JPEG2000Lossless, "rle": RLELossless}[codec]
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the synthetic DICOM images")
    parser.add_argument("--image-size", type=int, default=256, help="cached in-plane size")
    parser.add_argument("--compress", choices=["none", "j2k", "rle"], default="none", help="transfer syntax")
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="lumbar_ray_bench_"))
    try:
        synth = SynthConfig(train_studies=args.studies, test_studies=0, image_sizes=[args.size], seed=1)
        root = write_dataset(work / "rsna", synth).root
        items = series_items(root)
        files = sorted((root / "train_images").rglob("*.dcm"))
        if args.compress != "none":
            compress(files, args.compress)
        floor(files)  # warm the page cache so that every variant reads from memory
        cfg = PreprocessConfig(image_size=args.image_size)
        timings = {
            "(a) pydicom decode floor": floor(files),
            "(b) sequential preprocessing": sequential(items, work / "seq", cfg),
            "(c) Ray Data, 1 worker": pipeline(items, work / "ray1", cfg.model_copy(update={"workers": 1})),
            "(c) Ray Data, 2 workers": pipeline(items, work / "ray2", cfg.model_copy(update={"workers": 2})),
        }
        startup = {w: pipeline(items[:1], work / f"start{w}", cfg.model_copy(update={"workers": w})) for w in (1, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    n = len(files)
    rate = {name: n / seconds for name, seconds in timings.items()}
    print(
        f"{len(items)} series, {n} slices of {args.size}x{args.size} ({args.compress}), "
        f"cached at {args.image_size}x{args.image_size}"
    )
    for name, seconds in timings.items():
        print(f"  {name:<32} {seconds:7.2f} s  {rate[name]:8.1f} slices/s")
    floor_rate = rate["(a) pydicom decode floor"]
    one, two = rate["(c) Ray Data, 1 worker"], rate["(c) Ray Data, 2 workers"]
    print(f"  sequential / floor               {rate['(b) sequential preprocessing'] / floor_rate:.2f}x")
    print(f"  Ray 1 worker / floor (per worker) {one / floor_rate:.2f}x   (target >= 0.80)")
    print(f"  Ray 2 workers / floor (per worker) {two / 2 / floor_rate:.2f}x   (target >= 0.80)")
    print(f"  2 workers / 1 worker              {two / one:.2f}x   (target >= 1.70)")
    marginal = {w: n / (timings[f"(c) Ray Data, {w} worker{'s' if w > 1 else ''}"] - startup[w]) for w in (1, 2)}
    print(f"  fixed cost of a run (1 series)    1 worker {startup[1]:.2f} s, 2 workers {startup[2]:.2f} s")
    print(f"  beyond it: 1 worker / floor       {marginal[1] / floor_rate:.2f}x")
    print(f"  beyond it: 2 workers / floor      {marginal[2] / 2 / floor_rate:.2f}x per worker")
    print(f"  beyond it: 2 workers / 1 worker   {marginal[2] / marginal[1]:.2f}x")


if __name__ == "__main__":
    main()
