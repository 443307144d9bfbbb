"""The search space and what a trial's sampled values do to the config, the loss and the augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lumbar_ray.config import Config, ConfigError, CropConfig, SearchDim, load_config
from lumbar_ray.data.augment import Augmenter
from lumbar_ray.losses import SeverityLoss
from lumbar_ray.models import build_model
from lumbar_ray.train.steps import make_optimizer, predict, train_epoch
from lumbar_ray.tune.run import max_concurrency, search_space
from lumbar_ray.tune.space import apply_params, check_space, miscalibrating_keys, warn_if_class_weights_searched
from lumbar_ray.tune.trainable import trial_config

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_params_land_on_their_keys_including_list_items():
    cfg = apply_params(Config(), {"loss.class_weights.2": 9.0, "train.lr": 1e-4, "augment.flip_p": 0.0})
    assert cfg.loss.class_weights == (1.0, 2.0, 9.0)
    assert cfg.train.lr == 1e-4 and cfg.augment.flip_p == 0.0
    with pytest.raises(ConfigError, match="augment.scale"):
        apply_params(Config(), {"augment.scale": 3.0})  # out of its range (< 1)


def test_no_shipped_space_searches_the_class_weights():
    """The metric's 1/2/4 in the loss are the metric's optimum: the defaults and the quickstart search the loss
    terms that are sound to tune instead (configs/rsna-gpu.yaml: tests/test_rsna_gpu_config.py)."""
    for cfg in (Config(), load_config(QUICKSTART)):
        assert miscalibrating_keys(cfg.tune.space) == []
        assert {"loss.any_severe_weight", "loss.aux_slice_weight"} <= set(cfg.tune.space)
        assert cfg.loss.class_weights == (1.0, 2.0, 4.0)


def test_a_space_that_searches_the_class_weights_runs_with_a_warning(caplog):
    keys = ["loss.class_weights", "loss.class_weights.1", "loss.class_weightsx", "train.lr"]
    assert miscalibrating_keys(keys) == keys[:2]
    space = "{loss.class_weights.2: {dist: uniform, low: 2, high: 8}, train.lr: {dist: uniform, low: 0.001, high: 0.1}}"
    cfg = load_config(None, [f"tune.space={space}"])
    with caplog.at_level("WARNING", logger="lumbar_ray.tune.space"):
        assert warn_if_class_weights_searched(cfg.tune.space) == ["loss.class_weights.2"]
    assert "class weights other than the metric's miscalibrate; see recipe-evidence" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lumbar_ray.tune.space"):
        assert warn_if_class_weights_searched(Config().tune.space) == []
    assert caplog.text == ""


def test_a_space_whose_trials_cannot_train_the_aux_slice_loss_is_refused_before_any_trial():
    """The auxiliary slice loss trains the pooling's attention: a mean pool, set or searched, alongside a searched
    or set weight above 0 fails every trial, so the search refuses to start; any other mix starts."""
    aux = "loss.aux_slice_weight: {dist: uniform, low: 0.0, high: 1.0}"
    pools = "model.pool: {dist: choice, values: [lstm, mean]}"
    off = "loss.aux_slice_weight=0"
    for bad in ([f"tune.space={{{aux}}}", "model.pool=mean", off], [f"tune.space={{{aux}, {pools}}}"],
                ["loss.aux_slice_weight=0.5", f"tune.space={{{pools}}}"]):  # fmt: skip
        with pytest.raises(ConfigError, match=r"slice pooling \['mean'\].*every trial that draws both would fail"):
            check_space(load_config(None, bad))
    for good in ([f"tune.space={{{aux}}}"], ["tune.space={model.pool: {dist: choice, values: [mean]}}", off],
                 [f"tune.space={{{aux}, model.arch: {{dist: choice, values: [tiny, convnext_nano]}}}}"]):  # fmt: skip
        check_space(load_config(None, good))
    check_space(load_config(QUICKSTART))


def test_space_is_validated_with_the_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tune:\n  space:\n    loss.class_weight.1: {dist: uniform, low: 1, high: 2}\n")
    with pytest.raises(ConfigError, match="loss.class_weight.1"):
        load_config(bad)
    with pytest.raises(ValueError, match="low < high"):
        SearchDim(dist="uniform", low=2.0, high=1.0)
    with pytest.raises(ValueError, match="values"):
        SearchDim(dist="choice")
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["tune.space={loss: {dist: uniform, low: 0, high: 1}}"])


def test_domains_follow_the_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space({
        "a.x": SearchDim(dist="uniform", low=0.0, high=1.0),
        "a.y": SearchDim(dist="loguniform", low=1e-4, high=1e-2),
        "a.z": SearchDim(dist="int", low=1, high=3),
        "a.w": SearchDim(dist="choice", values=["tiny", "resnet18d"]),
    })  # fmt: skip
    assert isinstance(space["a.x"], Float) and space["a.x"].lower == 0.0
    assert isinstance(space["a.y"], Float) and type(space["a.y"].sampler).__name__ == "_LogUniform"
    assert isinstance(space["a.z"], Integer) and (space["a.z"].lower, space["a.z"].upper) == (1, 4)  # inclusive 3
    assert isinstance(space["a.w"], Categorical) and space["a.w"].categories == ["tiny", "resnet18d"]


def test_trial_config_trains_the_tuned_folds_and_never_registers():
    base = load_config(None, ["tune.folds=[0, 2]", "train.run_id=fixed"])
    cfg = trial_config(base, {"train.lr": 3e-3})
    assert cfg.train.folds == [0, 2] and cfg.train.run_id is None and not cfg.tracking.register_model
    assert cfg.train.lr == 3e-3


def test_concurrency_comes_from_cluster_resources():
    cpu = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=4"])
    assert max_concurrency(cpu, {"CPU": 32.0}) == 4
    gpu = load_config(None, ["train.num_workers=4", "train.use_gpu=true", "train.cpus_per_worker=8"])
    assert max_concurrency(gpu, {"CPU": 192.0, "GPU": 8.0}) == 2
    assert max_concurrency(gpu, {"CPU": 4.0, "GPU": 0.0}) == 1  # never below one
    fixed = load_config(None, ["tune.max_concurrent_trials=5"])
    assert max_concurrency(fixed, {"CPU": 1.0}) == 5


class NoSignal(torch.utils.data.Dataset):
    """Noise crops with mostly Normal/Mild labels: a model can only learn the class balance."""

    def __init__(self, n: int = 32) -> None:
        rng = np.random.default_rng(0)
        self.crops = rng.random((n, 25, 1, 8, 8), dtype=np.float32)
        self.labels = rng.choice(3, size=(n, 25), p=[0.8, 0.15, 0.05])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"crops": torch.from_numpy(self.crops[i]), "labels": torch.as_tensor(self.labels[i]),
                "mask": torch.ones(25, dtype=torch.bool), "study_id": torch.as_tensor(i)}  # fmt: skip


def _moderate_or_severe_mass(params: dict) -> float:
    """Train with a trial's config; the mean predicted probability of Moderate + Severe."""
    cfg = trial_config(Config(), params | {"train.lr": 1e-2, "loss.aux_slice_weight": 0.0})  # no slice targets here
    torch.manual_seed(0)
    crop = CropConfig(size=8, region=8, slices=1)
    model = build_model(cfg.model, crop)
    loader = DataLoader(NoSignal(), batch_size=8)
    optimizer = make_optimizer(model, cfg.train)
    for _ in range(6):
        train_epoch(model, loader, SeverityLoss(cfg.loss), optimizer, None, torch.device("cpu"))
    return float(predict(model, loader, torch.device("cpu")).probs[..., 1:].sum(-1).mean())


