"""The Ray Train worker loop of one fold: the thin Ray layer over :mod:`lumbar_ray.train.steps`.

Each worker builds the fold with :func:`~lumbar_ray.train.steps.build_fold`, through ``prepare_model`` /
``prepare_data_loader`` (DDP and a distributed sampler), and resumes from ``ray.train.get_checkpoint()`` when Ray
restarts it after a failure or when an interrupted CV is rerun under the same run name. Each epoch is
:func:`~lumbar_ray.train.steps.run_epoch`; then every worker calls ``ray.train.report`` once (it is a barrier);
rank 0 attaches the checkpoint and logs the epoch to MLflow.

A checkpoint holds the state at the end of its epoch (model, optimiser, scheduler, the EMA of the weights when
``train.ema_decay`` is on, epoch, history, the best score so far as numbers) and that epoch's own validation
probabilities and score. Ray keeps two of them (``CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=
"val_score", checkpoint_score_order="min")``, see :func:`lumbar_ray.train.cv.build_trainer`): the best by the
validation score, and the latest, which Ray never deletes while it is the latest, so a restarted worker or a rerun
resumes from it. :meth:`FoldOutcome.from_state` takes the best epoch's weights (the evaluated model's, the EMA's
when on: :func:`~lumbar_ray.train.steps.evaluated_weights`) and probabilities from the best checkpoint and the
last epoch's probabilities (the honest CV: an epoch fixed in advance, not chosen on the scored fold) from the
latest; no checkpoint carries a second copy of the best weights.

Rank 0 writes a checkpoint into a fresh temporary folder and reports it with ``CheckpointUploadMode.ASYNC``: the
next epoch trains while Ray copies it to storage, and Ray deletes the folder once the copy is done (never a
``TemporaryDirectory``, which would vanish under the upload). The folders of a fold lie under one staging folder
per Ray Train run (:func:`checkpoint_staging`), which rank 0 clears when it (re)starts: a worker group stopped by
a failure leaves the checkpoints it had not uploaded yet behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumbar_ray.config import Config
from lumbar_ray.paths import atomic_path
from lumbar_ray.raytools import quiet_ray_train_info
from lumbar_ray.tracking import RunLogger
from lumbar_ray.train.steps import (
    Epoch,
    Fold,
    FoldPayload,
    build_fold,
    evaluated_weights,
    improves,
    predict_at_predicted_points,
    run_epoch,
    training_state,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
STAGING_DIR = "lumbar_ray_checkpoints"
"""The folder under the node's temporary directory where rank 0 writes checkpoints until Ray has uploaded them."""
SCORE_ATTRIBUTE = "val_score"
"""The reported metric Ray keeps the best checkpoint by (lower is better), the one :func:`running_best` follows."""


@dataclass
class FoldJob:
    """The ``train_loop_config`` of a fold's ``TorchTrainer`` (besides the config): which fold, its data, and
    the MLflow run its epochs go to (None: no logging)."""

    fold: int
    payload: FoldPayload
    run_logger: RunLogger | None = None


@dataclass
class FoldOutcome:
    """A finished fold: its best epoch's weights and out-of-fold probabilities, and its last epoch's.

    ``starts`` lists the epoch each (re)start of the fold's workers began at (``[0]`` for an uninterrupted fold);
    ``ranks`` holds the last epoch's per-rank training samples and weight checksums; ``checkpoint_path`` is the
    latest checkpoint, ``best_checkpoint_path`` the one the best epoch's weights come from.
    """

    fold: int
    best_score: float
    best_epoch: int
    study_ids: np.ndarray
    probs: np.ndarray
    history: list[dict[str, Any]]
    model_state: dict[str, torch.Tensor]
    starts: list[int] = field(default_factory=list)
    ranks: dict[str, list[float]] = field(default_factory=dict)
    checkpoint_path: str | None = None
    last_epoch: int | None = None
    last_probs: np.ndarray | None = None
    last_predicted_probs: np.ndarray | None = None
    best_checkpoint_path: str | None = None

    def save(self, path: Path) -> None:
        with atomic_path(path) as temporary:  # a fold counts as done only once its file is whole
            torch.save(self.__dict__, temporary)

    @classmethod
    def load(cls, path: Path) -> FoldOutcome:
        return cls(**torch.load(path, map_location="cpu", weights_only=False))

    @classmethod
    def from_state(cls, fold: int, state: dict[str, Any], checkpoint_path: str | None = None,
                   best_state: dict[str, Any] | None = None,
                   best_checkpoint_path: str | None = None) -> FoldOutcome:  # fmt: skip
        """The outcome of a finished fold from its checkpoint states (see :func:`train_fold_loop`).

        Args:
            fold: the fold.
            state: the latest checkpoint's state: the last epoch's predictions, the history, the restarts.
            checkpoint_path: where that checkpoint lies.
            best_state: the state of the checkpoint Ray kept as the best by :data:`SCORE_ATTRIBUTE` (None: only
                ``state``). The better of the two candidates (:func:`best_candidate`) gives the best epoch, so a
                checkpoint written before the best weights left the checkpoints still counts.
            best_checkpoint_path: where the best checkpoint lies.
        """
        candidates = [best_candidate(each) for each in (state, best_state) if each is not None]
        best = min(candidates, key=lambda c: (math.inf if math.isnan(c["score"]) else c["score"], -c["epoch"]))
        last = state.get("last") or {}
        if "study_ids" in last and not np.array_equal(last["study_ids"], best["study_ids"]):
            raise RuntimeError(f"fold {fold}: the last and the best epoch scored different studies")
        if best_checkpoint_path is None and best is candidates[0]:
            best_checkpoint_path = checkpoint_path
        return cls(fold=fold, best_score=float(best["score"]), best_epoch=int(best["epoch"]),
                   study_ids=np.asarray(best["study_ids"]), probs=np.asarray(best["probs"]), history=state["history"],
                   model_state=best["model"], starts=list(state.get("starts", [])),
                   ranks=dict(state.get("ranks", {})), checkpoint_path=checkpoint_path,
                   last_epoch=last.get("epoch"), last_probs=last.get("probs"),
                   last_predicted_probs=last.get("predicted_probs"),
                   best_checkpoint_path=best_checkpoint_path)  # fmt: skip


