"""Ring attention: video K/V blocks circulate around the CP ring, partial results merge by log-sum-exp.

Layout on CP rank r of cp: q, k, v `[B, N, Lv_local + T, Dh]` = [this rank's contiguous video chunk (chunk r of the
video sequence padded at the end to cp * Lv_local); the full replicated text]. Every local query row (video and
text) attends every video key of every rank and the valid text keys. Text K/V is attended exactly once, locally;
only the video K/V block travels. Padding keys (the trailing positions beyond `video_len`) are cut off the block.

Forward, step i: start sending the current K/V block to rank r+1 (and receiving from r-1), compute this rank's
queries against the block (owner r - i) with the fused block kernel, merge, then wait. Backward (exact, custom
autograd): each block's fused backward kernel recomputes the block's probabilities from the saved FINAL (out, lse);
dQ accumulates locally; each block's dK/dV accumulator travels with the ring and returns to its owner after cp hops;
text dK/dV stay local. Each rank's backward gives the gradient of its own loss (see comm.py); text rows are computed
in full on every rank, so replicated text needs no reduction here.

Shape legend: B batch, N heads, Lv video tokens (Lv_local per rank), T text tokens, Lq = Lv_local + T, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vidtron.kernels.lse_attention import (
    attention_delta,
    block_attention,
    block_attention_backward,
    merge_lse,
    resolve_impl,
)
from vidtron.parallel.context.comm import RingComm, local_video_len

_KV_TAG, _DKV_TAG = 0, 1


def split_lengths(seq_len: int, cp: int, video_len: int | None, text_mask: Tensor | None) -> tuple[int, int]:
    """(Lv_local, T) of a local `[video chunk; text]` sequence of length `seq_len`.

    With video_len set, Lv_local = ceil(video_len / cp) and T = seq_len - Lv_local. Without it, T comes from
    text_mask (0 when None: all tokens are video) and the video is assumed unpadded.
    """
    if video_len is not None:
        lv = local_video_len(video_len, cp)
        t = seq_len - lv
        if t < 0 or (text_mask is not None and text_mask.shape[1] != t):
            got = "no text_mask" if text_mask is None else f"text_mask with {text_mask.shape[1]} tokens"
            raise ValueError(
                f"CP attention: local sequence of {seq_len} tokens does not fit video_len={video_len} over cp={cp} "
                f"(expected {lv} video tokens per rank + text) and {got}; shard with shard_video_tokens"
            )
        return lv, t
    t = 0 if text_mask is None else text_mask.shape[1]
    return seq_len - t, t


def _valid_keys(block: int, block_len: int, video_len: int | None) -> int:
    """Number of real (non-padding) video keys in ring block `block`."""
    if video_len is None:
        return block_len
    return max(0, min(block_len, video_len - block * block_len))


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_mask, comm, video_local, video_len, scale, impl):
        lv, impl = video_local, resolve_impl(impl, q)
        k_txt, v_txt = k[:, :, lv:], v[:, :, lv:]  # [B, N, T, Dh]
        out, lse = block_attention(q, k_txt, v_txt, text_mask, scale, impl)  # text keys: once, locally
        kv = torch.stack([k[:, :, :lv], v[:, :, :lv]])  # [2, B, N, Lv_local, Dh]
        for i in range(comm.size):
            last = i == comm.size - 1
            if not last:
                kv_next, works = comm.exchange(kv, _KV_TAG)  # in flight while we compute
            n = _valid_keys((comm.rank - i) % comm.size, lv, video_len)
            if n > 0:
                o_b, l_b = block_attention(q, kv[0, :, :, :n], kv[1, :, :, :n], None, scale, impl)
                out, lse = merge_lse(out, lse, o_b, l_b)
            if not last:
                comm.wait(works)
                kv = kv_next
        out = out.to(q.dtype)  # [B, N, Lq, Dh]
        ctx.save_for_backward(q, k, v, out, lse, text_mask)
        ctx.comm, ctx.lv, ctx.video_len, ctx.scale, ctx.impl = comm, lv, video_len, scale, impl
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, text_mask = ctx.saved_tensors
        comm, lv, scale, impl = ctx.comm, ctx.lv, ctx.scale, ctx.impl
        delta = attention_delta(dout, out) if impl == "math" else None  # [B, N, Lq]; fused / flash compute their own
        grad = dict(dout=dout, q=q, out=out, lse=lse, scale=scale, impl=impl, delta=delta)
        dq, dk_txt, dv_txt = block_attention_backward(k=k[:, :, lv:], v=v[:, :, lv:], key_mask=text_mask, **grad)
        kv = torch.stack([k[:, :, :lv], v[:, :, :lv]])  # [2, B, N, Lv_local, Dh]
        dkv, dkv_works = None, []
        for i in range(comm.size):
            last = i == comm.size - 1
            if not last:
                kv_next, kv_works = comm.exchange(kv, _KV_TAG)
            n = _valid_keys((comm.rank - i) % comm.size, lv, ctx.video_len)
            contrib = kv.new_zeros(kv.shape, dtype=torch.float32)  # this rank's share of the block's dK/dV
            if n > 0:
                dq_b, dk_b, dv_b = block_attention_backward(k=kv[0, :, :, :n], v=kv[1, :, :, :n], **grad)
                dq = dq + dq_b
                contrib[0, :, :, :n], contrib[1, :, :, :n] = dk_b, dv_b
            comm.wait(dkv_works)  # the accumulator of this block, from rank r-1 (none at step 0)
            dkv_send = contrib if dkv is None else dkv + contrib  # kept alive until the works complete
            dkv, dkv_works = comm.exchange(dkv_send, _DKV_TAG)  # on to r+1; after the last step it reaches its owner
            if not last:
                comm.wait(kv_works)
                kv = kv_next
        comm.wait(dkv_works)  # our own block's dK/dV, home after cp hops
        dk = torch.cat([dkv[0], dk_txt], dim=2).to(k.dtype)  # [B, N, Lq, Dh]
        dv = torch.cat([dkv[1], dv_txt], dim=2).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    text_mask: Tensor | None,
    comm: RingComm,
    video_local: int,
    video_len: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Ring attention over `comm`'s group on `[B, N, video_local + T, Dh]` -> same shape (see module doc).

    `video_local` is the video block length per ring rank; `video_len` the true total video tokens (None: no
    padding). Ring block j holds video tokens [j * video_local, (j + 1) * video_local).
    """
    if text_mask is not None:
        text_mask = text_mask.bool()
    return _RingAttentionFn.apply(q, k, v, text_mask, comm, video_local, video_len, scale, impl)


class RingAttention(nn.Module):
    """Ring context-parallel attention core with the attn_core contract (see module doc).

    group: the CP process group (e.g. `dims.mesh["cp"].get_group()`); video_len: true total video tokens, settable
    per batch as an attribute (None = the local chunks are unpadded); scale: softmax scale (default Dh**-0.5);
    impl: "auto" | "fused" | "flash" | "math" for the block kernel (vidtron.kernels.lse_attention).
    """

    def __init__(self, group, video_len: int | None = None, scale: float | None = None, impl: str = "auto"):
        super().__init__()
        self.group, self.video_len, self.scale, self.impl = group, video_len, scale, impl
        self._comm: RingComm | None = None

    @property
    def comm(self) -> RingComm:
        if self._comm is None:
            self._comm = RingComm(self.group)
        return self._comm

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        cp = dist.get_world_size(self.group)
        lv, _ = split_lengths(q.shape[2], cp, self.video_len, text_mask)
        return ring_attention(
            q, k, v, text_mask, self.comm, lv, self.video_len, self.scale, self.impl
        )  # [B, N, Lq, Dh]
