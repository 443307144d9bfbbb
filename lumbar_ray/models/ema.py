"""An exponential moving average (EMA) of a model's weights, after timm's ``ModelEmaV3``.

After every optimiser step each parameter of the average moves toward the trained one,
``ema = d_t * ema + (1 - d_t) * param``. Buffers are copied rather than averaged (timm's ``exclude_buffers``):
they are running statistics already (BatchNorm's) or not weights at all (counters, index tables).

The decay warms up: ``d_t = min(decay, 1 - (1 + t) ** -power)`` after ``t`` earlier updates, so the first update
copies the model (``d_0 = 0``) and the average forgets its random start within a few steps: without it a decay
of 0.999 would still hold three quarters of the initial weights after the 300 steps of a small run.
``power = 3/4`` is timm's setting for runs of under ~100k steps (``d_t`` reaches 0.99 after ~460 updates, 0.999
after 10k): in a run of a few hundred steps the warm-up, not ``decay``, sets the average for any ``decay`` above
~0.97.

The average is evaluated, checkpointed and registered in place of the trained weights when ``train.ema_decay`` is
on (see :mod:`lumbar_ray.train.steps`); its :meth:`ModelEma.state_dict` goes into the training checkpoint, so a
resumed run continues the same average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUP_POWER = 0.75
"""Exponent of the decay's warm-up (timm's value for runs of under ~100k steps)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside a DDP wrapper (``.module``), or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEma:
    """An EMA copy of a model, in eval mode and without gradients, on the model's device.

    Args:
        model: the trained model (plain or DDP-wrapped); the average starts as a copy of it.
        decay: the decay ``d`` in ``(0, 1)`` once warmed up.
        warmup: warm the decay up (see the module docstring); False uses ``decay`` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.updates) ** -WARMUP_POWER)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward ``model``'s weights (call after every optimiser step) and copy its buffers.

        Raises:
            KeyError: if ``model`` has another architecture than the average.
        """
        model = unwrap(model)
        weight = 1.0 - self.current_decay()
        parameters = dict(model.named_parameters())
        for name, average in self.module.named_parameters():
            average.lerp_(parameters[name].detach().to(average.dtype), weight)
        buffers = dict(model.named_buffers())
        for name, buffer in self.module.named_buffers():
            buffer.copy_(buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the averaged weights (a CPU copy) and the number of updates so far."""
        weights = {key: value.detach().cpu().clone() for key, value in self.module.state_dict().items()}
        return {"module": weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (onto the average's device)."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
