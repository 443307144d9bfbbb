"""Benchmark: write a synthetic RSNA-format dataset of 200 studies on one core.

Target (issue 2): 200 studies in under a minute on one core. Run:

    python benchmarks/synthesize.py --studies 200

Numeric libraries are pinned to one thread and the process to one CPU (where the OS allows), so the figure is
a one-core figure even on a bigger machine.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lumbar_ray.config import SynthConfig  # noqa: E402
from lumbar_ray.data.synthetic import write_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(train_studies=args.studies, test_studies=0, seed=args.seed)
        start = time.perf_counter()
        result = write_dataset(Path(tmp) / "synthetic", cfg)
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    print(f"studies           {args.studies}")
    print(f"DICOM files       {result.files}")
    print(f"dataset size      {size / 2**20:.1f} MiB")
    print(f"wall time         {seconds:.1f} s on one core")
    print(f"studies/s         {args.studies / seconds:.2f}")
    print(f"slices/s          {result.files / seconds:.0f}")
    verdict = "met" if seconds * 200 / args.studies < 60 else "MISSED"
    print(f"target            < 60 s per 200 studies: {verdict}")


if __name__ == "__main__":
    main()
