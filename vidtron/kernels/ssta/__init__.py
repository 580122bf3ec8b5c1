"""SSTA: selective + sliding tile attention (HunyuanVideo 1.5), block masks and block-sparse attention.

    mask = ssta_block_mask(q, k, canvas=(T, H, W), text_len=Tt)        # bool [B, N, nb, nb]
    core = SSTAAttention(canvas, text_len, tile, window, topk, lam)     # attn_core: (q, k, v, text_mask) -> out
    core = CanvasSSTA(SSTAOptions(topk=64)); core.set_canvas((T, H, W))  # the same, canvas set per call
    out = block_sparse_attention(q_blocks, k_blocks, v_blocks, mask, key_valid)  # kernel-level API

`default_tiles(canvas)` and `default_topk(latent_frames)` give the paper's tile / window and top-k choices.
Set TRITON_INTERPRET=1 before importing this package to run the "triton" backend on CPU tensors.
"""

from vidtron.kernels.ssta.core import CanvasSSTA, SSTAOptions
from vidtron.kernels.ssta.mask import (
    default_tiles,
    default_topk,
    kept_block_indices,
    sliding_tile_mask,
    ssta_block_mask,
)
from vidtron.kernels.ssta.tiles import TileLayout, from_tiles, to_tiles
from vidtron.kernels.ssta.torch_impl import SSTAAttention, block_sparse_attention

__all__ = [
    "CanvasSSTA",
    "SSTAAttention",
    "SSTAOptions",
    "TileLayout",
    "block_sparse_attention",
    "default_tiles",
    "default_topk",
    "from_tiles",
    "kept_block_indices",
    "sliding_tile_mask",
    "ssta_block_mask",
    "to_tiles",
]
