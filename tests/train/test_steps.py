"""The plain-torch train/eval steps, without Ray."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lumbar_ray.config import CropConfig, LossConfig, ModelConfig, TrainConfig
from lumbar_ray.constants import IGNORE_INDEX
from lumbar_ray.losses import SeverityLoss
from lumbar_ray.metrics import score_arrays
from lumbar_ray.models import build_model
from lumbar_ray.models.ema import ModelEma
from lumbar_ray.train.steps import (
    Predictions,
    autocast,
    fill_missing,
    make_grad_scaler,
    make_optimizer,
    make_scheduler,
    predict,
    score_predictions,
    train_epoch,
)

CROP = CropConfig(size=16, region=24, slices=3)

NO_AUX = LossConfig(aux_slice_weight=0.0)
"""The severity loss alone: these datasets carry no slice targets."""


class BrightnessDataset(Dataset):
    """Crops whose brightness is the label: a signal any working train step must pick up."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, size=(n, 25))
        self.labels[:, 0] = IGNORE_INDEX  # an empty cell
        self.mask = np.ones((n, 25), dtype=bool)
        self.mask[:, 1] = False  # a target without a point
        level = np.where(self.labels < 0, 0, self.labels) / 2.0
        noise = rng.normal(0, 0.05, size=(n, 25, CROP.slices, CROP.size, CROP.size))
        self.crops = (level[:, :, None, None, None] * 0.8 + 0.1 + noise).astype(np.float32)
        self.crops[~self.mask] = 0.0
        self.labels[~self.mask] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "crops": torch.from_numpy(self.crops[i]),
            "labels": torch.as_tensor(self.labels[i]),
            "mask": torch.as_tensor(self.mask[i]),
            "study_id": torch.as_tensor(1000 + i),
        }


def test_scheduler_warms_up_linearly_then_decays_to_one_percent():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1)
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / 11)
    assert np.all(np.diff(lrs[:11]) > 0)  # warm-up rises
    assert max(lrs) == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(lrs[11:]) <= 1e-12)  # cosine only falls
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


def test_optimizer_exempts_biases_and_norms_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.05))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    exempt = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}
    assert exempt == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_no_mixed_precision_on_cpu():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "bf16"), contextlib.nullcontext)
    assert not make_grad_scaler(cpu, "fp16").is_enabled()


def test_train_epochs_learn_a_planted_signal_and_predict_aligns_outputs():
    torch.manual_seed(0)
    data = BrightnessDataset(48)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    eval_loader = DataLoader(data, batch_size=8, shuffle=False)
    model = build_model(ModelConfig(arch="tiny"), CROP)
    cfg = TrainConfig(epochs=8, lr=3e-3, warmup_epochs=0.5)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    loss_fn = SeverityLoss(NO_AUX)
    cpu = torch.device("cpu")
    before = score_predictions(predict(model, eval_loader, cpu).probs, data.labels).total
    losses = [train_epoch(model, loader, loss_fn, optimizer, scheduler, cpu)["loss"] for _ in range(cfg.epochs)]
    predictions = predict(model, eval_loader, cpu)
    after = score_predictions(predictions.probs, data.labels).total
    assert losses[-1] < 0.6 * losses[0]
    assert after < 0.6 * before, (before, after)
    np.testing.assert_array_equal(predictions.study_ids, 1000 + np.arange(48))
    np.testing.assert_array_equal(predictions.labels, data.labels)
    np.testing.assert_allclose(predictions.probs.sum(-1), 1.0, atol=1e-6)


def test_train_epoch_reports_samples_and_loss_parts():
    data = BrightnessDataset(10)
    model = build_model(ModelConfig(arch="tiny"), CROP)
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn, cpu = SeverityLoss(NO_AUX), torch.device("cpu")
    out = train_epoch(model, DataLoader(data, batch_size=4), loss_fn, optimizer, None, cpu)
    assert out["samples"] == 10 and out["seconds"] > 0
    assert {"loss", "spinal", "foraminal", "subarticular", "any_severe", "aux_slice"} <= set(out)
    assert np.isfinite(out["loss"])


