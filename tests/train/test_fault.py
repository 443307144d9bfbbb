"""Fault tolerance on the real Ray Train: a training worker SIGKILLed mid-fold resumes from its checkpoint.

The worker to kill is found through Ray's state API among the live ``RayTrainWorker`` actors of this test's own
Ray job, by pid: no other process on the machine is touched."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from lumbar_ray.paths import cv_run_id, ray_storage_for
from lumbar_ray.pipeline import complete_cache
from lumbar_ray.train.cv import run_cv

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def train_worker_pids(gcs_address: str, job_id: str) -> list[int]:
    """The pids of the live Ray Train worker actors of Ray job ``job_id`` of the Ray instance at ``gcs_address``,
    from Ray's state API (the address, because other Ray instances may run on the machine)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", job_id)]
    actors = list_actors(address=gcs_address, filters=filters, detail=True)
    return [int(actor.pid) for actor in actors if actor.pid]


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


def kill_a_worker_after_first_checkpoint(fold_dir: Path, ray_job: tuple[str, str], killed: list[int],
                                         timeout: float = 600) -> None:  # fmt: skip
    """Wait until the controller holds a checkpoint of the fold, then SIGKILL one of this job's training workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoints(fold_dir):
            pids = train_worker_pids(*ray_job)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.05)


def test_worker_killed_mid_fold_resumes_from_its_checkpoint(ray_local, tmp_path, small_config):
    cfg = small_config(tmp_path, epochs=6, folds=[0], max_failures=2)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"register_model": False})})
    fold_dir = Path(ray_storage_for(cfg)) / f"{cv_run_id(cfg)}-fold0"
    complete_cache(cfg)
    context = ray_local.get_runtime_context()
    ray_job = (context.gcs_address, context.get_job_id())
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint, args=(fold_dir, ray_job, killed), daemon=True
    )
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