def test_extreme_class_weights_shift_predictions_towards_the_weighted_classes():
    plain = _moderate_or_severe_mass({"loss.class_weights.1": 1.0, "loss.class_weights.2": 1.0})
    heavy = _moderate_or_severe_mass({"loss.class_weights.1": 20.0, "loss.class_weights.2": 20.0})
    assert plain < 0.35 < heavy, (plain, heavy)


def test_zero_strength_augmentation_from_a_trial_is_the_identity():
    zero = {f"augment.{key}": 0.0 for key in ("jitter_px", "rotate_deg", "scale", "brightness", "contrast", "gamma",
                                               "flip_p")} | {"augment.jitter_slices": 0}  # fmt: skip
    augmenter = Augmenter(trial_config(Config(), zero).augment)
    rng = np.random.default_rng(1)
    crops = rng.random((25, 3, 8, 8), dtype=np.float32)
    labels, mask = rng.integers(0, 3, 25), np.ones(25, dtype=bool)
    for _ in range(5):
        params = augmenter.sample(rng)
        slices, xs, ys = augmenter.jitter_points(np.arange(25), np.full(25, 4.0), np.full(25, 5.0), params)
        np.testing.assert_array_equal(slices, np.arange(25))
        assert np.all(xs == 4.0) and np.all(ys == 5.0)
        assert np.all(params.angle_deg == 0) and np.all(params.zoom == 1)
        out, out_labels, out_mask = augmenter.apply(crops, labels, mask, params)
        np.testing.assert_array_equal(out, crops)
        np.testing.assert_array_equal(out_labels, labels)
        np.testing.assert_array_equal(out_mask, mask)
    strong = Augmenter(trial_config(Config(), {"augment.brightness": 0.5}).augment)
    assert not np.array_equal(strong.apply(crops, labels, mask, strong.sample(rng))[0], crops)