def test_train_epoch_updates_the_ema_after_every_optimiser_step():
    """The average follows the weights each optimiser step left: replayed here from snapshots taken at each step."""
    torch.manual_seed(0)
    data = BrightnessDataset(10)
    model = build_model(ModelConfig(arch="tiny"), CROP)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    ema = ModelEma(model, decay=0.6, warmup=False)
    expected = {name: value.detach().clone() for name, value in model.named_parameters()}
    steps = []

    def snapshot(*_: object) -> None:
        steps.append({name: value.detach().clone() for name, value in model.named_parameters()})

    optimizer.register_step_post_hook(snapshot)
    train_epoch(model, DataLoader(data, batch_size=4), SeverityLoss(NO_AUX), optimizer, None,
                torch.device("cpu"), ema=ema)  # fmt: skip
    assert len(steps) == ema.updates == 3  # 10 studies in batches of 4
    for weights in steps:
        expected = {name: 0.6 * expected[name] + 0.4 * weights[name] for name in expected}
    for name, average in ema.module.named_parameters():
        torch.testing.assert_close(average, expected[name], rtol=0, atol=1e-6)
    moved = [name for name, value in model.named_parameters() if not torch.allclose(value, expected[name])]
    assert moved  # the average is not simply the trained weights


class LabelledSliceDataset(BrightnessDataset):
    """BrightnessDataset whose crops hide the labelled slice: it alone is bright, at a random place in the crop."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed)
        rng = np.random.default_rng(seed + 1)
        self.slice_target = rng.integers(0, CROP.slices, size=(n, 25))
        self.slice_target[~self.mask] = IGNORE_INDEX
        self.crops *= 0.5
        rows, targets = np.nonzero(self.mask)
        self.crops[rows, targets, self.slice_target[rows, targets]] += 0.5

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return super().__getitem__(i) | {"slice_target": torch.as_tensor(self.slice_target[i])}


def test_the_aux_slice_term_trains_the_attention_to_find_the_labelled_slice():
    torch.manual_seed(0)
    data = LabelledSliceDataset(16)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = build_model(ModelConfig(arch="tiny"), CROP)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    loss_fn, cpu = SeverityLoss(LossConfig(aux_slice_weight=1.0)), torch.device("cpu")
    epochs = [train_epoch(model, loader, loss_fn, optimizer, None, cpu) for _ in range(4)]
    assert epochs[-1]["aux_slice"] < 0.5 * epochs[0]["aux_slice"], [epoch["aux_slice"] for epoch in epochs]
    assert epochs[-1]["aux_slice"] < 0.3 * np.log(CROP.slices)  # uniform attention would cost log(S)
    assert all(np.isfinite(epoch["loss"]) for epoch in epochs)
    # weight 0: the term is neither computed nor asked of the model (a mean pool trains as before)
    mean_pool = build_model(ModelConfig(arch="tiny", pool="mean"), CROP)
    plain = train_epoch(mean_pool, loader, SeverityLoss(NO_AUX), make_optimizer(mean_pool, TrainConfig()), None,
                        cpu)  # fmt: skip
    assert plain["aux_slice"] == 0.0


def test_fill_missing_puts_the_prior_where_no_crop_was_cut():
    probs = np.full((2, 25, 3), 1 / 3)
    mask = np.ones((2, 25), dtype=bool)
    mask[1, 4] = False
    prior = np.tile([0.7, 0.2, 0.1], (25, 1))
    filled = fill_missing(Predictions(np.array([1, 2]), probs, np.zeros((2, 25), int), mask), prior)
    np.testing.assert_allclose(filled[1, 4], [0.7, 0.2, 0.1])
    np.testing.assert_allclose(np.delete(filled.reshape(50, 3), 29, axis=0), 1 / 3)
    assert probs[1, 4, 0] == pytest.approx(1 / 3)  # the input is left alone


@pytest.mark.slow
def test_build_fold_and_run_epoch_are_the_worker_loop_without_ray(small_fold):
    """The epoch the Ray worker, the benchmark and this test all run: seeded, so two builds train alike."""
    from lumbar_ray.config import Config
    from lumbar_ray.train.steps import build_fold, keep_best, run_epoch

    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3},
                                 "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0.5}})  # fmt: skip
    histories = []
    for _ in range(2):
        torch.manual_seed(cfg.train.seed)
        fold = build_fold(cfg, small_fold, torch.device("cpu"))
        best, history = None, []
        for epoch_index in range(cfg.train.epochs):
            epoch = run_epoch(fold, epoch_index)
            best = keep_best(best, epoch, fold.bare)
            history.append(epoch.metrics)
        histories.append(history)
    first, second = histories
    assert [m["epoch"] for m in first] == [0, 1] and first[0]["train_samples"] == 8 and first[0]["world_size"] == 1
    assert {"train_loss", "val_loss", "val_score", "val_spinal", "lr"} <= set(first[0])
    assert [m["val_score"] for m in first] == [m["val_score"] for m in second]  # seeded: the same run twice
    assert best["score"] == min(m["val_score"] for m in second)
    assert epoch.probs.shape == (4, 25, 3) and np.allclose(epoch.probs.sum(-1), 1)
    # targets without a crop get the fold's prior, exactly
    missing = ~epoch.predictions.mask.astype(bool)
    assert missing.any() and not missing.all()  # some targets of these studies lack a point
    np.testing.assert_allclose(epoch.probs[missing], np.broadcast_to(small_fold.prior, epoch.probs.shape)[missing])


@pytest.mark.slow
def test_with_ema_on_the_average_predicts_and_is_kept_and_resumed(small_fold, caplog):
    """``train.ema_decay`` > 0: the validation predictions and the kept weights are the EMA's, and the average
    comes back from a checkpoint's :func:`training_state` (saved and loaded as the worker does)."""
    import io

    from lumbar_ray.config import Config
    from lumbar_ray.train.steps import build_fold, keep_best, run_epoch, training_state

    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3},
                                 "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0.5,
                                           "ema_decay": 0.9}})  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    fold = build_fold(cfg, small_fold, torch.device("cpu"))
    assert fold.ema is not None and fold.evaluated is fold.ema.module
    epoch = run_epoch(fold, 0)
    assert fold.ema.updates == 2  # 8 training studies in batches of 4
    cpu = torch.device("cpu")
    np.testing.assert_allclose(epoch.predictions.probs, predict(fold.ema.module, fold.val_loader, cpu).probs)
    assert np.abs(epoch.predictions.probs - predict(fold.bare, fold.val_loader, cpu).probs).max() > 1e-6
    best = keep_best(None, epoch, fold.evaluated)
    for key, value in fold.ema.module.state_dict().items():
        torch.testing.assert_close(best["model"][key], value, rtol=0, atol=0)

    buffer = io.BytesIO()
    torch.save(training_state(fold), buffer)
    buffer.seek(0)
    resumed = build_fold(cfg, small_fold, cpu, torch.load(buffer, weights_only=False))
    assert resumed.ema.updates == fold.ema.updates
    for key, value in fold.ema.module.state_dict().items():
        torch.testing.assert_close(resumed.ema.module.state_dict()[key], value, rtol=0, atol=0)
    weights = resumed.bare.state_dict()  # the average came back, not a copy of the trained weights
    assert any(not torch.equal(resumed.ema.module.state_dict()[key], value) for key, value in weights.items())

    without = {**training_state(fold), "ema": None}  # a checkpoint of a run without EMA: the average restarts
    restarted = build_fold(cfg, small_fold, cpu, without)
    assert restarted.ema.updates == 0 and "no EMA" in caplog.text
    for key, value in fold.bare.state_dict().items():
        torch.testing.assert_close(restarted.ema.module.state_dict()[key], value, rtol=0, atol=0)
    off = build_fold(cfg.model_copy(update={"train": cfg.train.model_copy(update={"ema_decay": 0.0})}), small_fold, cpu)
    assert off.ema is None and off.evaluated is off.bare and training_state(off)["ema"] is None


