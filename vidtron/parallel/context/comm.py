"""Communication and sharding helpers for context parallelism: differentiable all-to-all and head all-gather, ring
P2P exchange, and the video-token shard / gather used by the DiT wrapper.

Gradient convention (all of vidtron's CP): each rank's backward computes the gradient of ITS OWN loss; the training
loss is the mean over ranks and FSDP averages gradients over the CP ranks. So a tensor replicated on every rank whose
value depends on every rank's shard (an all-gather) gets a reduce-scatter SUM in backward.

Shape legend: B batch, N heads, L tokens, Lv video tokens (Lv_local per rank), T text tokens, Dh head dim, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------------------------
# video token sharding (contiguous chunks in CP-rank order, padded at the end)
# ---------------------------------------------------------------------------------------------------------------
def local_video_len(video_len: int, cp: int) -> int:
    """Video tokens per CP rank: the sequence is padded at the end to a multiple of cp, then split evenly."""
    return -(-video_len // cp)


def shard_video_tokens(x: Tensor, cp_rank: int, cp: int, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of the video tokens of `x` along `dim` (zero-padded at the end to cp * chunk).

    x_BLD `[B, Lv, D]` -> `[B, Lv_local, D]` (or any layout, with the tokens on `dim`).
    """
    lv = x.shape[dim]
    chunk = local_video_len(lv, cp)
    pad = chunk * cp - lv
    if pad:
        dim_ = dim % x.dim()
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim_) + [0, pad])
    return x.narrow(dim, cp_rank * chunk, chunk)


def gather_video_tokens(x_local: Tensor, group, video_len: int, dim: int = 1) -> Tensor:
    """Inverse of shard_video_tokens: all-gather the chunks over the CP group, drop the padding.

    `[B, Lv_local, D]` -> `[B, video_len, D]`. Differentiable; backward is a reduce-scatter SUM (see module doc).
    """
    return _GatherAlongDim.apply(x_local, group, dim).narrow(dim, 0, video_len)


# ---------------------------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------------------------
def all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split `x` into `world` chunks along scatter_dim, send chunk i to group rank i, concatenate the received
    chunks along gather_dim in group-rank order. Not differentiable (see all_to_all_autograd)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    send = torch.stack(x.chunk(world, dim=scatter_dim))  # [world, *chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):  # the adjoint of a permutation is its inverse: the reverse all-to-all
        return all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all_autograd(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable all_to_all; backward is the reverse all-to-all."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _all_gather(x: Tensor, group, dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: Tensor, group, dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):  # every rank's loss saw every chunk: sum the gradients, keep our chunk
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


def gather_heads(x_BNLDh: Tensor, group) -> Tensor:
    """All-gather a head slice `[B, N/u, L, Dh]` into `[B, N, L, Dh]`; backward is a reduce-scatter SUM."""
    return _GatherAlongDim.apply(x_BNLDh, group, 1)


def head_slice(x_BNLDh: Tensor, group) -> Tensor:
    """This rank's contiguous slice of the heads of a replicated tensor: `[B, N, L, Dh]` -> `[B, N/u, L, Dh]`."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x_BNLDh.shape[1] // world
    return x_BNLDh[:, rank * n : (rank + 1) * n]


# ---------------------------------------------------------------------------------------------------------------
# ring P2P
# ---------------------------------------------------------------------------------------------------------------
class RingComm:
    """Asynchronous exchange with the ring neighbours: send to rank+1, receive from rank-1 (group ranks)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: Tensor, tag: int = 0) -> tuple[Tensor, list]:
        """Start sending `send` (contiguous; keep it unchanged until wait) to next and receiving a tensor of the
        same shape from prev. Returns (recv buffer, works); call `wait(works)` before reading the buffer."""
        if self.size == 1:
            return send, []
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()
