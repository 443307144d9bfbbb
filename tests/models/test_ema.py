"""The EMA of the weights: the decayed mean, copied buffers, the warm-up, DDP unwrapping, the checkpoint round trip."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from lumbar_ray.models.ema import WARMUP_POWER, ModelEma


def _model(seed: int = 0) -> nn.Module:
    """Parameters and buffers of both kinds: float running statistics and an integer counter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _train_a_bit(model: nn.Module, seed: int) -> None:
    """Move every parameter and every buffer, as an optimiser step and a training forward pass would."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
        model(torch.randn(16, 4, generator=generator))  # BatchNorm's running statistics and counter move


def test_one_update_is_the_decayed_mean_and_copies_the_buffers() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.9, warmup=False)
    old = {name: value.clone() for name, value in ema.module.named_parameters()}
    _train_a_bit(model, seed=1)
    ema.update(model)
    new = dict(model.named_parameters())
    for name, average in ema.module.named_parameters():
        torch.testing.assert_close(average, 0.9 * old[name] + 0.1 * new[name].detach(), rtol=0, atol=1e-6)
        assert not torch.allclose(average, new[name]) and not torch.allclose(average, old[name])
    buffers = dict(model.named_buffers())
    assert {name for name, _ in ema.module.named_buffers()} == set(buffers) == {
        "1.running_mean", "1.running_var", "1.num_batches_tracked"
    }  # fmt: skip
    for name, buffer in ema.module.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)  # copied, not averaged
    assert ema.updates == 1


def test_the_average_is_a_separate_frozen_copy() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.5)
    before = {name: value.clone() for name, value in ema.module.state_dict().items()}
    _train_a_bit(model, seed=2)  # no update: the average must not follow the model by sharing its storage
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not ema.module.training
    assert not any(parameter.requires_grad for parameter in ema.module.parameters())


def test_the_decay_warms_up_to_its_cap() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.99)
    decays = []
    for step in range(1000):
        decays.append(ema.current_decay())
        if step < 2:
            _train_a_bit(model, seed=step)
        ema.update(model)
        if step == 0:  # the first update copies the model: the random start is forgotten at once
            for average, parameter in zip(ema.module.parameters(), model.parameters(), strict=True):
                torch.testing.assert_close(average, parameter.detach(), rtol=0, atol=0)
    assert decays[0] == 0.0
    assert decays[10] == pytest.approx(1 - 11**-WARMUP_POWER)
    assert all(b >= a for a, b in itertools.pairwise(decays))  # rises, never falls
    assert max(decays) == 0.99 == decays[-1]  # capped
    assert decays[400] < 0.99  # and reached only after ~460 updates


def test_without_warm_up_the_decay_is_constant() -> None:
    ema = ModelEma(_model(), decay=0.7, warmup=False)
    assert ema.current_decay() == 0.7
    ema.update(_model(seed=1))
    assert ema.current_decay() == 0.7


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_an_error(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEma(_model(), decay=decay)


def test_the_state_survives_a_checkpoint_round_trip() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.95)
    for step in range(5):
        _train_a_bit(model, seed=10 + step)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = ModelEma(_model(seed=99), decay=0.95)  # other weights, zero updates: everything must come back
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.updates == ema.updates == 5
    assert restored.current_decay() == ema.current_decay()
    for (name, value), (other, restored_value) in zip(ema.module.state_dict().items(),
                                                       restored.module.state_dict().items(), strict=True):  # fmt: skip
        assert name == other
        torch.testing.assert_close(restored_value, value, rtol=0, atol=0)
    _train_a_bit(model, seed=20)  # and the resumed average continues exactly as the uninterrupted one
    ema.update(model)
    restored.update(model)
    for value, restored_value in zip(ema.module.state_dict().values(), restored.module.state_dict().values(),
                                     strict=True):  # fmt: skip
        torch.testing.assert_close(restored_value, value, rtol=0, atol=0)


def test_a_ddp_wrapped_model_is_unwrapped(tmp_path: Path) -> None:
    """Under Ray Train the trained model is DDP-wrapped: the average holds (and reads) the plain network."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        ema = ModelEma(wrapped, decay=0.5, warmup=False)
        assert isinstance(ema.module, nn.Sequential)
        assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix
        old = {name: value.clone() for name, value in ema.module.named_parameters()}
        _train_a_bit(model, seed=3)
        ema.update(wrapped)
        for name, parameter in model.named_parameters():
            expected = 0.5 * old[name] + 0.5 * parameter.detach()
            torch.testing.assert_close(dict(ema.module.named_parameters())[name], expected, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