def test_build_fold_and_run_epoch_train_the_slice_attention(small_fold):
    """The fold's training crops carry the labelled slices; the epoch reports the auxiliary term; a pool without
    attention is refused when the fold is built."""
    from lumbar_ray.config import Config, ConfigError
    from lumbar_ray.train.steps import build_fold, run_epoch

    tiny = {"crop": {"size": 16, "region": 24, "slices": 3},
            "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.5}}  # fmt: skip
    cfg = Config.model_validate(tiny | {"loss": {"aux_slice_weight": 0.5}})
    torch.manual_seed(cfg.train.seed)
    fold = build_fold(cfg, small_fold, torch.device("cpu"))
    targets = np.stack([fold.train_set[i]["slice_target"].numpy() for i in range(len(fold.train_set))])
    assert (targets != IGNORE_INDEX).mean() > 0.5 and set(np.unique(targets)) <= {IGNORE_INDEX, 0, 1, 2}
    metrics = run_epoch(fold, 0).metrics
    assert 0 < metrics["train_aux_slice"] < 2 * np.log(3) and np.isfinite(metrics["train_loss"])
    off = build_fold(Config.model_validate(tiny | {"loss": {"aux_slice_weight": 0.0}}), small_fold, torch.device("cpu"))
    assert "train_aux_slice" not in run_epoch(off, 0).metrics  # off: the metrics are as they were

    mean = cfg.model_copy(deep=True)
    mean.model.pool = "mean"  # assigned past the config's own check (which only sees an explicit pool)
    with pytest.raises(ConfigError, match="loss.aux_slice_weight > 0 trains the slice attention"):
        build_fold(mean, small_fold, torch.device("cpu"))


@pytest.mark.slow
def test_the_held_out_fold_is_also_predicted_at_predicted_points(small_fold):
    """``cv.predicted_points``: the evaluated model predicts the held-out studies at the given points; at the label
    points themselves that is exactly the epoch's own prediction, and points moved off them change it."""
    import dataclasses

    from lumbar_ray.config import Config
    from lumbar_ray.train.steps import build_fold, predict_at_predicted_points, run_epoch

    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3},
                                 "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.5}})  # fmt: skip
    torch.manual_seed(0)
    assert predict_at_predicted_points(build_fold(cfg, small_fold, torch.device("cpu"))) is None
    at_labels = dataclasses.replace(small_fold, val_points=small_fold.points)
    torch.manual_seed(0)
    fold = build_fold(cfg, at_labels, torch.device("cpu"))
    epoch = run_epoch(fold, 0)
    study_ids, probs, score = predict_at_predicted_points(fold)
    np.testing.assert_array_equal(study_ids, epoch.predictions.study_ids)
    np.testing.assert_allclose(probs, epoch.probs, atol=1e-6)
    assert score == pytest.approx(epoch.metrics["val_score"], abs=1e-6)

    moved = small_fold.points.assign(x=small_fold.points["x"] + 9.0, y=small_fold.points["y"] - 7.0)
    keep_some = moved[moved["target"] % 5 != 0]  # a target without a predicted point gets the prior
    fold.predicted_points_loader = build_fold(cfg, dataclasses.replace(small_fold, val_points=keep_some),
                                              torch.device("cpu")).predicted_points_loader  # fmt: skip
    _, moved_probs, moved_score = predict_at_predicted_points(fold)
    assert np.abs(moved_probs - epoch.probs).max() > 1e-4
    # the targets left without a point are scored (by the prior), not dropped: every labelled cell counts
    labels = np.asarray(small_fold.val_labels)
    assert moved_score == pytest.approx(score_arrays(np.where(labels < 0, IGNORE_INDEX, labels), moved_probs).total)
    dropped = np.isin(np.arange(25), np.unique(small_fold.points["target"][small_fold.points["target"] % 5 == 0]))
    np.testing.assert_allclose(moved_probs[:, dropped], np.broadcast_to(small_fold.prior, probs.shape)[:, dropped])


