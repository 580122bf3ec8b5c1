"""EMA of the weights: a shadow copy of every trainable parameter, sharded like it (a DTensor's EMA is a DTensor with
the same placements), updated after every applied optimizer step and checkpointed under the "ema" key, so DCP
reshards it by name with the model. Sampling and export choose it with `--weights ema`.

    ema_t = decay * ema_(t-1) + (1 - decay) * param_t        (ema_0 = the initial weights)
"""

from __future__ import annotations

import torch
from torch import nn

CHECKPOINT_KEY = "ema"  # the top-level DCP key next to "model" and "optim"


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> EMA tensor (DTensors stay sharded): what checkpoints save and load in place."""
        return self.shadow
