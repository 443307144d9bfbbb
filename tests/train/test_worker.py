"""The checkpoint states of the Ray Train worker loop and the fold outcome read back from them, without Ray: each
checkpoint holds its own epoch's predictions and no copy of the best weights; the outcome takes the best epoch from
the checkpoint Ray kept as the best and the last epoch from the latest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lumbar_ray.train.worker import FoldOutcome, best_candidate, running_best


def _state(epoch: int, score: float, best: dict, weight: float, ema: float | None = None) -> dict:
    """A checkpoint state as the worker writes it at ``epoch`` (weights filled with ``weight``; the EMA's with
    ``ema`` when on), its predictions filled with ``score``."""
    study_ids = np.array([7, 3])
    return {"model": {"w": torch.full((2,), weight)}, "optimizer": {}, "scheduler": {},
            "ema": None if ema is None else {"module": {"w": torch.full((2,), ema)}, "updates": 4},
            "epoch": epoch, "best": best, "history": [{"epoch": e} for e in range(epoch + 1)],
            "starts": [0], "ranks": {"samples": [4.0, 4.0]},
            "last": {"epoch": epoch, "score": score, "study_ids": study_ids,
                     "probs": np.full((2, 25, 3), score)}}  # fmt: skip


def test_running_best_keeps_numbers_only_and_the_later_epoch_on_a_tie_as_ray_does():
    best = running_best(None, 0, 0.6)
    assert best == {"score": 0.6, "epoch": 0}
    assert running_best(best, 1, 0.6) == {"score": 0.6, "epoch": 1}  # Ray deletes the earlier of equal scores
    assert running_best(best, 2, 0.7) is best
    assert running_best(best, 3, 0.5) == {"score": 0.5, "epoch": 3}
    assert running_best(best, 4, float("nan")) is best  # a NaN never takes a number's place
    assert running_best(running_best(None, 0, float("nan")), 1, 0.9) == {"score": 0.9, "epoch": 1}
    legacy = {"score": 0.4, "epoch": 1, "model": {"w": torch.zeros(2)}, "study_ids": [], "probs": []}
    assert running_best(legacy, 4, 0.45) is legacy  # an older checkpoint's copy of the best is carried on


@pytest.mark.parametrize("ema", [None, 9.0])
def test_the_outcome_takes_the_best_epoch_from_the_best_checkpoint_and_the_last_from_the_latest(ema):
    best_state = _state(1, 0.4, {"score": 0.4, "epoch": 1}, weight=1.0, ema=ema)
    latest = _state(3, 0.6, {"score": 0.4, "epoch": 1}, weight=3.0, ema=None if ema is None else ema + 2)
    latest["last"]["predicted_probs"] = np.full((2, 25, 3), 0.65)
    assert not any("model" in state["best"] for state in (best_state, latest))  # no second copy of the weights

    outcome = FoldOutcome.from_state(0, latest, "ckpt/latest", best_state, "ckpt/best")
    assert (outcome.best_epoch, outcome.best_score, outcome.last_epoch) == (1, 0.4, 3)
    expected = 1.0 if ema is None else ema  # the evaluated model's weights: the EMA's when on
    torch.testing.assert_close(outcome.model_state["w"], torch.full((2,), expected))
    np.testing.assert_allclose(outcome.probs, 0.4)
    np.testing.assert_allclose(outcome.last_probs, 0.6)
    np.testing.assert_allclose(outcome.last_predicted_probs, 0.65)
    np.testing.assert_array_equal(outcome.study_ids, [7, 3])
    assert outcome.history == latest["history"] and outcome.ranks == latest["ranks"]
    assert (outcome.checkpoint_path, outcome.best_checkpoint_path) == ("ckpt/latest", "ckpt/best")

    alone = FoldOutcome.from_state(0, _state(2, 0.3, {"score": 0.3, "epoch": 2}, weight=2.0), "ckpt/latest")
    assert (alone.best_epoch, alone.last_epoch, alone.best_checkpoint_path) == (2, 2, "ckpt/latest")
    torch.testing.assert_close(alone.model_state["w"], torch.full((2,), 2.0))


def test_a_best_copied_into_an_older_checkpoint_still_counts():
    """A fold resumed from a checkpoint written before the best weights left the checkpoints: the copy it carries
    competes with the best checkpoint's own epoch, and a state built without Ray (``keep_best``) reads as before."""
    legacy_best = {"score": 0.2, "epoch": 0, "model": {"w": torch.zeros(2)}, "study_ids": np.array([7, 3]),
                   "probs": np.full((2, 25, 3), 0.2)}  # fmt: skip
    latest = _state(3, 0.6, legacy_best, weight=3.0)
    ray_best = _state(2, 0.5, legacy_best, weight=2.0)
    assert best_candidate(latest) is legacy_best
    outcome = FoldOutcome.from_state(1, latest, "ckpt/latest", ray_best, "ckpt/best")
    assert (outcome.best_epoch, outcome.best_score, outcome.last_epoch) == (0, 0.2, 3)
    torch.testing.assert_close(outcome.model_state["w"], torch.zeros(2))
    beaten = _state(4, 0.1, {"score": 0.1, "epoch": 4}, weight=4.0)
    assert FoldOutcome.from_state(1, beaten, "ckpt/latest", latest, "ckpt/old").best_epoch == 4