def test_oof_of_the_last_epoch_at_predicted_points_is_assembled_from_each_fold():
    from lumbar_ray.train.cv import assemble_oof
    from lumbar_ray.train.worker import FoldOutcome

    def outcome(fold: int, ids: list[int], value: float, with_predicted: bool) -> FoldOutcome:
        probs = np.full((len(ids), 25, 3), value)
        state = {"best": {"score": 0.5, "epoch": 1, "study_ids": np.array(ids), "probs": probs, "model": {}},
                 "last": {"epoch": 2, "study_ids": np.array(ids), "probs": probs + 0.1}, "history": []}  # fmt: skip
        if with_predicted:
            state["last"]["predicted_probs"] = probs + 0.2
        return FoldOutcome.from_state(fold, state)

    outcomes = {0: outcome(0, [3, 1], 0.0, True), 1: outcome(1, [2], 0.3, True)}
    oof = assemble_oof(np.array([1, 2, 3]), outcomes, "last_predicted")
    np.testing.assert_allclose(oof[:, 0, 0], [0.2, 0.5, 0.2])
    np.testing.assert_allclose(assemble_oof(np.array([1, 2, 3]), outcomes, "last")[:, 0, 0], [0.1, 0.4, 0.1])
    with pytest.raises(ValueError, match="kept no 'last_predicted'"):
        assemble_oof(np.array([1, 2, 3]), {0: outcome(0, [1, 2, 3], 0.0, False)}, "last_predicted")


