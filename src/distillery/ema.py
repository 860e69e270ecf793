"""The EMA of the student's weights, with the warm-up of diffusers' ``EMAModel``.

BK-SDM's recipe keeps an EMA at decay 0.9999 through diffusers' ``EMAModel``, whose decay is not
constant: the first update copies the weights, and the t-th after it (t updates so far) uses
min(decay, (1 + t) / (10 + t)), so that the average follows the early, fast-moving weights
instead of staying near the initial ones for tens of thousands of steps. ``warmup=False`` keeps
the constant decay from the second update on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def warmup_decay(decay: float, updates_so_far: int) -> float:
    """The decay of the update that follows ``updates_so_far`` updates (the first is a copy)."""
    t = updates_so_far
    return min(decay, (1 + t) / (10 + t))


def _warmup_multi_avg_fn(decay: float):
    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel calls this from the second update on, with num_averaged >= 1.
        d = warmup_decay(decay, int(num_averaged))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def make_ema(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An EMA copy of ``model`` (parameters and buffers), frozen; ``update_parameters(model)``
    once per optimizer step. The update count is a buffer, so a resumed run continues the
    warm-up where it stopped."""
    fn = _warmup_multi_avg_fn(float(decay)) if warmup else get_ema_multi_avg_fn(float(decay))
    ema = AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
    return ema.requires_grad_(False)


@torch.no_grad()
def lerp_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * source``, parameters and floating buffers, from
    the first update on (a consistency model's target network; no copy, no warm-up)."""
    t = [p for p in target.parameters()] + [b for b in target.buffers() if b.is_floating_point()]
    s = [p for p in source.parameters()] + [b for b in source.buffers() if b.is_floating_point()]
    torch._foreach_lerp_(t, [x.detach().to(y.dtype) for x, y in zip(s, t)], 1.0 - float(decay))
