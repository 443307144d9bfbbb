"""The severity classifier: shapes for every architecture, target awareness, prior init, training signal, the test-time
flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from lumbar_ray.config import CropConfig, LossConfig, ModelConfig
from lumbar_ray.constants import IGNORE_INDEX, TARGETS
from lumbar_ray.data.augment import flip_permutation, flip_targets, mirror_crops
from lumbar_ray.losses import SeverityLoss
from lumbar_ray.models import ARCHITECTURES, DEFAULT_CLASS_PRIOR, POOLS, SeverityNet, build_model
from lumbar_ray.models.encoders import TINY_CNN, has_pretrained_weights
from lumbar_ray.models.net import slice_windows


def _crops(batch: int, slices: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, len(TARGETS), slices, size, size, generator=generator)


def test_architectures_lists_the_four_named_entries() -> None:
    assert {"tiny", "resnet18d", "convnext_nano", "tf_efficientnetv2_s"} <= set(ARCHITECTURES)
    for spec in ARCHITECTURES.values():
        assert spec.pool in POOLS


def test_weights_are_known_to_timm_without_a_download() -> None:
    assert has_pretrained_weights("tf_efficientnetv2_s") and has_pretrained_weights("convnext_nano.in12k")
    assert not has_pretrained_weights("efficientnetv2_s")  # a timm model, but timm has no weights for it
    assert not has_pretrained_weights("convnext_nano.no_such_tag")
    assert not has_pretrained_weights(TINY_CNN)


def test_only_the_builtin_quickstart_cnn_goes_without_weights() -> None:
    assert [arch for arch, spec in ARCHITECTURES.items() if not spec.has_weights] == ["tiny"]
    assert ARCHITECTURES["tiny"].encoder == TINY_CNN


@pytest.mark.parametrize("arch", sorted(arch for arch, spec in ARCHITECTURES.items() if spec.has_weights))
def test_every_real_architecture_has_pretrained_timm_weights(arch: str) -> None:
    assert has_pretrained_weights(ARCHITECTURES[arch].encoder)


def test_pretrained_weights_reach_the_encoder(tmp_path: Path) -> None:
    """From a local copy of timm's weights (no network): the built model holds them; without pretrained it does not."""
    torch.manual_seed(1)
    weights = timm.create_model("resnet18d").state_dict()  # a stand-in for the downloaded file, same keys
    torch.save(weights, tmp_path / "resnet18d.pth")
    crop = CropConfig(size=32, slices=3)
    loaded = build_model(ModelConfig(arch="resnet18d", in_chans=3, pretrained=True,
                                     pretrained_file=str(tmp_path / "resnet18d.pth")), crop)  # fmt: skip
    fresh = build_model(ModelConfig(arch="resnet18d", in_chans=3), crop)
    key = "layer1.0.conv1.weight"
    torch.testing.assert_close(loaded.encoder.state_dict()[key], weights[key])
    assert not torch.equal(fresh.encoder.state_dict()[key], weights[key])


def test_pretrained_refuses_an_encoder_without_weights() -> None:
    # timm itself would only warn and start from random weights.
    with pytest.raises(ValueError, match="'efficientnetv2_s' has no pretrained weights"):
        build_model(ModelConfig(arch="resnet18d", encoder="efficientnetv2_s", pretrained=True), CropConfig())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_25x3_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), CropConfig(size=32, slices=3)).eval()
    assert isinstance(model, SeverityNet)
    with torch.no_grad():
        logits = model(_crops(1, 3, 32))
    assert logits.shape == (1, len(TARGETS), 3)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_cpu_sized() -> None:
    """The quickstart's model: tens of thousands of weights (its speed is measured by benchmarks/train.py)."""
    model = build_model(ModelConfig(), CropConfig()).eval()
    with torch.no_grad():
        logits = model(_crops(8, 5, 32))
    assert logits.shape == (8, len(TARGETS), 3)
    assert sum(parameter.numel() for parameter in model.parameters()) < 100_000