def best_candidate(state: dict[str, Any]) -> dict[str, Any]:
    """The best epoch one checkpoint state vouches for: ``score``, ``epoch``, ``model`` (weights), ``study_ids``
    and ``probs``.

    That is the checkpoint's own epoch (its evaluated weights, its validation predictions), unless its ``best``
    holds weights: a checkpoint of an older version, which copied the best epoch's weights and predictions into
    every checkpoint (and a fold resumed from one carries that copy on until an epoch beats it), or a state built
    by :func:`~lumbar_ray.train.steps.keep_best` without Ray.
    """
    if "model" in state["best"]:
        return state["best"]
    last = state["last"]
    return {"score": float(last["score"]), "epoch": int(last["epoch"]), "model": evaluated_weights(state),
            "study_ids": last["study_ids"], "probs": last["probs"]}  # fmt: skip


def running_best(best: dict[str, Any] | None, epoch: int, score: float) -> dict[str, Any]:
    """The best epoch so far by validation score (:func:`~lumbar_ray.train.steps.improves`: lower is better, the
    later on a tie, as Ray keeps it), as numbers only: its weights and predictions stay in its own checkpoint, which
    Ray keeps by the same score. A best resumed from an older checkpoint, weights included (:func:`best_candidate`),
    is carried on until an epoch beats it."""
    if best is not None and not improves(score, best["score"]):
        return best
    return {"score": float(score), "epoch": int(epoch)}


def load_checkpoint_state(checkpoint: Any) -> dict[str, Any] | None:
    """The state saved in a Ray Train checkpoint of this loop (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def _per_rank(value: float, device: torch.device) -> list[float]:
    """``value`` of every rank, in rank order (just ``[value]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(value)]
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([float(value)], dtype=torch.float64, device=device))
    return [float(tensor.item()) for tensor in gathered]


def _parameter_checksum(model: torch.nn.Module) -> float:
    """A sum over every weight: equal on all ranks exactly when DDP kept the replicas in sync."""
    return float(sum(parameter.detach().double().sum().item() for parameter in model.parameters()))


