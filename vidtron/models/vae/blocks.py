"""Building blocks of the causal 3D VAE: causal conv, resnet, resamplers, causal mid-block attention.

Causality: every conv pads time with kernel_t - 1 copies of the first frame in front and nothing behind, so
output frame t depends on input frames <= t only; attention lets a position see its own and earlier frames.

Shape legend: B batch, C channels, F frames, H height, W width, L = F*H*W positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_EPS = 1e-6  # GroupNorm eps everywhere in the VAE


def _triple(x: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (x, x, x) if isinstance(x, int) else tuple(x)


def run_block(block: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """block(x), recomputed in backward when `recompute` and autograd is on (activation checkpointing)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class CausalConv3d(nn.Conv3d):
    """Conv3d over (F, H, W): space padded symmetrically, time padded causally, both in replicate mode."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int | tuple[int, int, int] = 1):
        kt, kh, kw = _triple(kernel_size)
        super().__init__(in_ch, out_ch, (kt, kh, kw), stride=stride, padding=0)
        # F.pad order is (W left, W right, H top, H bottom, F front, F back)
        self.causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        x = F.pad(x_BCFHW, self.causal_padding, mode="replicate")  # [B, C, F + kt-1, H + 2*(kh//2), W + ...]
        return super().forward(x)  # [B, C_out, ceil(F / st), ceil(H / sh), ceil(W / sw)]


class CausalUpsample3d(CausalConv3d):
    """Nearest upsampling by (t, h, w), then a causal 3x3x3 conv. The first frame is upsampled in space only, so
    k+1 frames become t*k+1 (with t=2: 1 -> 1, 3 -> 5, 5 -> 9)."""

    def __init__(self, channels: int, factors: tuple[int, int, int]):
        super().__init__(channels, channels, 3)
        self.factors = tuple(factors)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        _, fh, fw = self.factors
        first = F.interpolate(x_BCFHW[:, :, :1], scale_factor=(1, fh, fw), mode="nearest")  # [B, C, 1, fh*H, fw*W]
        if x_BCFHW.size(2) > 1:
            rest = x_BCFHW[:, :, 1:].contiguous()  # non-contiguous inputs break nearest interpolate (torch #81665)
            rest = F.interpolate(rest, scale_factor=self.factors, mode="nearest")  # [B, C, ft*(F-1), fh*H, fw*W]
            first = torch.cat([first, rest], dim=2)  # [B, C, 1 + ft*(F-1), fh*H, fw*W]
        return super().forward(first)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> causal conv, twice, plus a (1x1x1 causal conv) shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_ch, out_ch, 3)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_ch, out_ch, 3)
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCFHW)))  # [B, C_out, F, H, W]
        h = self.conv2(F.silu(self.norm2(h)))  # [B, C_out, F, H, W]
        skip = x_BCFHW if self.conv_shortcut is None else self.conv_shortcut(x_BCFHW)
        return h + skip


class CausalAttention(nn.Module):
    """Single-head self-attention over all F*H*W positions, block-causal in time: a position attends to every
    position of its own frame and of earlier frames. GroupNorm before, residual after."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        B, C, Fr, H, W = x_BCFHW.shape
        x_BLC = x_BCFHW.permute(0, 2, 3, 4, 1).reshape(B, Fr * H * W, C)  # positions ordered (f, h, w)
        h_BLC = self.norm(x_BCFHW).permute(0, 2, 3, 4, 1).reshape(B, Fr * H * W, C)  # stats over (C/G, F, H, W)
        q, k, v = (proj(h_BLC).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, L, C] each
        frame_L = torch.arange(Fr, device=x_BCFHW.device).repeat_interleave(H * W)
        allowed_LL = frame_L[None, :] <= frame_L[:, None]  # row = query, col = key: key frame <= query frame
        o_BLC = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_LL).squeeze(1)  # [B, L, C]
        out_BLC = self.to_out(o_BLC) + x_BLC
        return out_BLC.reshape(B, Fr, H, W, C).permute(0, 4, 1, 2, 3)  # [B, C, F, H, W]


class MidBlock(nn.Module):
    """resnet -> causal attention (optional) -> resnet, at constant channels and resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attn = CausalAttention(channels, groups) if add_attention else None

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x_BCFHW)
        if self.attn is not None:
            x = self.attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """`num_layers` resnets, then a causal conv with stride `factors` (t, h, w) unless factors are all 1."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, factors: tuple[int, int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)
        )
        self.downsample = CausalConv3d(out_ch, out_ch, 3, stride=factors) if max(factors) > 1 else None

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x_BCFHW = resnet(x_BCFHW)
        if self.downsample is not None:
            x_BCFHW = self.downsample(x_BCFHW)  # [B, C, (F-1)/t + 1, H/h, W/w]
        return x_BCFHW


class UpBlock(nn.Module):
    """`num_layers` resnets, then nearest upsampling by `factors` (t, h, w) and a causal conv unless all 1."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, factors: tuple[int, int, int]):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)
        )
        self.upsample = CausalUpsample3d(out_ch, factors) if max(factors) > 1 else None

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x_BCFHW = resnet(x_BCFHW)
        if self.upsample is not None:
            x_BCFHW = self.upsample(x_BCFHW)  # [B, C, t*(F-1) + 1, h*H, w*W]
        return x_BCFHW
