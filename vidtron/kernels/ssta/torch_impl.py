"""Block-sparse attention in plain torch (block gather + SDPA), and the SSTA attention core module.

Shape legend:
    B batch, N heads, L tokens (video (T, H, W) row-major, then Tt text), Tt text tokens, Dh head dim
    nb_q, nb_k query / key blocks; bs tokens per block; R = B*N*nb_q query rows (one per (b, n, query block))
    K most kept key blocks of any row; c rows processed together (a chunk), K_c the most kept blocks in it

The torch kernel gathers, for each query block, the key / value blocks it keeps (padded to the chunk's largest
count with masked dummies), and runs one SDPA call per chunk of query blocks with the query blocks as the "head"
axis. Work and memory scale with the kept blocks, not with nb_k. It is differentiable and runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtron.errors import ConfigError
from vidtron.kernels.ssta.inputs import expand_inputs
from vidtron.kernels.ssta.mask import (
    VIDEO_TILE,
    VIDEO_WINDOW,
    _check_topk_lam,
    block_mask_from_tiles,
    kept_block_indices,
    sliding_tile_mask,
)
from vidtron.kernels.ssta.tiles import Dims3, TileLayout, from_tiles, key_valid_blocks, to_tiles

BACKENDS = ("torch", "triton")
GATHER_BUDGET = 1 << 24  # elements of gathered K (and again of V) per chunk: 64 MiB each in fp32


def _flat_rows(mask_BNqk: torch.Tensor, nb_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept key blocks per query row r = (b, n, i), as flat indices.

    Returns kv_idx [R, K] into k/v viewed as [B*N*nb_k, bs, Dh], valid_idx [R, K] into key_valid viewed as
    [B*nb_k, bs], and count [R] kept blocks per row (slots past count are padding).
    """
    B, N = mask_BNqk.shape[:2]
    idx_BNqK, count_BNq = kept_block_indices(mask_BNqk)
    dev = mask_BNqk.device
    bn_base = (torch.arange(B * N, device=dev) * nb_k).view(B, N, 1, 1)  # first block of each (b, n)
    b_base = (torch.arange(B, device=dev) * nb_k).view(B, 1, 1, 1)  # first block of each b (heads share validity)
    K = idx_BNqK.shape[-1]
    kv_idx = (idx_BNqK + bn_base).reshape(-1, K)
    valid_idx = (idx_BNqK + b_base).reshape(-1, K)
    return kv_idx, valid_idx, count_BNq.reshape(-1)