def test_the_last_and_the_best_epoch_must_score_the_same_studies():
    latest = _state(3, 0.6, {"score": 0.4, "epoch": 1}, weight=3.0)
    latest["last"]["study_ids"] = np.array([7, 4])
    with pytest.raises(RuntimeError, match="different studies"):
        FoldOutcome.from_state(0, latest, "a", _state(1, 0.4, {"score": 0.4, "epoch": 1}, weight=1.0), "b")


def test_a_worker_checkpoint_of_a_real_epoch_holds_the_evaluated_weights_once(small_fold):
    """One epoch of a fold with EMA on, its checkpoint state built as the worker builds it: the best candidate's
    weights are the average's, read out of the training state, not a copy beside it."""
    from lumbar_ray.config import Config
    from lumbar_ray.train.steps import build_fold, run_epoch
    from lumbar_ray.train.worker import _checkpoint_state, epoch_predictions

    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3},
                                 "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.5,
                                           "ema_decay": 0.9}})  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    fold = build_fold(cfg, small_fold, torch.device("cpu"))
    epoch = run_epoch(fold, 0)
    best = running_best(None, 0, epoch.metrics["val_score"])
    state = _checkpoint_state(fold, 0, best, epoch_predictions(0, epoch), [epoch.metrics], [0], {})
    assert set(state["best"]) == {"score", "epoch"}
    candidate = best_candidate(state)
    assert candidate["model"] is state["ema"]["module"]
    for key, value in fold.ema.module.state_dict().items():
        torch.testing.assert_close(candidate["model"][key], value, rtol=0, atol=0)
    outcome = FoldOutcome.from_state(0, state, "ckpt")
    np.testing.assert_array_equal(outcome.probs, epoch.probs)
    assert outcome.best_score == epoch.metrics["val_score"] and outcome.last_epoch == 0


def test_rank_0_hands_its_checkpoint_folder_to_an_asynchronous_upload_and_never_removes_it(tmp_path, monkeypatch):
    """``report_epoch`` with ``ray.train.report`` stood in for (no Ray started): rank 0 reports a whole checkpoint
    folder under the run's staging folder with ``CheckpointUploadMode.ASYNC`` and leaves it to Ray, which deletes it
    once uploaded; the other ranks report no checkpoint. A restarted rank 0 clears what a stopped group left there."""
    import ray.train

    from lumbar_ray.train.worker import CHECKPOINT_FILE, checkpoint_staging, clear_staging, report_epoch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    staging = checkpoint_staging("cv-x-fold0")
    assert staging == tmp_path / "lumbar_ray_checkpoints" / "cv-x-fold0"
    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kwargs: calls.append((metrics, kwargs)))
    report_epoch(1, {"val_score": 0.5}, {"epoch": 0}, staging)
    report_epoch(0, {"val_score": 0.5}, {"epoch": 0}, staging)
    (_, other), (_, first) = calls
    assert other["checkpoint"] is None and other["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
    assert first["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
    assert first["delete_local_checkpoint_after_upload"] is True
    folder = Path(first["checkpoint"].path)
    assert folder.parent == staging and torch.load(folder / CHECKPOINT_FILE, weights_only=False) == {"epoch": 0}

    def failing(metrics, **kwargs):
        raise RuntimeError("the barrier broke")

    monkeypatch.setattr(ray.train, "report", failing)
    with pytest.raises(RuntimeError, match="barrier"):
        report_epoch(0, {"val_score": 0.4}, {"epoch": 1}, staging)
    assert [path.name for path in staging.iterdir()] == [folder.name]  # not handed to Ray: removed at once
    clear_staging(staging)
    assert staging.is_dir() and not list(staging.iterdir())
    clear_staging(tmp_path / "absent")


def test_the_worker_loop_runs_in_ray_trains_local_mode(small_fold, tmp_path, monkeypatch):
    """``train_fold_loop`` under Ray Train's local mode (``ScalingConfig(num_workers=0)``: the loop runs in this
    process, no Ray started, ``report`` keeps the checkpoint folder as it is): its checkpoint, staged under the
    run's folder, holds its own epoch's predictions and the best as numbers, not the best weights."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lumbar_ray.config import Config
    from lumbar_ray.train.worker import FoldJob, load_checkpoint_state, train_fold_loop

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    # Local mode leaves its report functions installed in this process: put back what was there (nothing).
    import ray.train.v2._internal.execution.train_fn_utils as train_fn_utils

    monkeypatch.setattr(train_fn_utils, "_train_fn_utils", train_fn_utils._train_fn_utils)
    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3},
                                 "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0.5}})  # fmt: skip
    config = {"cfg": cfg.model_dump(mode="json"), "job": FoldJob(0, small_fold)}
    run = RunConfig(name="cv-local-fold0", storage_path=str(tmp_path / "ray"))
    result = TorchTrainer(train_fold_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                          run_config=run).fit()  # fmt: skip
    state = load_checkpoint_state(result.checkpoint)
    assert Path(result.checkpoint.path).parent == tmp_path / "lumbar_ray_checkpoints" / "cv-local-fold0"
    assert state["epoch"] == 1 and state["last"]["epoch"] == 1 and set(state["best"]) == {"score", "epoch"}
    assert state["last"]["score"] == state["history"][-1]["val_score"] == result.metrics["val_score"]
    assert result.metrics["best_val_score"] == state["best"]["score"] == min(m["val_score"] for m in state["history"])
    outcome = FoldOutcome.from_state(0, state, result.checkpoint.path)
    assert outcome.last_epoch == 1 and outcome.starts == [0]
