"""The default dense attention core of the DiT's joint attention (the `attn_core` seam).

Shapes: B batch, N heads, L tokens (video tokens followed by T text tokens), T text tokens, Dh head dim.

Contract of every core (dense, context-parallel, sparse): `core(q, k, v, text_mask) -> out` with q, k, v
`[B, N, L, Dh]` after qk-norm and RoPE, the sequence ordered `[video (L - T); text (T)]`, `text_mask` bool
`[B, T]` (True = valid text token) or None (all valid), and out `[B, N, L, Dh]`. Video keys are always valid;
padded text keys are hidden from every query (padded text queries still attend, as in diffusers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_mask(text_mask_BT: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Boolean SDPA mask `[B, 1, 1, L]` (True = attend) with every video key valid; None when all are valid."""
    if text_mask_BT is None:
        return None
    B, T = text_mask_BT.shape
    video_BV = torch.ones(B, num_tokens - T, dtype=torch.bool, device=text_mask_BT.device)
    keys_BL = torch.cat([video_BV, text_mask_BT.bool()], dim=1)  # [B, L]
    return keys_BL[:, None, None, :]


class DenseAttention(nn.Module):
    """Full softmax attention over all L tokens with a key-padding mask for the text; no parameters."""

    def forward(
        self,
        q_BNLDh: torch.Tensor,
        k_BNLDh: torch.Tensor,
        v_BNLDh: torch.Tensor,
        text_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask_B11L = key_padding_mask(text_mask_BT, k_BNLDh.shape[2])
        return F.scaled_dot_product_attention(q_BNLDh, k_BNLDh, v_BNLDh, attn_mask=mask_B11L)  # [B, N, L, Dh]
