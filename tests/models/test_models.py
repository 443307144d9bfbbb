"""The severity classifier: shapes for every architecture, target awareness, prior init, training signal."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from lumbar_ray.config import CropConfig, LossConfig, ModelConfig
from lumbar_ray.constants import IGNORE_INDEX, TARGETS
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
    model = build_model(ModelConfig(), CropConfig()).eval()
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


# --- the slice attention's logits (the auxiliary slice loss)


@pytest.mark.parametrize(("pool", "in_chans"), [("attention", 1), ("lstm", 3)])
def test_attention_logits_are_the_pools_own_and_leave_the_default_output_alone(pool: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(pool=pool, in_chans=in_chans), CropConfig(slices=5)).eval()
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