def test_a_fold_with_the_second_view_trains_and_predicts_through_the_same_steps(small_fold):
    """``crop.second_view=true`` end to end without Ray: 50-crop items, the two-view network, the auxiliary slice
    term on the first views, flip TTA and EMA in the evaluation, every held-out target predicted."""
    from lumbar_ray.config import Config
    from lumbar_ray.train.steps import build_fold, keep_best, run_epoch

    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3, "second_view": True},
                                 "model": {"tta_flip": True}, "loss": {"aux_slice_weight": 0.5},
                                 "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.5,
                                           "ema_decay": 0.9}})  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    fold = build_fold(cfg, small_fold, torch.device("cpu"))
    assert fold.bare.views == 2 and fold.train_set[0]["crops"].shape == (50, 3, 16, 16)
    before = {key: value.clone() for key, value in fold.bare.state_dict().items()}
    epoch = run_epoch(fold, 0)
    assert np.isfinite(epoch.metrics["train_loss"]) and np.isfinite(epoch.metrics["val_score"])
    assert 0 < epoch.metrics["train_aux_slice"] < 2 * np.log(3)
    assert not torch.equal(fold.bare.view_embedding.weight, before["view_embedding.weight"])  # it was trained
    assert epoch.probs.shape == (4, 25, 3) and np.allclose(epoch.probs.sum(-1), 1)
    best = keep_best(None, epoch, fold.evaluated)
    assert "view_embedding.weight" in best["model"]


def test_a_fold_reads_a_remote_cache_from_its_node_local_copy(small_cache, small_fold, tmp_path):
    """``preprocess.cache`` a URI: the fold's entries are copied once into ``train.node_cache`` and its datasets
    read the copy, item for item as they read the cache itself; a local cache root is read in place."""
    import dataclasses

    from lumbar_ray.config import Config
    from lumbar_ray.data.cache import SeriesCache
    from lumbar_ray.train.steps import build_fold, fold_cache, fold_entries

    train = {"epochs": 1, "batch_size": 4, "node_cache": str(tmp_path / "node")}
    cfg = Config.model_validate({"crop": {"size": 16, "region": 24, "slices": 3}, "train": train})
    assert fold_cache(cfg, small_fold).root == str(small_cache.cache_root)  # local: read in place, nothing copied
    assert not (tmp_path / "node").exists()

    remote = dataclasses.replace(small_fold, cache_root=f"file://{small_cache.cache_root}")
    entries = fold_entries(remote)
    studies = set(small_fold.train_ids.tolist()) | set(small_fold.val_ids.tolist())
    assert entries and {study for study, _ in entries} == studies
    source = SeriesCache(small_cache.cache_root, small_cache.cache_settings)
    assert entries <= source.cached_keys()
    torch.manual_seed(0)
    fold = build_fold(cfg, remote, torch.device("cpu"))
    copy = fold.train_set.cache
    assert copy.root.startswith(str(tmp_path / "node")) and copy.key == source.key
    assert all(copy.has(*entry) for entry in entries)
    torch.manual_seed(0)
    in_place = build_fold(cfg, small_fold, torch.device("cpu"))
    for index in (0, len(in_place.train_set) - 1):
        for key, value in in_place.train_set[index].items():
            torch.testing.assert_close(fold.train_set[index][key], value, rtol=0, atol=0)
    assert fold.val_loader.dataset.cache.root == copy.root
