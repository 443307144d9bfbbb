"""Fault tolerance on the real Ray Train: a training worker SIGKILLed mid-fold resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from lumbar_ray.train.cv import resolve_run_id, run_cv, storage_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def train_worker_pids() -> list[int]:
    """The processes of Ray Train's worker actors (their title is ``ray::RayTrainWorker...``)."""
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            pids.append(process.info["pid"])
    return pids


def registered_checkpoints(fold_dir: Path) -> int:
    """Checkpoints the Ray Train controller has registered for the fold (its snapshot lists them).

    A checkpoint folder on storage is not enough: a worker killed between uploading and the controller
    registering the report loses that checkpoint, and the restart rightly begins from scratch.
    """
    snapshot = fold_dir / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_a_worker_after_first_checkpoint(fold_dir: Path, killed: list[int], timeout: float = 600) -> None:
    """Wait until the controller holds a checkpoint of the fold, then SIGKILL one training worker."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoints(fold_dir):
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.05)


def test_worker_killed_mid_fold_resumes_from_its_checkpoint(ray_local, tmp_path, small_config):
    cfg = small_config(tmp_path, epochs=6, folds=[0], max_failures=2)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"register_model": False})})
    fold_dir = Path(storage_for(cfg)) / f"{resolve_run_id(cfg)}-fold0"
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(fold_dir, killed), daemon=True)
    killer.start()
    result = run_cv(cfg)  # the driver stays in the main thread; the killer strikes from the side
    killer.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    outcome = result.outcomes[0]
    starts = outcome.starts
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 6, starts  # restarted after a checkpoint
    assert [entry["epoch"] for entry in outcome.history] == list(range(6))  # no epoch lost, none repeated
    assert result.trained_folds == [0]
    assert (tmp_path / "runs" / result.run_id / "fold0.pt").is_file()
