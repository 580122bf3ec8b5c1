"""Dual-stream and single-stream transformer blocks and the final layer.

Shapes: B batch, V video tokens, T text tokens, L = V + T joint tokens, D model dim, N heads, Dh head dim,
M MLP hidden, P output channels per token (patch volume x out channels).

Every joint attention goes through `self.attn_core(q, k, v, text_mask)` with q, k, v `[B, N, L, Dh]` after
qk-norm and RoPE (video tokens only), ordered [video; text] -- see vidtron/kernels/attention.py. The core is
swapped from outside (context parallel, sparse); nothing here depends on which core is plugged in.

Image-to-video (token replace): the blocks take an optional `first` (`layers.FirstFrame`) after the text mask; the
video tokens it marks (latent frame 0) take their shift / scale / gate from the timestep-0 conditioning through
`layers.Modulation`; text tokens never do. Without it the blocks run the text-to-video operations unchanged.

Seams for tensor / sequence parallelism (vidtron/parallel/tensor_parallel.py), all identities on one device:
- the attention-side token counts come from q/k/v, not from the residual streams, because under sequence
  parallelism a rank's residual stream holds only its token shard while attention sees the gathered tokens;
- the single-stream block joins [video; text] in `self.join` (`TokenJoin`) after the per-token norm and
  modulation, and splits the output projection in `self.split` (`TokenSplit`): the places where SP gathers /
  reduce-scatters each stream;
- `SingleStreamBlock.out.weight` orders its input columns in G = gcd(D, M) groups of [D/G attention; M/G MLP]
  features (`interleave_attn_mlp`), so a contiguous column shard holds matching attention heads and MLP features
  for any TP degree that divides the heads and M (Megatron keeps its fused QKV per head for the same reason).
  diffusers' `proj_out` orders them [attention (D); MLP (M)]; state_dict_adapter converts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vidtron.kernels.attention import DenseAttention
from vidtron.models.dit.layers import MLP, FirstFrame, Modulation, QKVProjection, apply_rope, layer_norm, modulate

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [V, Dh]


def joint_attention(
    attn_core: nn.Module,
    q_BLNDh: torch.Tensor,
    k_BLNDh: torch.Tensor,
    v_BLNDh: torch.Tensor,
    rope: Rope,
    text_mask_BT: torch.Tensor | None,
    num_text: int,
) -> torch.Tensor:
    """RoPE on the video part of q and k, then the attention core; returns `[B, L, N * Dh]`."""
    V = q_BLNDh.shape[1] - num_text
    cos, sin = rope
    q_BLNDh = torch.cat([apply_rope(q_BLNDh[:, :V], cos, sin), q_BLNDh[:, V:]], dim=1)
    k_BLNDh = torch.cat([apply_rope(k_BLNDh[:, :V], cos, sin), k_BLNDh[:, V:]], dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q_BLNDh, k_BLNDh, v_BLNDh))  # [B, N, L, Dh]
    out_BNLDh = attn_core(q, k, v, text_mask_BT)
    return out_BNLDh.transpose(1, 2).flatten(2).to(q.dtype)  # [B, L, N * Dh]


class DoubleStreamBlock(nn.Module):
    """Separate adaLN-zero modulation, q/k/v/o and MLP weights for video and text; one joint attention."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.img_mod = nn.Linear(dim, 6 * dim)  # -> shift, scale, gate (attention); shift, scale, gate (MLP)
        self.txt_mod = nn.Linear(dim, 6 * dim)
        self.img_attn = QKVProjection(dim, head_dim, qk_norm=True, out=True)
        self.txt_attn = QKVProjection(dim, head_dim, qk_norm=True, out=True)
        self.img_mlp = MLP(dim, mlp_hidden, dim, act="gelu_tanh")
        self.txt_mlp = MLP(dim, mlp_hidden, dim, act="gelu_tanh")
        self.attn_core = DenseAttention()

    def forward(
        self,
        img_BVD: torch.Tensor,
        txt_BTD: torch.Tensor,
        cond_BD: torch.Tensor,
        rope: Rope,
        text_mask_BT: torch.Tensor | None,
        first: FirstFrame | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_m = Modulation(self.img_mod, cond_BD, 6, first)  # per video token (image-to-video: frame 0 differs)
        txt_m = self.txt_mod(F.silu(cond_BD)).chunk(6, dim=1)  # 6 x [B, D]
        img_q, img_k, img_v = self.img_attn(img_m.modulate(layer_norm(img_BVD), 0, 1))  # [B, V, N, Dh]
        txt_q, txt_k, txt_v = self.txt_attn(modulate(layer_norm(txt_BTD), txt_m[0], txt_m[1]))  # [B, T, N, Dh]
        attn_BLD = joint_attention(
            self.attn_core,
            torch.cat([img_q, txt_q], dim=1),
            torch.cat([img_k, txt_k], dim=1),
            torch.cat([img_v, txt_v], dim=1),
            rope,
            text_mask_BT,
            num_text=txt_q.shape[1],
        )
        V = img_q.shape[1]  # video tokens in attention (under SP: all of them, while img_BVD holds a shard)
        img_BVD = img_BVD + img_m.gate(self.img_attn.o(attn_BLD[:, :V]), 2)
        txt_BTD = txt_BTD + self.txt_attn.o(attn_BLD[:, V:]) * txt_m[2][:, None]
        img_BVD = img_BVD + img_m.gate(self.img_mlp(img_m.modulate(layer_norm(img_BVD), 3, 4)), 5)
        txt_BTD = txt_BTD + txt_m[5][:, None] * self.txt_mlp(modulate(layer_norm(txt_BTD), txt_m[3], txt_m[4]))
        return img_BVD, txt_BTD


class SingleStreamBlock(nn.Module):
    """One stream over [video; text]: attention and a gelu-tanh MLP in parallel from the same modulated
    input, one output linear over [attention, MLP hidden] (columns interleaved, see the module doc), adaLN-zero
    (shift, scale, gate)."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.mod = nn.Linear(dim, 3 * dim)  # -> shift, scale, gate
        self.attn = QKVProjection(dim, head_dim, qk_norm=True, out=False)
        self.mlp_in = nn.Linear(dim, mlp_hidden)
        self.out = nn.Linear(dim + mlp_hidden, dim)  # row-parallel; input columns from interleave_attn_mlp
        groups = math.gcd(dim, mlp_hidden)  # G column groups of out.weight, each [D/G attention; M/G MLP]
        self.out_group_widths = (dim // groups, mlp_hidden // groups)
        self.join, self.split = TokenJoin(), TokenSplit()
        self.attn_core = DenseAttention()

    def forward(
        self,
        img_BVD: torch.Tensor,
        txt_BTD: torch.Tensor,
        cond_BD: torch.Tensor,
        rope: Rope,
        text_mask_BT: torch.Tensor | None,
        first: FirstFrame | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_m = Modulation(self.mod, cond_BD, 3, first)  # -> shift, scale, gate; text tokens take the timestep's
        shift_BD, scale_BD, gate_BD = img_m.m
        h_img_BVD = img_m.modulate(layer_norm(img_BVD), 0, 1)  # per token: the same as on [video; text]
        h_txt_BTD = modulate(layer_norm(txt_BTD), shift_BD, scale_BD)
        h_BLD, num_text = self.join(h_img_BVD, h_txt_BTD)  # [B, L, D], L = V + T
        mlp_BLM = F.gelu(self.mlp_in(h_BLD), approximate="tanh")
        q, k, v = self.attn(h_BLD)  # [B, L, N, Dh]
        attn_BLD = joint_attention(self.attn_core, q, k, v, rope, text_mask_BT, num_text=num_text)
        out_BLD = self.out(interleave_attn_mlp(attn_BLD, mlp_BLM, *self.out_group_widths))
        out_img_BVD, out_txt_BTD = self.split(out_BLD, num_text)
        return img_BVD + img_m.gate(out_img_BVD, 2), txt_BTD + gate_BD[:, None] * out_txt_BTD


def interleave_attn_mlp(attn_BLD: torch.Tensor, mlp_BLM: torch.Tensor, a_w: int, m_w: int) -> torch.Tensor:
    """The input of `SingleStreamBlock.out`: groups of [a_w attention; m_w MLP] features, `[B, L, D + M]`.

    Works on a TP rank's local slices too (`[B, L, D/tp]`, `[B, L, M/tp]`): the group widths are fixed, so the
    local result is exactly that rank's contiguous column shard of the global one."""
    a_BLGa = attn_BLD.unflatten(-1, (-1, a_w))
    m_BLGm = mlp_BLM.unflatten(-1, (-1, m_w))
    return torch.cat([a_BLGa, m_BLGm], dim=-1).flatten(2)


class TokenJoin(nn.Module):
    """`(img [B, V, D], txt [B, T, D]) -> ([video; text] [B, V + T, D], T)`: the seam where SP gathers the token
    shards of both streams (no parameters; an identity-like concat on one device)."""

    def forward(self, img_BVD: torch.Tensor, txt_BTD: torch.Tensor) -> tuple[torch.Tensor, int]:
        return torch.cat([img_BVD, txt_BTD], dim=1), txt_BTD.shape[1]


class TokenSplit(nn.Module):
    """`([video; text] [B, V + T, D], T) -> (img [B, V, D], txt [B, T, D])`: the seam where SP reduce-scatters the
    row-parallel output back to each stream's token shard."""

    def forward(self, x_BLD: torch.Tensor, num_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        V = x_BLD.shape[1] - num_text
        return x_BLD[:, :V], x_BLD[:, V:]


class FinalLayer(nn.Module):
    """adaLN-continuous norm (scale, shift from the conditioning) and a linear to the patch channels."""

    def __init__(self, dim: int, out_per_token: int):
        super().__init__()
        self.mod = nn.Linear(dim, 2 * dim)  # -> scale, shift (this order, as in diffusers' AdaLayerNormContinuous)
        self.proj = nn.Linear(dim, out_per_token)

    def forward(self, x_BVD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale_BD, shift_BD = self.mod(F.silu(cond_BD).to(x_BVD.dtype)).chunk(2, dim=1)
        return self.proj(modulate(layer_norm(x_BVD), shift_BD, scale_BD))  # [B, V, P]