def train_fold_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the fold's ``TorchTrainer``.

    Args:
        config: ``cfg`` (the resolved config as a dict) and ``job`` (a :class:`FoldJob`).
    """
    import ray.train
    import ray.train.torch

    cfg, job = Config.model_validate(config["cfg"]), config["job"]
    quiet_ray_train_info()
    context = ray.train.get_context()
    rank, staging = context.get_world_rank(), checkpoint_staging(context.get_experiment_name())
    if rank == 0:
        clear_staging(staging)
    torch.manual_seed(cfg.train.seed + rank)
    state = load_checkpoint_state(ray.train.get_checkpoint())
    fold = build_fold(cfg, job.payload, ray.train.torch.get_device(), state, ray.train.torch.prepare_model,
                      ray.train.torch.prepare_data_loader)  # fmt: skip
    start_epoch, best, history, starts = 0, None, [], []
    if state is not None:
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        starts = state.get("starts", [])
        logger.info("fold %s rank %d: resumed after epoch %d", job.fold, rank, state["epoch"])
    starts = [*starts, start_epoch]  # the epoch each (re)start of this fold began at, for the record
    with _system_metrics(cfg, job, rank):  # the machine of rank 0, sampled into the fold's run
        for epoch_index in range(start_epoch, cfg.train.epochs):
            epoch = run_epoch(fold, epoch_index)
            metrics = epoch.metrics
            history.append(metrics)
            # Per-rank evidence (kept in the checkpoint, not sent to MLflow): every replica trained, and in sync.
            ranks = {"samples": _per_rank(metrics["train_samples"], fold.device),
                     "checksum": _per_rank(_parameter_checksum(fold.bare), fold.device)}  # fmt: skip
            best = running_best(best, epoch_index, metrics[SCORE_ATTRIBUTE])
            last = epoch_predictions(epoch_index, epoch)
            if epoch_index == cfg.train.epochs - 1:
                last |= _at_predicted_points(fold, last, metrics)
            metrics["best_val_score"] = best["score"]
            if rank == 0:
                _log_progress(job.fold, epoch_index, cfg.train.epochs, metrics)
                if job.run_logger is not None:
                    job.run_logger.log_epoch(epoch_index, {k: v for k, v in metrics.items()
                                                           if k not in ("epoch", "epoch_started_at")})  # fmt: skip
            saved = _checkpoint_state(fold, epoch_index, best, last, history, starts, ranks)
            report_epoch(rank, metrics, saved, staging)


def epoch_predictions(epoch_index: int, epoch: Epoch) -> dict[str, Any]:
    """An epoch's own validation predictions and score, as its checkpoint keeps them (``last``).

    The best checkpoint's are the best epoch's (with EMA on, the average's, which is also what is registered); the
    latest's are the last epoch's, the honest CV (a fixed schedule, not an epoch picked on this fold).
    """
    return {"epoch": int(epoch_index), "score": float(epoch.metrics[SCORE_ATTRIBUTE]),
            "study_ids": epoch.predictions.study_ids, "probs": epoch.probs}  # fmt: skip


def _system_metrics(cfg: Config, job: FoldJob, rank: int) -> contextlib.AbstractContextManager[None]:
    """System metrics of rank 0's machine into the fold's run while it trains (``tracking.system_metrics``)."""
    if rank != 0 or job.run_logger is None or not cfg.tracking.system_metrics:
        return contextlib.nullcontext()
    return job.run_logger.system_metrics(cfg.tracking.system_metrics_interval)


def _at_predicted_points(fold: Fold, last: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The last epoch's model on the held-out studies at predicted points (``cv.predicted_points``), if given."""
    outcome = predict_at_predicted_points(fold)
    if outcome is None:
        return {}
    study_ids, probs, score = outcome
    if not np.array_equal(study_ids, last["study_ids"]):
        raise RuntimeError("the predicted and the labelled points scored different held-out studies")
    metrics["val_score_predicted_points"] = score
    return {"predicted_probs": probs}


def _checkpoint_state(fold: Fold, epoch: int, best: dict, last: dict, history: list, starts: list,
                      ranks: dict) -> dict:  # fmt: skip
    return training_state(fold) | {"epoch": epoch, "best": best, "last": last, "history": history,
                                   "starts": starts, "ranks": ranks}  # fmt: skip


def _log_progress(fold: int, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    """One line per epoch from rank 0; Ray forwards worker output to the driver (and to ``ray job logs``)."""
    if not logger.handlers:  # a Ray worker process has no logging set up: give this module a plain handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's own root handler would print every line a second time
    logger.info(
        "fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val score %.5f (best %.5f), %.1f samples/s",
        fold, epoch + 1, epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_score"],
        metrics["best_val_score"], metrics["train_samples_per_s"],
    )  # fmt: skip


def checkpoint_staging(run_name: str) -> Path:
    """``<the node's temporary directory>/lumbar_ray_checkpoints/<run name>``: where rank 0 of a Ray Train run (a
    fold) writes its checkpoints until Ray has uploaded them."""
    return Path(tempfile.gettempdir()) / STAGING_DIR / run_name


def clear_staging(staging: Path) -> None:
    """Remove the checkpoints a stopped worker group of this run left on this node before Ray uploaded them (Ray
    deletes each one it uploads; a restarted group resumes from the latest uploaded one, never from these)."""
    if not staging.is_dir():
        return
    left = [path for path in staging.iterdir() if path.is_dir()]
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    if left:
        logger.info("removed %d checkpoint folder(s) a stopped worker group left in %s", len(left), staging)


def report_epoch(rank: int, metrics: dict[str, Any], state: dict[str, Any], staging: Path) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, uploaded while the next epoch trains.

    Shared by every Ray Train loop of the project (the classifier's folds, the segmentation U-Net): ``state`` is
    saved as :data:`CHECKPOINT_FILE`, which :func:`load_checkpoint_state` reads back.

    ``CheckpointUploadMode.ASYNC`` copies the folder to storage in a background thread after ``report`` returns,
    and deletes it once copied (``delete_local_checkpoint_after_upload``, the default of that mode): so the folder
    is a fresh ``mkdtemp`` (under ``staging``) that this function never removes once reported. Ray waits for
    pending uploads before the training function counts as finished, and reports them in order, so the latest
    checkpoint is always whole.
    """
    import ray.train

    upload = ray.train.CheckpointUploadMode.ASYNC
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=upload)
        return
    staging.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="epoch_", dir=staging)
    try:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=upload,
                         delete_local_checkpoint_after_upload=True)  # fmt: skip
    except BaseException:  # not handed to Ray: nothing else would remove it
        shutil.rmtree(folder, ignore_errors=True)
        raise
