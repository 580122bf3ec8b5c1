"""Building blocks of the DiT: norms, MLPs, q/k/v projections, conditioning embeddings and 3D RoPE.

Shapes: B batch, F latent frames, H, W latent height/width, L tokens, T text tokens, D model dim,
N heads, Dh head dim, C channels.

The math follows diffusers' HunyuanVideo modules operation for operation (so fp32 outputs match to
rounding); parameter names are ours (see state_dict_adapter.py for the mapping).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vidtron.errors import ConfigError

LN_EPS = 1e-6  # eps of every LayerNorm and RMSNorm in HunyuanVideo
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep / guidance features


def layer_norm(x_BLD: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters (the modulated norms of the blocks)."""
    return F.layer_norm(x_BLD, x_BLD.shape[-1:], eps=LN_EPS)


def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return x_BLD * (1 + scale_BD[:, None]) + shift_BD[:, None]


class FirstFrame(NamedTuple):
    """The token-replace (image-to-video) conditioning of a DiT forward: which video tokens hold the clean reference
    frame, and the conditioning they are modulated with instead of the timestep's."""

    mask_BV1: torch.Tensor  # bool [B or 1, V, 1]: True on latent frame 0's tokens of image-conditioned samples
    # [B, D]: MLP(timestep-0 features) + MLP(pooled text), no guidance (diffusers' token_replace_emb)
    cond_BD: torch.Tensor


class Modulation:
    """The chunks of one adaLN linear's output, applied per token: the timestep's for every token, or the
    timestep-0 conditioning's on the tokens of `first.mask_BV1` (image-to-video). Bit-identical to diffusers, which
    slices the first-frame tokens off; with `first=None` it is the plain text-to-video modulation."""

    def __init__(self, linear: nn.Module, cond_BD: torch.Tensor, chunks: int, first: FirstFrame | None = None):
        self.m = linear(F.silu(cond_BD)).chunk(chunks, dim=1)  # chunks x [B, D]
        self.first = first
        self.tr = None if first is None else linear(F.silu(first.cond_BD)).chunk(chunks, dim=1)

    def modulate(self, x_BVD: torch.Tensor, shift: int, scale: int) -> torch.Tensor:
        """x * (1 + scale) + shift with chunks `shift`, `scale`, per token."""
        out = modulate(x_BVD, self.m[shift], self.m[scale])
        if self.first is None:
            return out
        return torch.where(self.first.mask_BV1, modulate(x_BVD, self.tr[shift], self.tr[scale]), out)

    def gate(self, x_BVD: torch.Tensor, gate: int) -> torch.Tensor:
        """x * gate with chunk `gate`, per token."""
        out = x_BVD * self.m[gate][:, None]
        if self.first is None:
            return out
        return torch.where(self.first.mask_BV1, x_BVD * self.tr[gate][:, None], out)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, statistics in fp32 (diffusers' RMSNorm)."""

    def __init__(self, dim: int, eps: float = LN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return x.type_as(self.weight) * self.weight


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: str):
        super().__init__()
        if act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown MLP activation {act!r}; use 'silu' or 'gelu_tanh'")
        self.act = act
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class QKVProjection(nn.Module):
    """Separate q, k, v linears (column-shardable for TP), optional per-head RMSNorm on q and k, and an
    output linear `o` that the caller applies to the attention result (None when the block fuses it)."""

    def __init__(self, dim: int, head_dim: int, qk_norm: bool, out: bool):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.o = nn.Linear(dim, dim) if out else None

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns q, k, v as `[B, L, N, Dh]`; N comes from the tensor (TP may shard the heads)."""
        q_BLNDh = self.q(x_BLD).unflatten(-1, (-1, self.head_dim))
        k_BLNDh = self.k(x_BLD).unflatten(-1, (-1, self.head_dim))
        v_BLNDh = self.v(x_BLD).unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q_BLNDh, k_BLNDh = self.q_norm(q_BLNDh), self.k_norm(k_BLNDh)
        return q_BLNDh, k_BLNDh, v_BLNDh


def timestep_features(t_B: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features `[B, dim]`, cos half first (diffusers' Timesteps(flip_sin_to_cos=True, shift=0))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device)
    freqs = torch.exp(exponent / half)
    args_BH = t_B[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args_BH), torch.sin(args_BH)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Conditioning vector `[B, D]` = MLP(timestep features) [+ MLP(guidance features)] + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.time_mlp = MLP(TIME_FREQ_DIM, dim, dim, act="silu")
        self.pooled_mlp = MLP(pooled_dim, dim, dim, act="silu")
        self.guidance_mlp = MLP(TIME_FREQ_DIM, dim, dim, act="silu") if guidance else None

    def forward(
        self, timestep_B: torch.Tensor, pooled_BP: torch.Tensor, guidance_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        t_BD = self.time_mlp(timestep_features(timestep_B).to(pooled_BP.dtype))
        p_BD = self.pooled_mlp(pooled_BP)
        if self.guidance_mlp is None:
            return t_BD + p_BD
        if guidance_B is None:
            raise ConfigError("guidance", None, "this DiT has guidance_embeds=True: pass guidance [B], e.g. 6.0 * 1000")
        g_BD = self.guidance_mlp(timestep_features(guidance_B).to(pooled_BP.dtype))
        return t_BD + g_BD + p_BD

    def at_timestep_zero(self, pooled_BP: torch.Tensor) -> torch.Tensor:
        """The conditioning of a clean (timestep-0) frame: MLP(features of t=0) + MLP(pooled text), never the
        guidance embedding (diffusers' `token_replace_emb`)."""
        zero_B = torch.zeros(pooled_BP.shape[0], device=pooled_BP.device)
        t_BD = self.time_mlp(timestep_features(zero_B).to(pooled_BP.dtype))
        return t_BD + self.pooled_mlp(pooled_BP)


def rope_cos_sin(
    grid_FHW: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables `[L, Dh]` (cos, sin) for a video token grid in (f, h, w) row-major order; each axis
    takes `axes_dim[i]` channels, every frequency repeated for the two channels of its pair."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid_FHW]
    positions = torch.meshgrid(*axes, indexing="ij")  # 3 x [F, H, W]
    cos, sin = [], []
    for pos, dim in zip(positions, axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles_LA = torch.outer(pos.reshape(-1), inv_freq)  # [L, dim / 2]
        cos.append(angles_LA.cos().repeat_interleave(2, dim=1))
        sin.append(angles_LA.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def apply_rope(x_BLNDh: torch.Tensor, cos_LDh: torch.Tensor, sin_LDh: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); computed in fp32."""
    x0, x1 = x_BLNDh.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(3)
    cos, sin = cos_LDh[None, :, None, :], sin_LDh[None, :, None, :]
    return (x_BLNDh.float() * cos + rotated.float() * sin).to(x_BLNDh.dtype)
