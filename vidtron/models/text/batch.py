"""TextBatch: what every text encoder returns. Legend: B captions, T text tokens, D text dim, P pooled dim."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextBatch:
    states: torch.Tensor  # [B, T, D] float
    mask: torch.Tensor  # [B, T] bool, True = valid, padding at the end
    pooled: torch.Tensor  # [B, P] float

    def index(self, idx: torch.Tensor) -> TextBatch:
        return TextBatch(self.states[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> TextBatch:
        return TextBatch(self.states.to(device), self.mask.to(device), self.pooled.to(device))
