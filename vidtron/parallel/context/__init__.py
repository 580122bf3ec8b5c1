"""Context-parallel attention cores (ring, Ulysses, USP), swappable for the DiT's dense `attn_core`.

Contract: `core(q, k, v, text_mask)` with q, k, v `[B, N, Lv_local + T, Dh]` = [this CP rank's contiguous video
chunk; the full replicated text] and text_mask `[B, T]` (True = valid; None = all valid) -> `[B, N, Lv_local + T,
Dh]`, equal to the matching rows of dense attention over all video keys + valid text keys. Split the video tokens
with `shard_video_tokens` (pads at the end to a multiple of cp) and set `core.video_len` to the true number of video
tokens (an attribute, so it can change per batch): the core then knows where the text starts and which trailing
keys are padding. Without video_len the core infers T from text_mask (0 when None) and assumes no padding.

Building the cores from a ParallelDims (mesh dims dp_replicate, dp_shard, cp, tp) is `build_cp_attention(dims)`:

    ring:    RingAttention(dims.mesh["cp"].get_group())
    ulysses: UlyssesAttention(dims.mesh["cp"].get_group())
    usp:     USPAttention(*usp_groups(dims))   # cp split as (ring, ulysses), ulysses innermost

Gradient convention: each rank's backward gives the gradient of its own loss (the loss is the mean over ranks and
FSDP averages over CP ranks); the sum over CP ranks of the gradients equals the gradient of the summed loss.
"""

from __future__ import annotations

from torch import nn

from vidtron.parallel.context.comm import gather_video_tokens, local_video_len, shard_video_tokens
from vidtron.parallel.context.ring import RingAttention, ring_attention
from vidtron.parallel.context.ulysses import UlyssesAttention, check_ulysses_heads
from vidtron.parallel.context.usp import USPAttention, usp_groups

__all__ = [
    "RingAttention",
    "UlyssesAttention",
    "USPAttention",
    "build_cp_attention",
    "check_ulysses_heads",
    "gather_video_tokens",
    "local_video_len",
    "ring_attention",
    "shard_video_tokens",
    "usp_groups",
]


def build_cp_attention(
    dims, video_len: int | None = None, heads: int | None = None, inner: nn.Module | None = None
) -> nn.Module | None:
    """The CP attention core for `dims.cp_mode` on `dims.mesh` (built), or None when cp == 1 (keep the dense core).

    heads: attention heads per TP rank, checked against the Ulysses degree now; inner: Ulysses' inner core
    (default dense; SSTA plugs in here). Collective: every rank must call it (usp builds sub-groups).
    """
    if dims.cp == 1:
        return None
    if dims.cp_mode == "ring":
        return RingAttention(dims.mesh["cp"].get_group(), video_len)
    if dims.cp_mode == "ulysses":
        return UlyssesAttention(dims.mesh["cp"].get_group(), video_len, inner=inner, heads=heads)
    return USPAttention(*usp_groups(dims), video_len=video_len, heads=heads)
