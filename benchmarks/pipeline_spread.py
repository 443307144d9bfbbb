"""The run-to-run spread of the CI-sized pipeline's figures: the margins of the end-to-end tests' thresholds.

Runs the ``trained_pipeline`` fixture's pipeline (``tests/pipeline.py``) several times, each in its own process
and local Ray instance, with the given thread counts and seed offsets, and prints every asserted figure per run
with its min, max and spread. Another machine's floating-point path (other CPU, other thread count) changes the
tiny detectors' training the way a thread count or a seed does here.

    OMP_NUM_THREADS is set per run; e.g.
    python benchmarks/pipeline_spread.py --runs 2:0 1:0 2:1 1:2 --out /tmp/spread   # threads:seed_offset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_RUN = """
import json, logging, sys
import ray
sys.path.insert(0, {repo!r})
from tests.pipeline import pipeline_config, pipeline_figures
from lumbar_ray.pipeline import run_quickstart
logging.basicConfig(level=logging.WARNING)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
cfg = pipeline_config(__import__("pathlib").Path({workdir!r}), seed_offset={seed})
print("FIGURES " + json.dumps(pipeline_figures(run_quickstart(cfg, tune=False))))
"""


def run_once(threads: int, seed: int, workdir: Path) -> dict[str, float]:
    """One pipeline run in a fresh process with ``OMP_NUM_THREADS=threads``; its figures."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RAY_AUTH_MODE": "disabled"}
    code = ONE_RUN.format(repo=str(REPO), workdir=str(workdir), seed=seed)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run threads={threads} seed={seed} failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("FIGURES "))
    return json.loads(line.removeprefix("FIGURES ")) | {"seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["2:0", "1:0", "2:1", "1:2"], help="threads:seed_offset")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the runs' workdirs and figures.json")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        threads, seed = (int(part) for part in spec.split(":"))
        figures = run_once(threads, seed, args.out / f"t{threads}_s{seed}")
        rows.append({"threads": threads, "seed": seed} | figures)
        print(f"threads={threads} seed={seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)
    (args.out / "figures.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'figure':<26} {'min':>8} {'max':>8} {'spread':>8}")
    for name in rows[0]:
        if name in ("threads", "seed"):
            continue
        values = [row[name] for row in rows]
        print(f"{name:<26} {min(values):>8.4f} {max(values):>8.4f} {max(values) - min(values):>8.4f}")


if __name__ == "__main__":
    main()
