"""SSTA as the inner core of Ulysses attention on 2 gloo ranks equals single-process SSTA: outputs and block masks.

Under Ulysses each rank's inner core sees the full video sequence (plus text) for its slice of the heads, so the
SSTA mask it builds must be exactly the single-process mask for those heads, and its output the matching slice.
Tolerance 1e-5 on outputs (the same SDPA calls on the same rows; only batching of rows differs); masks exact.

Shape legend: B batch, N heads, Lv video tokens, T text tokens, Dh head dim, nb blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist

import vidtron.kernels.ssta.torch_impl as ssta_torch
from vidtron.kernels.ssta import SSTAAttention
from vidtron.parallel.context.ulysses import UlyssesAttention
from vidtron.testing.multirank import run_ranks

CANVAS, TILE, WINDOW, TOPK = (6, 16, 16), (2, 4, 4), (1, 3, 3), 2
B, N, T, DH = 1, 4, 8, 16
LV = CANVAS[0] * CANVAS[1] * CANVAS[2]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, LV + T, DH, generator=g) for _ in range(3))  # [B, N, Lv + T, Dh]
    text_mask = torch.arange(T)[None] < T - 3  # [B, T]: the last 3 text tokens are padding
    return q, k, v, text_mask


def _core() -> SSTAAttention:
    return SSTAAttention(CANVAS, T, TILE, WINDOW, TOPK, lam=0.7)


@contextmanager
def _recorded_masks():
    """Record every block mask the SSTA core builds (the exact tensor it passes to the sparse kernel)."""
    masks, original = [], ssta_torch.block_mask_from_tiles

    def record(*args, **kwargs):
        masks.append(original(*args, **kwargs))
        return masks[-1]

    with mock.patch.object(ssta_torch, "block_mask_from_tiles", record):
        yield masks


def _ulysses_rank() -> tuple[torch.Tensor, torch.Tensor]:
    rank, u = dist.get_rank(), dist.get_world_size()
    q, k, v, text_mask = _inputs()
    lv = LV // u
    local = [torch.cat([t[:, :, rank * lv : (rank + 1) * lv], t[:, :, LV:]], dim=2) for t in (q, k, v)]
    attn = UlyssesAttention(dist.group.WORLD, video_len=LV, inner=_core(), heads=N)
    with _recorded_masks() as masks:
        out = attn(*local, text_mask)  # [B, N, Lv/u + T, Dh]
    assert len(masks) == 1
    return out, masks[0]  # mask [B, N/u, nb, nb] for heads [rank*N/u, (rank+1)*N/u)


def test_ssta_inside_ulysses_matches_single_process():
    q, k, v, text_mask = _inputs()
    with _recorded_masks() as masks:
        ref = _core()(q, k, v, text_mask)  # [B, N, Lv + T, Dh]
    ref_mask = masks[0]  # [B, N, nb, nb]
    assert not ref_mask[:, :, :-1, :-1].all()  # the mask really is sparse over the video blocks
    u = 2
    lv, hu = LV // u, N // u
    for rank, (out, mask) in enumerate(run_ranks(_ulysses_rank, u)):
        want = torch.cat([ref[:, :, rank * lv : (rank + 1) * lv], ref[:, :, LV:]], dim=2)
        err = (out - want).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: max |d out| = {err}"
        assert torch.equal(mask, ref_mask[:, rank * hu : (rank + 1) * hu]), f"rank {rank}: block mask differs"
