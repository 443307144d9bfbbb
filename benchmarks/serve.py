"""Benchmark: a bounded load test of ``lumbar-ray serve`` on loopback, beside the single-process pyfunc.

Starts the Serve app locally on a registered study-level model, posts one study (zipped) ``--requests`` times with
``--concurrency`` requests in flight, and prints the errors (there must be none), the p50 and p95 latency and the
studies per second; then loads the same model version with ``mlflow.pyfunc.load_model`` in this process and
predicts the same study ``--pyfunc-requests`` times one after another, and prints its studies per second and the
ratio of the two, measured in the same run (machines are noisy: compare ratios, not seconds)::

    python benchmarks/serve.py --tracking-uri sqlite:///lumbar_ray_work/mlflow.db \\
        --model models:/lumbar_ray_quickstart@champion --study lumbar_ray_work/data/synthetic/test_images/<id>

Replicas and batching come from the ``serve.*`` overrides (``serve.num_replicas=2 serve.max_batch_size=8``).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger("serve_benchmark")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (serve.*)")
    parser.add_argument("--tracking-uri", required=True, help="the MLflow store holding the model")
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> of a study-level model")
    parser.add_argument("--study", type=Path, required=True, help="a study folder (<study_id>/<series>/<n>.dcm)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pyfunc-requests", type=int, default=20)
    return parser.parse_args()


def zipped(study: Path) -> bytes:
    """The study folder as a zip whose entries start with the study's folder name."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(study.rglob("*.dcm")):
            archive.write(path, path.relative_to(study.parent).as_posix())
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def load_test(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    """Post ``body`` ``requests`` times, ``concurrency`` at once; latencies, errors and throughput."""
    import httpx

    def one(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        response = client.post(f"{url}/v1/studies:predict", content=body, headers={"Content-Type": "application/zip"})
        return time.perf_counter() - start, response.status_code

    with httpx.Client(timeout=600) as client:
        one(0)  # warm-up: the first request pays for lazy imports in the replica
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - start
    latencies = [latency for latency, _ in results]
    return {"errors": sum(status != 200 for _, status in results), "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95), "studies_per_s": requests / seconds, "seconds": seconds}  # fmt: skip


def pyfunc_rate(model_uri: str, tracking_uri: str, study: Path, requests: int) -> float:
    """Studies per second of the study-level pyfunc predicting ``study`` in this process, one after another."""
    import mlflow
    import pandas as pd

    from lumbar_ray.registry import model_source

    model = mlflow.pyfunc.load_model(mlflow.artifacts.download_artifacts(model_source(model_uri, tracking_uri),
                                                                         tracking_uri=tracking_uri))  # fmt: skip
    frame = pd.DataFrame({"study_dir": [str(study)]})
    model.predict(frame)  # warm-up
    start = time.perf_counter()
    for _ in range(requests):
        model.predict(frame)
    return requests / (time.perf_counter() - start)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    from ray import serve

    from lumbar_ray.config import load_config
    from lumbar_ray.serve import run_serve

    cfg = load_config(None, [f"tracking.tracking_uri={args.tracking_uri}", f"serve.model={args.model}",
                             *args.overrides])  # fmt: skip
    url = run_serve(cfg, blocking=False)
    try:
        served = load_test(url, zipped(args.study), args.requests, args.concurrency)
    finally:
        serve.shutdown()
    single = pyfunc_rate(args.model, args.tracking_uri, args.study, args.pyfunc_requests)
    lines = [
        f"serve: {args.requests} requests, {args.concurrency} concurrent, replicas {cfg.serve.num_replicas}, "
        f"batch {cfg.serve.max_batch_size}",
        f"  errors {served['errors']}; latency p50 {served['p50_s']:.3f} s, p95 {served['p95_s']:.3f} s; "
        f"{served['studies_per_s']:.2f} studies/s ({served['seconds']:.1f} s)",
        f"pyfunc, one process, one study at a time: {single:.2f} studies/s",
        f"serve / pyfunc throughput: {served['studies_per_s'] / single:.2f}x",
    ]
    print("\n".join(lines))  # the report is this script's output
    sys.exit(1 if served["errors"] else 0)


if __name__ == "__main__":
    main()