@pytest.mark.parametrize(("slices", "size", "pool"), [(1, 32, "attention"), (9, 40, "lstm"), (5, 64, "mean")])
def test_any_slice_count_size_and_pool(slices: int, size: int, pool: str) -> None:
    model = build_model(ModelConfig(pool=pool), CropConfig(size=size, slices=slices)).eval()
    with torch.no_grad():
        logits = model(_crops(2, slices, size))
    assert logits.shape == (2, len(TARGETS), 3)
    assert torch.isfinite(logits).all()


def test_large_crop_size_runs() -> None:
    model = build_model(ModelConfig(), CropConfig(size=384, slices=1)).eval()
    with torch.no_grad():
        assert model(_crops(1, 1, 384)).shape == (1, len(TARGETS), 3)


def test_pool_override_replaces_the_arch_default() -> None:
    default = build_model(ModelConfig(arch="tiny"), CropConfig())
    lstm = build_model(ModelConfig(arch="tiny", pool="lstm"), CropConfig())
    assert not any(isinstance(m, torch.nn.LSTM) for m in default.modules())
    assert any(isinstance(m, torch.nn.LSTM) for m in lstm.modules())


def test_encoder_override_uses_the_timm_model() -> None:
    model = build_model(ModelConfig(arch="tiny", encoder="test_convnext"), CropConfig())
    assert type(model.encoder).__name__ == "ConvNeXt"
    with torch.no_grad():
        assert model.eval()(_crops(1, 3, 32)).shape == (1, len(TARGETS), 3)


def test_target_embedding_makes_identical_crops_differ_per_target() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(tta_flip=False), CropConfig()).eval()  # the flip would average the sides
    one_crop = torch.rand(1, 1, 5, 32, 32).expand(1, len(TARGETS), 5, 32, 32).contiguous()
    with torch.no_grad():
        logits = model(one_crop)[0]
    # Left (5..9) and right (10..14) foraminal targets share a head, so only the embedding separates them.
    assert not torch.allclose(logits[5], logits[10])
    # Same head, same crop, different level -> different logits too.
    assert not torch.allclose(logits[0], logits[1])


def test_left_and_right_share_a_head() -> None:
    model = build_model(ModelConfig(), CropConfig())
    assert set(model.heads) == {"spinal", "foraminal", "subarticular"}
    with torch.no_grad():
        model.target_embedding.weight.zero_()
        logits = model.eval()(_crops(1, 5, 32, seed=1)[:, [0] * len(TARGETS)])[0]
    # Without embeddings, identical crops through a shared head give identical logits.
    torch.testing.assert_close(logits[5], logits[10])
    torch.testing.assert_close(logits[15], logits[24])
    assert not torch.allclose(logits[0], logits[5])


def test_fresh_model_predicts_the_class_prior() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), CropConfig()).eval()
    with torch.no_grad():
        probs = torch.softmax(model(_crops(4, 5, 32)), dim=-1)
    expected = torch.tensor(DEFAULT_CLASS_PRIOR)
    torch.testing.assert_close(probs.mean(dim=(0, 1)), expected, atol=0.02, rtol=0)
    custom = build_model(ModelConfig(), CropConfig(), class_prior=(1.0, 1.0, 2.0)).eval()
    with torch.no_grad():
        probs = torch.softmax(custom(_crops(2, 5, 32)), dim=-1).mean(dim=(0, 1))
    torch.testing.assert_close(probs, torch.tensor([0.25, 0.25, 0.5]), atol=0.02, rtol=0)


