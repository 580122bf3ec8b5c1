"""The token refiner: a few bidirectional transformer blocks over the LLM text states, gated by the timestep.

Shapes: B batch, T text tokens, E text-encoder width (text_dim), D model dim, N heads, Dh head dim.

Its self-attention is plain masked SDPA over the text only (not the `attn_core` seam). Masking follows
diffusers: a query sees the keys that are valid for both itself and the key, and key 0 is always visible
(so padded queries see only the first token and no row is fully masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtron.models.dit.layers import LN_EPS, MLP, ConditionEmbedding, QKVProjection


def refiner_attention_mask(text_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask `[B, 1, T, T]` (True = attend) from a text mask (1 = valid)."""
    if text_mask_BT is None:
        return None
    valid_BT = text_mask_BT.bool()
    mask_B1TT = valid_BT[:, None, :, None] & valid_BT[:, None, None, :]
    mask_B1TT[..., 0] = True
    return mask_B1TT


class RefinerBlock(nn.Module):
    """Pre-norm self-attention + SiLU MLP, each residual scaled by a gate computed from the conditioning."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = QKVProjection(dim, head_dim, qk_norm=False, out=True)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim, act="silu")
        self.mod = nn.Linear(dim, 2 * dim)  # -> (attention gate, MLP gate)

    def forward(self, x_BTD: torch.Tensor, cond_BD: torch.Tensor, mask_B1TT: torch.Tensor | None) -> torch.Tensor:
        q_BTNDh, k_BTNDh, v_BTNDh = self.attn(self.norm1(x_BTD))
        q, k, v = (t.transpose(1, 2) for t in (q_BTNDh, k_BTNDh, v_BTNDh))  # [B, N, T, Dh]
        attn_BNTDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT)
        attn_BTD = self.attn.o(attn_BNTDh.transpose(1, 2).flatten(2))
        gate_attn_BD, gate_mlp_BD = self.mod(F.silu(cond_BD)).chunk(2, dim=1)
        x_BTD = x_BTD + attn_BTD * gate_attn_BD[:, None]
        return x_BTD + self.mlp(self.norm2(x_BTD)) * gate_mlp_BD[:, None]


class TextRefiner(nn.Module):
    """Projects text states `[B, T, E]` to `[B, T, D]` and refines them, conditioned on the timestep and on
    the masked mean of the input text states."""

    def __init__(self, text_dim: int, dim: int, head_dim: int, num_blocks: int, mlp_ratio: float):
        super().__init__()
        self.cond_embed = ConditionEmbedding(dim, text_dim, guidance=False)
        self.proj_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList([RefinerBlock(dim, head_dim, mlp_ratio) for _ in range(num_blocks)])

    def forward(
        self, text_BTE: torch.Tensor, timestep_B: torch.Tensor, text_mask_BT: torch.Tensor | None
    ) -> torch.Tensor:
        if text_mask_BT is None:
            pooled_BE = text_BTE.mean(dim=1)
        else:
            w_BT1 = text_mask_BT.float().unsqueeze(-1)
            pooled_BE = ((text_BTE * w_BT1).sum(dim=1) / w_BT1.sum(dim=1)).to(text_BTE.dtype)
        cond_BD = self.cond_embed(timestep_B, pooled_BE)
        x_BTD = self.proj_in(text_BTE)
        mask_B1TT = refiner_attention_mask(text_mask_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, cond_BD, mask_B1TT)
        return x_BTD
