"""Token sharding around the DiT's blocks for context (CP) and sequence (SP) parallelism, applied with hooks.

Shape legend: B batch, V video tokens, T text tokens, D model dim, Dh head dim, N heads (N/tp per TP rank).

The token layout (the design):
- video: CP rank c holds the contiguous chunk c of the video tokens, padded at the end to cp * Vc tokens,
  Vc = ceil(V / cp) (the contract of vidtron/parallel/context). Under SP the chunk is padded again to
  Vc_pad = tp * ceil(Vc / tp) and TP rank t holds its slice t: `[B, Vc_pad/tp, D]`.
- text: REPLICATED over CP (every CP rank attends all of it, as the CP cores expect), SHARDED over TP like the video
  (padded to T_pad = tp * ceil(T / tp)): `[B, T_pad/tp, D]`. Sharding text too keeps every SP region uniformly
  token-sharded, so each parameter / modulation vector touching it has a partial gradient with one reduction rule
  (tensor_parallel.py); with T ~ 256 << V the padding costs nothing. Padded text keys are masked out (the joint
  text mask is padded with False); padded text queries produce rows nobody reads.
- RoPE: only the video rows of this CP rank's chunk, `[Vc_pad, Dh]` (attention runs on the TP-gathered chunk).
- inside attention (a TP region: the chunk's tokens are gathered, heads are local) `SequencePaddedCore` drops
  the SP padding rows [Vc, Vc_pad) before the core (dense, or ring / Ulysses / USP with `video_len = V`) and
  puts zero rows back after it, so cores only ever see the CP layout.
- before the final layer: TP all-gather (backward: take the own slice, the final layer being computed in full on
  every TP rank), drop SP padding, CP all-gather (backward: reduce-scatter SUM, the CP convention of
  vidtron/parallel/context/comm.py), drop CP padding: `[B, V, D]` on every rank, and the loss is computed in full
  on every rank (FSDP's average over the CP ranks then yields the exact gradient).

Hooks, registered by the model's own `wrap_tokens` (vidtron/models/dit/sharding.py; the model stays a single-device
module):
- the first block's forward pre-hook shards video + text and builds this batch's RoPE chunk and padded text mask;
- every block's pre-hook swaps the full RoPE / text mask arguments for those;
- the final layer's pre-hook gathers the video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from vidtron.parallel.context.comm import gather_video_tokens, local_video_len, shard_video_tokens


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _pad_tokens(x: Tensor, length: int, dim: int = 1) -> Tensor:
    """Zero-pad `x` along `dim` (the token dim) up to `length`."""
    pad = length - x.shape[dim]
    if pad == 0:
        return x
    dim = dim % x.dim()
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])


@dataclass
class TokenLayout:
    """Token counts of the current batch (set by the first block's hook, read by the attention cores)."""

    video_len: int = 0  # V: true video tokens
    video_local: int = 0  # Vc: video tokens per CP rank (CP-padded chunk)
    video_padded: int = 0  # Vc_pad: the chunk padded to a multiple of tp
    text_len: int = 0  # T
    text_padded: int = 0  # T_pad: a multiple of tp
    rope: tuple[Tensor, Tensor] | None = None  # this CP rank's RoPE rows, 2 x [Vc_pad, Dh]
    text_mask: Tensor | None = None  # [B, T_pad] bool, or None when all text is valid and unpadded


class TokenSharder:
    """Shard / gather the video and text token streams over cp and tp meshes (either may have size 1)."""

    def __init__(self, cp_mesh, tp_mesh):
        self.cp_mesh, self.tp_mesh = cp_mesh, tp_mesh
        self.cp, self.tp = cp_mesh.size(), tp_mesh.size()
        self.cp_rank = cp_mesh.get_local_rank()
        self.layout = TokenLayout()

    # ---- entering the blocks ----
    def enter(self, img_BVD: Tensor, txt_BTD: Tensor, rope, text_mask_BT: Tensor | None):
        """Full streams -> this rank's shards; records the layout, RoPE chunk and padded mask for the blocks."""
        lay = self.layout
        lay.video_len, lay.text_len = img_BVD.shape[1], txt_BTD.shape[1]
        lay.video_local = local_video_len(lay.video_len, self.cp)
        lay.video_padded = _round_up(lay.video_local, self.tp)
        lay.text_padded = _round_up(lay.text_len, self.tp)
        lay.rope = tuple(_pad_tokens(self._cp_chunk(t, dim=0), lay.video_padded, dim=0) for t in rope)
        lay.text_mask = self._pad_mask(text_mask_BT, img_BVD.shape[0], txt_BTD.device)
        img = _pad_tokens(self._cp_chunk(img_BVD, dim=1), lay.video_padded)  # [B, Vc_pad, D]
        txt = _pad_tokens(txt_BTD, lay.text_padded)  # [B, T_pad, D]
        return self._tp_split(img), self._tp_split(txt)  # [B, Vc_pad/tp, D], [B, T_pad/tp, D]

    def shard_like_video(self, x_BV: Tensor) -> Tensor:
        """A per-video-token tensor without gradient `[B, V, ...]` (e.g. a bool mask; B may be 1) -> this rank's
        tokens, laid out as `enter` lays out the video (CP chunk, padded with zeros / False, TP slice)."""
        lay = self.layout
        x = _pad_tokens(self._cp_chunk(x_BV, dim=1), lay.video_padded)  # [B, Vc_pad, ...]
        per_rank = lay.video_padded // self.tp
        return x.narrow(1, self.tp_mesh.get_local_rank() * per_rank, per_rank)  # [B, Vc_pad/tp, ...]

    def _cp_chunk(self, x: Tensor, dim: int) -> Tensor:
        return x if self.cp == 1 else shard_video_tokens(x, self.cp_rank, self.cp, dim=dim)

    def _pad_mask(self, mask_BT: Tensor | None, batch: int, device) -> Tensor | None:
        lay = self.layout
        if lay.text_padded == lay.text_len:
            return mask_BT
        if mask_BT is None:
            mask_BT = torch.ones(batch, lay.text_len, dtype=torch.bool, device=device)
        return F.pad(mask_BT.bool(), (0, lay.text_padded - lay.text_len), value=False)

    def _tp_split(self, x_BLD: Tensor) -> Tensor:
        """Replicated -> this TP rank's token slice (backward: all-gather of the slices' gradients)."""
        if self.tp == 1:
            return x_BLD
        full = DTensor.from_local(x_BLD, self.tp_mesh, (Replicate(),), run_check=False)
        return full.redistribute(placements=(Shard(1),)).to_local()

    # ---- leaving the blocks ----
    def exit(self, img_BVD: Tensor) -> Tensor:
        """This rank's video slice `[B, Vc_pad/tp, D]` -> all video tokens `[B, V, D]`."""
        lay = self.layout
        if self.tp > 1:
            shard = DTensor.from_local(img_BVD, self.tp_mesh, (Shard(1),), run_check=False)
            img_BVD = shard.redistribute(placements=(Replicate(),)).to_local()  # [B, Vc_pad, D]
        img_BVD = img_BVD[:, : lay.video_local]
        if self.cp > 1:
            img_BVD = gather_video_tokens(img_BVD, self.cp_mesh.get_group(), lay.video_len)
        return img_BVD


class SequencePaddedCore(nn.Module):
    """Wraps an attention core so it sees the CP layout `[video chunk (Vc); text (T_pad)]`: drops the SP padding rows
    [Vc, Vc_pad) of q, k, v `[B, N, Vc_pad + T_pad, Dh]` and puts zero rows back in the output. Tells a CP core the
    true video length of the batch."""

    def __init__(self, inner: nn.Module, layout: TokenLayout):
        super().__init__()
        self.inner, self.layout = inner, layout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        lay = self.layout
        if hasattr(self.inner, "video_len"):
            self.inner.video_len = lay.video_len
        vc, pad = lay.video_local, lay.video_padded - lay.video_local
        if pad == 0:
            return self.inner(q, k, v, text_mask)
        q, k, v = (torch.cat([t[:, :, :vc], t[:, :, vc + pad :]], dim=2) for t in (q, k, v))  # [B, N, Vc + T, Dh]
        out = self.inner(q, k, v, text_mask)
        zeros = out.new_zeros(out.shape[0], out.shape[1], pad, out.shape[3])
        return torch.cat([out[:, :, :vc], zeros, out[:, :, vc:]], dim=2)  # [B, N, Vc_pad + T, Dh]
