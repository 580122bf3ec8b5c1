"""USP (unified sequence parallel): Ulysses inside, ring across; ulysses * ring = cp.

Rank ordering assumed: CP rank c = ring_rank * u + ulysses_rank, i.e. the Ulysses groups are runs of u consecutive
CP ranks (intra-node for the bandwidth-hungry all-to-all) and a ring group takes every u-th CP rank. CP rank c holds
video chunk c, so after the Ulysses all-to-all a rank holds ring chunk `ring_rank` = video tokens
[ring_rank * u * Lv_local, (ring_rank + 1) * u * Lv_local) for heads slice `ulysses_rank`, and the ring members
(same ulysses_rank, same heads) hold consecutive ring chunks. This is exactly the mesh
`dims.mesh._unflatten("cp", (ring, ulysses), ("ring", "ulysses"))`, which `usp_groups` builds.

Text: each rank slices its heads of the replicated text; the ring attends it once per ring rank (text rows computed
in full on each ring rank, as in RingAttention); the text output is all-gathered over the Ulysses group (backward:
reduce-scatter SUM).

Shape legend: B batch, N heads, u Ulysses degree, R ring degree, Lv video tokens (Lv_local per CP rank), T text
tokens, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vidtron.parallel.context.comm import RingComm
from vidtron.parallel.context.ring import ring_attention, split_lengths
from vidtron.parallel.context.ulysses import check_ulysses_heads, heads_to_tokens, text_to_heads, video_to_heads


class USPAttention(nn.Module):
    """Ulysses-inside, ring-across context-parallel attention core with the attn_core contract (see module doc).

    ulysses_group / ring_group: see `usp_groups`; video_len: true total video tokens, settable per batch as an
    attribute (None = unpadded); heads: if given, checked against the Ulysses degree at construction;
    scale / impl: for the ring's block kernel.
    """

    def __init__(
        self,
        ulysses_group,
        ring_group,
        video_len: int | None = None,
        heads: int | None = None,
        scale: float | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.video_len, self.scale, self.impl = video_len, scale, impl
        self._comm: RingComm | None = None
        if heads is not None:
            check_ulysses_heads(heads, dist.get_world_size(ulysses_group))

    @property
    def comm(self) -> RingComm:
        if self._comm is None:
            self._comm = RingComm(self.ring_group)
        return self._comm

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        u = dist.get_world_size(self.ulysses_group)
        check_ulysses_heads(q.shape[1], u)
        lv, _ = split_lengths(q.shape[2], u * self.comm.size, self.video_len, text_mask)
        vid = video_to_heads(q, k, v, lv, self.ulysses_group)  # 3 x [B, N/u, u*Lv_local, Dh]: ring chunk
        txt = text_to_heads(q, k, v, lv, self.ulysses_group)  # 3 x [B, N/u, T, Dh]
        q_h, k_h, v_h = (torch.cat([a, b], dim=2) for a, b in zip(vid, txt))  # [B, N/u, u*Lv_local + T, Dh]
        out_h = ring_attention(
            q_h, k_h, v_h, text_mask, self.comm, u * lv, self.video_len, self.scale, self.impl
        )  # [B, N/u, u*Lv_local + T, Dh]
        return heads_to_tokens(out_h, u * lv, u * lv, self.ulysses_group)  # [B, N, Lv_local + T, Dh]


def usp_groups(dims) -> tuple[object, object]:
    """(ulysses_group, ring_group) for this rank from a ParallelDims with a built mesh (`dims.build_mesh()`),
    splitting its cp dim into (ring, ulysses) with ulysses innermost, as the module doc assumes."""
    opts = dims.group_options  # the mesh's collective timeout, if it was built with one
    override = {n: opts for n in ("ring", "ulysses")} if opts else None
    mesh = dims.mesh._unflatten("cp", (dims.ring, dims.ulysses), ("ring", "ulysses"), backend_override=override)
    return mesh["ulysses"].get_group(), mesh["ring"].get_group()
