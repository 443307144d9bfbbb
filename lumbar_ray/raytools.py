"""The small Ray helper every stage shares: connecting once, and keeping Ray Train's per-report lines quiet."""

from __future__ import annotations

import logging
import os


def ensure_ray() -> None:
    """Connect to Ray once: the cluster named by ``RAY_ADDRESS`` (set inside ``ray job submit``; ``auto`` joins
    a node's running cluster), else a fresh local instance.

    Never an implicit ``ray.init()``: it would try to join whatever cluster ``/tmp/ray`` last recorded, even a
    dead one left by an earlier ``ray start``.
    """
    import ray

    if not ray.is_initialized():
        # log_to_driver: training workers' per-epoch lines and actors' warnings reach the console / job logs.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def quiet_ray_train_info() -> None:
    """One progress line per epoch (ours) instead of Ray Train's INFO line per report and per checkpoint, which
    ``log_to_driver`` would forward; some of Ray Train's loggers are named by file path, not module."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
