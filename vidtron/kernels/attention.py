"""The default dense attention core of the DiT's joint attention (the `attn_core` seam).

Shapes: B batch, N heads, L tokens (video tokens followed by T text tokens), T text tokens, Dh head dim.

Contract of every core (dense, context-parallel, sparse): `core(q, k, v, text_mask) -> out` with q, k, v
`[B, N, L, Dh]` after qk-norm and RoPE, the sequence ordered `[video (L - T); text (T)]`, `text_mask` bool
`[B, T]` (True = valid text token) or None (all valid), and out `[B, N, L, Dh]`. Video keys are always valid;
padded text keys are hidden from every query (padded text queries still attend, as in diffusers).

The computation is `vidtron.kernels.lse_attention.attention`: with impl="auto" torch's SDPA, i.e. the fused kernels
(flash-for-CPU on CPU; flash / memory-efficient / cuDNN on CUDA) that the context-parallel cores use block by block.
"""

from __future__ import annotations

import torch
from torch import nn

from vidtron.kernels.lse_attention import attention, joint_key_mask


def key_padding_mask(text_mask_BT: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Boolean SDPA mask `[B, 1, 1, L]` (True = attend) with every video key valid; None when all are valid."""
    keys_BL = joint_key_mask(text_mask_BT, num_tokens)  # [B, L]
    return None if keys_BL is None else keys_BL[:, None, None, :]


class DenseAttention(nn.Module):
    """Full softmax attention over all L tokens with a key-padding mask for the text; no parameters.

    impl: "auto" (torch SDPA), "fused", "flash" or "math" (see `vidtron.kernels.lse_attention`).
    """

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(
        self,
        q_BNLDh: torch.Tensor,
        k_BNLDh: torch.Tensor,
        v_BNLDh: torch.Tensor,
        text_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        keys_BL = joint_key_mask(text_mask_BT, k_BNLDh.shape[2])  # None when every key is valid
        return attention(q_BNLDh, k_BNLDh, v_BNLDh, keys_BL, impl=self.impl)  # [B, N, L, Dh]