def _row_chunks(count_R: torch.Tensor, per_block: int) -> list[tuple[torch.Tensor, int]]:
    """Rows sorted by kept count (most first), cut into chunks of similar count within GATHER_BUDGET.

    Returns (rows, K_c) pairs: the chunk's row ids and its largest kept count; rows with count 0 are left out.
    """
    order = count_R.argsort(descending=True, stable=True)
    counts = count_R[order].tolist()
    chunks, s = [], 0
    while s < len(counts) and counts[s] > 0:
        K_c = counts[s]
        c = max(1, GATHER_BUDGET // (K_c * per_block))
        chunks.append((order[s : s + c], K_c))
        s += c
    return chunks


def block_sparse_attention_torch(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    block_mask: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch block-gather backend of `block_sparse_attention` (same arguments and result).

    Each query row r = (b, n, query block) gathers its kept key / value blocks; rows are bucketed by kept count
    so a chunk pads little, and one SDPA call per chunk runs with the rows on SDPA's head axis.
    """
    B, N, nb_q, bs, Dh = q_blocks.shape
    nb_k = k_blocks.shape[2]
    mask_BNqk, valid_Bkbs = expand_inputs(q_blocks, k_blocks, v_blocks, block_mask, key_valid)
    kv_idx_RK, valid_idx_RK, count_R = _flat_rows(mask_BNqk, nb_k)
    q_R = q_blocks.reshape(-1, bs, Dh)  # [R, bs, Dh], R = B*N*nb_q
    k_flat, v_flat = k_blocks.reshape(-1, bs, Dh), v_blocks.reshape(-1, bs, Dh)  # [B*N*nb_k, bs, Dh]
    valid_flat = valid_Bkbs.reshape(-1, bs)  # [B*nb_k, bs]
    chunks = _row_chunks(count_R, bs * Dh)
    outs = []
    for rows, K_c in chunks:
        c = rows.shape[0]
        kv_idx, valid_idx = kv_idx_RK[rows, :K_c], valid_idx_RK[rows, :K_c]  # [c, K_c]
        slot_kept = torch.arange(K_c, device=rows.device) < count_R[rows, None]  # [c, K_c]; rest are dummies
        keep = (valid_flat[valid_idx] & slot_kept[..., None]).view(c, K_c * bs)  # [c, K_c*bs]
        has_key = keep.any(-1, keepdim=True)  # [c, 1]
        keep = keep | ~has_key  # a row with no valid key attends to its dummies (zeroed below), never NaN
        o = F.scaled_dot_product_attention(
            q_R[rows][None],  # [1, c, bs, Dh]: the rows ride on SDPA's head axis
            k_flat[kv_idx].view(1, c, K_c * bs, Dh),
            v_flat[kv_idx].view(1, c, K_c * bs, Dh),
            attn_mask=keep.view(1, c, 1, K_c * bs),
            scale=scale,
        )[0]  # [c, bs, Dh]
        outs.append(o * has_key[..., None].to(o.dtype))
    out_R = torch.zeros_like(q_R)  # rows that keep nothing stay 0
    if chunks:
        out_R = out_R.index_copy(0, torch.cat([rows for rows, _ in chunks]), torch.cat(outs))
    return out_R.view(B, N, nb_q, bs, Dh)


def block_sparse_attention(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    block_mask: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Softmax attention restricted to a block mask.

    Args:
        q_blocks: [B, N, nb_q, bs, Dh] queries, grouped in blocks of bs tokens.
        k_blocks, v_blocks: [B, N, nb_k, bs, Dh] keys / values in blocks of the same size.
        block_mask: bool broadcastable to [B, N, nb_q, nb_k]; True = query block i attends key block j.
        key_valid: bool broadcastable to [B, nb_k, bs]; False hides a key token (padding) from every query.
            None = all valid.
        scale: softmax scale; None = 1 / sqrt(Dh).
        backend: "torch" (block gather + SDPA, any device, differentiable) or "triton" (forward only; CUDA, or
            CPU tensors when TRITON_INTERPRET=1 was set before importing this package).
    Returns:
        [B, N, nb_q, bs, Dh] in q's dtype; a query row with no valid kept key gets zeros.
    """
    if backend == "torch":
        return block_sparse_attention_torch(q_blocks, k_blocks, v_blocks, block_mask, key_valid, scale)
    if backend == "triton":
        from vidtron.kernels.ssta.triton_impl import block_sparse_attention_triton

        return block_sparse_attention_triton(q_blocks, k_blocks, v_blocks, block_mask, key_valid, scale)
    raise ConfigError("ssta.backend", backend, f"choose one of {list(BACKENDS)}")


class SSTAAttention(nn.Module):
    """SSTA attention core for one fixed canvas: `forward(q, k, v, text_mask) -> out` (the DiT's attn_core seam).

    q, k, v are `[B, N, L, Dh]` after qk-norm and RoPE, ordered [video (T*H*W, row-major); text (Tt)];
    text_mask is bool `[B, Tt]` (True = valid) or None. Tokens are reordered into tiles, the SSTA block mask
    is built from q and k (`mask.py`), attention runs block-sparse with padding slots and padded text keys
    hidden, and the output comes back in the original order `[B, N, L, Dh]`. With every block kept this is
    dense attention with the text key-padding mask. No parameters.
    """

    def __init__(
        self,
        canvas: Dims3,
        text_len: int = 0,
        tile: Dims3 = VIDEO_TILE,
        window: Dims3 = VIDEO_WINDOW,
        topk: int = 64,
        lam: float = 0.7,
        backend: str = "torch",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError("ssta.backend", backend, f"choose one of {list(BACKENDS)}")
        _check_topk_lam(topk, lam)
        self.layout = TileLayout(canvas, tile, text_len)
        self.window, self.topk, self.lam, self.backend = tuple(window), topk, lam, backend
        self.register_buffer("gather_index", self.layout.gather_index, persistent=False)  # [P]
        self.register_buffer("scatter_index", self.layout.scatter_index, persistent=False)  # [L]
        self.register_buffer("block_valid", self.layout.block_valid, persistent=False)  # [nb, bs]
        self.register_buffer("sliding", sliding_tile_mask(self.layout.grid, self.window), persistent=False)
        self.last_density: torch.Tensor | None = None  # kept fraction of video-video block pairs, last call

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"canvas={lay.canvas}, text_len={lay.text_len}, tile={lay.tile}, window={self.window}, "
            f"topk={self.topk}, lam={self.lam}, backend={self.backend!r}"
        )

    def forward(
        self,
        q_BNLDh: torch.Tensor,
        k_BNLDh: torch.Tensor,
        v_BNLDh: torch.Tensor,
        text_mask_BTt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lay = self.layout
        q_t = to_tiles(q_BNLDh, self.gather_index, lay)  # [B, N, nb, bs, Dh]
        k_t = to_tiles(k_BNLDh, self.gather_index, lay)
        v_t = to_tiles(v_BNLDh, self.gather_index, lay)
        mask_BNnbnb = block_mask_from_tiles(q_t, k_t, lay, self.sliding, self.topk, self.lam)  # [B, N, nb, nb]
        nv = lay.n_video_blocks
        self.last_density = mask_BNnbnb[:, :, :nv, :nv].float().mean().detach()  # a statistic, no grad
        valid_Bnbbs = key_valid_blocks(self.block_valid, text_mask_BTt, lay)  # [B|1, nb, bs]
        out_t = block_sparse_attention(q_t, k_t, v_t, mask_BNnbnb, valid_Bnbbs, backend=self.backend)
        return from_tiles(out_t, self.scatter_index)  # [B, N, L, Dh]