def test_slice_windows_rule() -> None:
    stacks = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1, 1).expand(1, 5, 2, 2)
    windows = slice_windows(stacks, 3)
    assert windows.shape == (1, 5, 3, 2, 2)
    # Window of slice s = slices s-1, s, s+1 with the end slices repeated.
    assert windows[0, :, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert slice_windows(stacks, 1).shape == (1, 5, 1, 2, 2)


def test_in_chans_3_feeds_three_channel_images() -> None:
    model = build_model(ModelConfig(in_chans=3), CropConfig(slices=5))
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 3
    with torch.no_grad():
        assert model.eval()(_crops(2, 5, 32)).shape == (2, len(TARGETS), 3)
        assert model(_crops(1, 1, 32)).shape == (1, len(TARGETS), 3)


def test_unknown_arch_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet18d"):
        build_model(ModelConfig(arch="resnet9000"), CropConfig())


def test_unknown_encoder_is_an_error() -> None:
    with pytest.raises(ValueError, match="not_a_model"):
        build_model(ModelConfig(encoder="not_a_model"), CropConfig())


def test_wrong_input_shape_is_an_error() -> None:
    model = build_model(ModelConfig(), CropConfig())
    with pytest.raises(ValueError, match="25"):
        model(torch.rand(1, 24, 5, 32, 32))


def test_gradients_reach_the_encoder() -> None:
    model = build_model(ModelConfig(), CropConfig())
    labels = torch.randint(0, 3, (2, len(TARGETS)), generator=torch.Generator().manual_seed(0))
    SeverityLoss(LossConfig())(model(_crops(2, 5, 32)), labels).total.backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0
    assert model.target_embedding.weight.grad.abs().sum() > 0


def test_a_few_steps_drive_the_loss_down() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0), CropConfig())
    crops = _crops(4, 5, 32)
    labels = torch.randint(0, 3, (4, len(TARGETS)), generator=torch.Generator().manual_seed(1))
    loss_fn = SeverityLoss(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        output = loss_fn(model(crops), labels)
        optimizer.zero_grad()
        output.total.backward()
        optimizer.step()
        losses.append(float(output.total.detach()))
    assert losses[-1] < 0.7 * losses[0]


TTA_CROP = CropConfig(size=16, region=24, slices=3)


def _lively(tta_flip: bool, seed: int = 0, crop: CropConfig = TTA_CROP) -> SeverityNet:
    """A tiny model in eval mode whose outputs differ a lot by crop and by target: a fresh one predicts about the
    prior everywhere, which no left/right swap changes, so a broken swap would pass the tests below."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(tta_flip=tta_flip), crop)
    with torch.no_grad():  # heads 20 times their initial scale: logits that follow the crops' features
        for head in model.heads.values():
            torch.nn.init.normal_(head.weight, std=1.0 / head.in_features**0.5)
    return model.eval()


def _varied_crops(batch: int, seed: int) -> torch.Tensor:
    """Random crops, each target at its own brightness (plain noise looks alike to an encoder on every target)."""
    crops = _crops(batch, TTA_CROP.slices, TTA_CROP.size, seed=seed)
    brightness = torch.rand(batch, len(TARGETS), 1, 1, 1, generator=torch.Generator().manual_seed(seed + 100))
    return crops * brightness


def _probs(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(crops), dim=-1)


def test_flip_tta_is_equivariant() -> None:
    """Mirroring the studies swaps the left and right predictions of the test-time-flipped model, and only those."""
    model = _lively(tta_flip=True)
    crops = _varied_crops(3, seed=2)
    swap = torch.as_tensor(flip_permutation())
    probs, probs_of_mirror = _probs(model, crops), _probs(model, mirror_crops(crops))
    torch.testing.assert_close(probs_of_mirror, probs[:, swap], atol=1e-5, rtol=0)
    # The check has teeth: left and right predictions differ, and the network alone is not equivariant.
    assert (probs - probs[:, swap]).abs().max() > 1e-2
    with torch.no_grad():
        plain = torch.softmax(model.logits(crops), dim=-1)
        plain_of_mirror = torch.softmax(model.logits(mirror_crops(crops)), dim=-1)
    assert (plain_of_mirror - plain[:, swap]).abs().max() > 1e-2


def test_flip_tta_averages_the_crops_and_the_training_flip_of_them() -> None:
    """The mean of the softmax of each study and of its mirror as the data pipeline's flip makes it, whose label
    swap says where each of the mirror's predictions belongs."""
    model = _lively(tta_flip=True, seed=1)
    crops = _varied_crops(2, seed=3)
    mirrored = []
    for study in crops.numpy():
        flipped, swap, _ = flip_targets(study, np.arange(len(TARGETS)), np.ones(len(TARGETS), dtype=bool))
        mirrored.append(flipped)
    with torch.no_grad():
        plain = torch.softmax(model.logits(crops), dim=-1)
        plain_of_mirror = torch.softmax(model.logits(torch.from_numpy(np.stack(mirrored))), dim=-1)
    expected = (plain + plain_of_mirror[:, torch.as_tensor(swap)]) / 2
    torch.testing.assert_close(_probs(model, crops), expected, atol=1e-6, rtol=0)
    assert (expected - plain).abs().max() > 1e-2  # the flip changes the prediction


def test_with_tta_off_and_in_training_the_network_is_unchanged() -> None:
    on, off = _lively(tta_flip=True), _lively(tta_flip=False)
    # The switch adds no weights: checkpoints and registered weights load into either.
    assert on.state_dict().keys() == off.state_dict().keys()
    for key, value in on.state_dict().items():
        torch.testing.assert_close(off.state_dict()[key], value, rtol=0, atol=0)
    crops = _varied_crops(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(off(crops), on.logits(crops), rtol=0, atol=0)
        assert (torch.softmax(on(crops), -1) - torch.softmax(off(crops), -1)).abs().max() > 1e-3
        on.train()  # training never sees the test-time flip (dropout draws the same mask from the same seed)
        torch.manual_seed(5)
        trained = on(crops)
        torch.manual_seed(5)
        torch.testing.assert_close(trained, on.logits(crops), rtol=0, atol=0)


# --- the slice attention's logits (the auxiliary slice loss)


@pytest.mark.parametrize(("pool", "in_chans"), [("attention", 1), ("lstm", 3)])
def test_attention_logits_are_the_pools_own_and_leave_the_default_output_alone(pool: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(pool=pool, in_chans=in_chans, tta_flip=False), CropConfig(slices=5)).eval()
    crops = _crops(1, 5, 32)
    with torch.no_grad():
        plain = model(crops)
        logits, attention = model(crops, return_attention=True)
        # The pooled features are the softmax(attention)-weighted sum over the slices of what the pool attends to.
        windows = slice_windows(crops.reshape(25, 5, 32, 32), in_chans).reshape(-1, in_chans, 32, 32)
        sequence = model.encoder(windows).reshape(25, 5, -1)
        attended = model.pool.lstm(sequence)[0] if pool == "lstm" else sequence
        weights = torch.softmax(attention.reshape(25, 5, 1), dim=1)
        torch.testing.assert_close((weights * attended).sum(dim=1), model.pool(sequence))
    assert model.has_slice_attention
    assert torch.equal(logits, plain)  # the default forward (what prediction calls) is unchanged
    assert attention.shape == (1, len(TARGETS), 5)
    assert not torch.allclose(attention, attention[..., :1])  # real scores, not a constant


def test_a_pool_without_attention_says_so() -> None:
    model = build_model(ModelConfig(pool="mean"), CropConfig())
    assert not model.has_slice_attention
    with pytest.raises(ValueError, match="MeanPool has no attention"):
        model(_crops(1, 5, 32), return_attention=True)


@pytest.mark.parametrize("pool", ["attention", "lstm"])
def test_the_aux_slice_gradient_reaches_the_attention(pool: str) -> None:
    """With every severity label unknown, only the auxiliary term can move the attention: it does when weighted."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(pool=pool), CropConfig(slices=3))
    logits, attention = model(_crops(1, 3, 32), return_attention=True)
    targets = torch.randint(0, 3, (1, len(TARGETS)), generator=torch.Generator().manual_seed(2))
    scorer = list((model.pool.attention.score if pool == "lstm" else model.pool.score).parameters())

    def attention_grads(weight: float, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total = SeverityLoss(LossConfig(aux_slice_weight=weight))(logits, labels, attention, targets).total
        return torch.autograd.grad(total, scorer, retain_graph=True, allow_unused=True, materialize_grads=True)

    unlabelled = torch.full((1, len(TARGETS)), IGNORE_INDEX)
    assert all(grad.abs().sum() > 0 for grad in attention_grads(1.0, unlabelled))
    assert all(grad.abs().sum() == 0 for grad in attention_grads(0.0, unlabelled))
    labels = torch.randint(0, 3, (1, len(TARGETS)), generator=torch.Generator().manual_seed(1))
    with_aux, without = attention_grads(1.0, labels), attention_grads(0.0, labels)
    assert any(not torch.allclose(a, b) for a, b in zip(with_aux, without, strict=True))


# --- two views per target (crop.second_view)


TWO_VIEWS = TTA_CROP.model_copy(update={"second_view": True})
SUBARTICULAR = [t for t, target in enumerate(TARGETS) if "subarticular" in target]


def _two_view_crops(batch: int, seed: int) -> torch.Tensor:
    """``(batch, 50, ...)``: varied crops in both views, the subarticular targets' second views missing (zero)."""
    crops = torch.cat([_varied_crops(batch, seed), _varied_crops(batch, seed + 1)], dim=1)
    crops[:, [len(TARGETS) + t for t in SUBARTICULAR]] = 0.0
    return crops


def _one_view_twin(model: SeverityNet) -> SeverityNet:
    """The one-view network with the two-view ``model``'s weights (all but the view embedding), in eval mode."""
    twin = build_model(ModelConfig(tta_flip=model.tta_flip), TTA_CROP)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("view_embedding")}
    twin.load_state_dict(state)
    return twin.eval()


def test_a_two_view_model_reads_50_crops_and_returns_its_first_views_attention() -> None:
    model = _lively(tta_flip=False, crop=TWO_VIEWS)
    crops = _two_view_crops(2, seed=5)
    with torch.no_grad():
        logits, attention = model(crops, return_attention=True)
        assert logits.shape == (2, 25, 3) and attention.shape == (2, 25, TTA_CROP.slices)
        torch.testing.assert_close(model(crops), logits, rtol=0, atol=0)
        _, first_view = _one_view_twin(model)(crops[:, : len(TARGETS)], return_attention=True)
    torch.testing.assert_close(attention, first_view, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 50, S, H, W\)"):
        model(crops[:, : len(TARGETS)])
    with pytest.raises(ValueError, match="views must be 1 to 2"):
        SeverityNet(torch.nn.Identity(), 8, views=3)


def test_a_missing_view_is_left_out_of_the_fusion_not_zeroed_into_it() -> None:
    """Whatever features a missing (all-zero) view would give, even NaN, the output is the same: they are never
    used. A target seen once is read as that one view (plus its view embedding), not diluted towards zero, and a
    view that is present does change its target's output."""
    model = _lively(tta_flip=False, crop=TWO_VIEWS)
    crops = _two_view_crops(2, seed=6)
    missing = crops.flatten(2).eq(0).all(-1).reshape(-1)  # the pool's rows: (batch * 50,)
    assert missing.sum() == 2 * len(SUBARTICULAR)
    with torch.no_grad():
        reference = model(crops)
        handle = model.pool.register_forward_hook(lambda _m, _i, out: out.masked_fill(missing[:, None], torch.nan))
        try:
            poisoned = model(crops)
        finally:
            handle.remove()
        assert torch.equal(poisoned, reference)
        twin = _one_view_twin(model)
        twin.target_embedding.weight += model.view_embedding.weight[0]  # the first view's embedding, alone
        seen_once = twin(crops[:, : len(TARGETS)])
        torch.testing.assert_close(reference[:, SUBARTICULAR], seen_once[:, SUBARTICULAR], rtol=0, atol=1e-5)
        shown = crops.clone()
        shown[:, len(TARGETS) + SUBARTICULAR[0]] = crops[:, SUBARTICULAR[0]]
        changed = model(shown)
    others = [t for t in range(len(TARGETS)) if t != SUBARTICULAR[0]]
    assert (changed[:, SUBARTICULAR[0]] - reference[:, SUBARTICULAR[0]]).abs().max() > 1e-3
    torch.testing.assert_close(changed[:, others], reference[:, others], rtol=0, atol=1e-6)


def test_only_the_crops_that_exist_go_through_the_encoder() -> None:
    """The subarticular targets never have a second view: their empty crops are not encoded (a fifth of a two-view
    study's compute, and batch statistics that eval never fuses); a one-view model still encodes every crop."""
    model = _lively(tta_flip=False, crop=TWO_VIEWS)
    crops = _two_view_crops(2, seed=6)
    crops[0, 3] = 0.0  # a primary crop missing too
    twin = _one_view_twin(model)
    seen: list[int] = []
    for net in (model, twin):
        net.encoder.register_forward_hook(lambda _m, inputs, _out: seen.append(len(inputs[0])))
    with torch.no_grad():
        model(crops)
        twin(crops[:, : len(TARGETS)])
    slices = crops.shape[2]
    assert seen == [(2 * 50 - 2 * len(SUBARTICULAR) - 1) * slices, 2 * len(TARGETS) * slices]


def test_the_second_view_alone_trains_the_encoder_and_a_missing_one_gets_no_gradient() -> None:
    model = _lively(tta_flip=False, crop=TWO_VIEWS)  # eval mode: BatchNorm does not couple the crops
    crops = _two_view_crops(2, seed=7)
    crops[:, : len(TARGETS)] = 0.0  # no first view at all: whatever is learnt comes through the second
    crops.requires_grad_(True)
    labels = torch.randint(0, 3, (2, len(TARGETS)), generator=torch.Generator().manual_seed(3))
    labels[:, SUBARTICULAR] = IGNORE_INDEX  # no view of them at all: their outputs are ignored, as the data masks
    SeverityLoss(LossConfig())(model(crops), labels).total.backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0 and model.view_embedding.weight.grad[1].abs().sum() > 0
    assert model.view_embedding.weight.grad[0].abs().sum() == 0  # the absent first views took no part
    per_crop = crops.grad.flatten(2).abs().sum(-1)[0]
    assert (per_crop[len(TARGETS) :][[t for t in range(len(TARGETS)) if t not in SUBARTICULAR]] > 0).all()
    assert per_crop[: len(TARGETS)].sum() == 0 and per_crop[[len(TARGETS) + t for t in SUBARTICULAR]].sum() == 0


def test_flip_tta_is_equivariant_with_two_views() -> None:
    """Mirroring both blocks of crops swaps the left and right predictions of the test-time-flipped model."""
    model = _lively(tta_flip=True, crop=TWO_VIEWS)
    crops = _two_view_crops(3, seed=8)
    swap = torch.as_tensor(flip_permutation())
    probs, probs_of_mirror = _probs(model, crops), _probs(model, mirror_crops(crops))
    torch.testing.assert_close(probs_of_mirror, probs[:, swap], atol=1e-5, rtol=0)
    assert (probs - probs[:, swap]).abs().max() > 1e-2
    with torch.no_grad():  # the check has teeth: the network alone is not equivariant
        plain = torch.softmax(model.logits(crops), dim=-1)
        plain_of_mirror = torch.softmax(model.logits(mirror_crops(crops)), dim=-1)
    assert (plain_of_mirror - plain[:, swap]).abs().max() > 1e-2


def test_a_one_view_model_keeps_exactly_its_former_parameters() -> None:
    """Checkpoints and registered weights of one-view models load: views add parameters only when there are two."""
    one = build_model(ModelConfig(), CropConfig())
    assert {key.split(".")[0] for key in one.state_dict()} == {"encoder", "pool", "target_embedding", "norm", "heads"}
    two = build_model(ModelConfig(), CropConfig(second_view=True))
    assert set(two.state_dict()) - set(one.state_dict()) == {"view_embedding.weight"}
    assert two.view_embedding.weight.shape == (2, two.target_embedding.weight.shape[1])
