"""Ulysses attention: all-to-all from tokens-sharded / heads-full to tokens-full / heads-sharded, attend, and back.

On Ulysses rank r of u: q, k, v `[B, N, Lv_local + T, Dh]` = [video chunk r; replicated text]. The video part goes
through an all-to-all to `[B, N/u, u * Lv_local, Dh]` (all video tokens, in order, for heads [r*N/u, (r+1)*N/u));
the text part is sliced to the same heads locally (no comm). The inner core then sees the FULL video sequence for
its heads, padding removed, plus the text: `[B, N/u, video_len + T, Dh]` (this is where SSTA plugs in: its masks
equal the single-GPU ones). The video output goes back through the reverse all-to-all; the text output, one head
slice per rank, is all-gathered over heads.

Autograd: all-to-all's backward is the reverse all-to-all; the text all-gather's backward is a reduce-scatter SUM,
because every rank's loss depends on every head slice of the (replicated) text output (see comm.py).

Shape legend: B batch, N heads, u Ulysses degree, Lv video tokens (Lv_local per rank), T text tokens, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vidtron.errors import ConfigError
from vidtron.kernels.lse_attention import LseDenseAttention
from vidtron.parallel.context.comm import all_to_all_autograd, gather_heads, head_slice
from vidtron.parallel.context.ring import split_lengths


def check_ulysses_heads(heads: int, degree: int, field: str = "parallel.ulysses") -> None:
    """Raise ConfigError unless the Ulysses degree divides the heads (per TP rank), naming the valid degrees."""
    if heads % degree:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(field, degree, f"must divide the {heads} attention heads; valid Ulysses degrees: {valid}")


def video_to_heads(q: Tensor, k: Tensor, v: Tensor, video_local: int, group) -> tuple[Tensor, ...]:
    """Video parts `[B, N, Lv_local, Dh]` (tokens sharded) -> `[B, N/u, u * Lv_local, Dh]` (heads sharded), one
    all-to-all for q, k and v together."""
    qkv = torch.stack([t[:, :, :video_local] for t in (q, k, v)])  # [3, B, N, Lv_local, Dh]
    qkv = all_to_all_autograd(qkv, group, scatter_dim=2, gather_dim=3)  # [3, B, N/u, u*Lv_local, Dh]
    return qkv.unbind(0)


def text_to_heads(q: Tensor, k: Tensor, v: Tensor, video_local: int, group) -> tuple[Tensor, ...]:
    """Replicated text parts `[B, N, T, Dh]` -> this rank's head slice `[B, N/u, T, Dh]` (no comm)."""
    return tuple(head_slice(t[:, :, video_local:], group) for t in (q, k, v))


def heads_to_tokens(out_h: Tensor, video_full: int, video_padded: int, group) -> Tensor:
    """Inner output `[B, N/u, video_full + T, Dh]` -> `[B, N, Lv_local + T, Dh]`: video through the reverse
    all-to-all (re-padded to u * Lv_local), text all-gathered over heads."""
    o_vid = F.pad(out_h[:, :, :video_full], (0, 0, 0, video_padded - video_full))  # [B, N/u, u*Lv_local, Dh]
    o_vid = all_to_all_autograd(o_vid, group, scatter_dim=2, gather_dim=1)  # [B, N, Lv_local, Dh]
    o_txt = gather_heads(out_h[:, :, video_full:], group)  # [B, N, T, Dh]
    return torch.cat([o_vid, o_txt], dim=2)


class UlyssesAttention(nn.Module):
    """Ulysses context-parallel attention core with the attn_core contract (see module doc).

    group: the Ulysses process group (the CP group in pure Ulysses mode); video_len: true total video tokens,
    settable per batch as an attribute (None = unpadded); inner: the core run on `[B, N/u, video_len + T, Dh]` with
    the same contract (default: dense attention, LseDenseAttention, i.e. torch's fused SDPA kernels); heads: if
    given, checked against the degree at construction; scale / impl: for the default inner core.
    """

    def __init__(
        self,
        group,
        video_len: int | None = None,
        inner: nn.Module | None = None,
        heads: int | None = None,
        scale: float | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.group, self.video_len = group, video_len
        self.inner = inner if inner is not None else LseDenseAttention(scale, impl)
        if heads is not None:
            check_ulysses_heads(heads, dist.get_world_size(group))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        u = dist.get_world_size(self.group)
        check_ulysses_heads(q.shape[1], u)
        lv, _ = split_lengths(q.shape[2], u, self.video_len, text_mask)
        full = u * lv if self.video_len is None else self.video_len  # real video tokens, padding dropped
        vid = video_to_heads(q, k, v, lv, self.group)  # 3 x [B, N/u, u*Lv_local, Dh]
        txt = text_to_heads(q, k, v, lv, self.group)  # 3 x [B, N/u, T, Dh]
        q_h, k_h, v_h = (torch.cat([a[:, :, :full], b], dim=2) for a, b in zip(vid, txt))  # [B, N/u, Lv + T, Dh]
        out_h = self.inner(q_h, k_h, v_h, text_mask)  # [B, N/u, Lv + T, Dh]
        return heads_to_tokens(out_h, full, u * lv, self.group)  # [B, N, Lv_local + T, Dh]
