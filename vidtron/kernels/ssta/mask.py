"""SSTA block masks: static sliding-tile window OR selective top-k, text rows and columns dense.

Shape legend:
    B batch, N heads, L tokens (video (T, H, W) row-major, then Tt text), Dh head dim
    nT, nH, nW tile grid; nv = nT*nH*nW video tiles; nb = nv + nt blocks; bs = prod(tile) tokens per block
    mask [..., nb_q, nb_k]: rows are query blocks, columns key blocks, True = attend

The rules (HunyuanVideo 1.5, arXiv 2511.18870; STA, arXiv 2502.04507):
  * sliding tile: per axis x with n_x tiles and window k_x, the centre of query tile i is
    c_x = clamp(i_x, k_x // 2, n_x - 1 - k_x // 2) and key tile j is kept iff |c_x - j_x| <= k_x // 2 on every
    axis; an axis with n_x <= k_x keeps all its tiles. With odd windows every query tile therefore sees
    exactly prod(window) tiles once the grid is at least the window on each axis (windows slide inward at edges).
  * selective: per sample and head, in fp32, block means of q and k over the valid tokens of each tile,
    L2-normalised; sim_ij = (cos(q_i, k_j) + 1) / 2; redundancy_j = mean_{j' != j} (cos(k_j', k_j) + 1) / 2;
    score_ij = lam * sim_ij - (1 - lam) * redundancy_j; keep the top-k key tiles per query tile
    (k = min(topk, nv)).
  * text rows and text columns are all True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidtron.errors import ConfigError
from vidtron.kernels.ssta.tiles import Dims3, TileLayout, to_tiles

VIDEO_TILE, VIDEO_WINDOW = (6, 8, 8), (3, 3, 3)  # 384-token blocks, 27-tile window
IMAGE_TILE, IMAGE_WINDOW = (1, 16, 24), (1, 1, 1)  # single frame: 384-token blocks, the tile itself only
HALVE_TOPK_MAX_FRAMES = 31  # top-k is halved for clips of at most this many latent frames


def default_tiles(canvas: Dims3) -> tuple[Dims3, Dims3]:
    """(tile, window) for a latent canvas (T, H, W): ((1, 16, 24), (1, 1, 1)) when T == 1 (a single image),
    else ((6, 8, 8), (3, 3, 3))."""
    if canvas[0] < 1:
        raise ConfigError("ssta.canvas", canvas, "needs at least one latent frame")
    return (IMAGE_TILE, IMAGE_WINDOW) if canvas[0] == 1 else (VIDEO_TILE, VIDEO_WINDOW)


def default_topk(latent_frames: int, topk: int = 64) -> int:
    """Selective top-k for a clip: `topk // 2` when latent_frames <= 31 (short clips and images), else `topk`."""
    if latent_frames < 1:
        raise ConfigError("ssta latent_frames", latent_frames, "must be at least 1")
    return topk // 2 if latent_frames <= HALVE_TOPK_MAX_FRAMES else topk


def _axis_window(n: int, k: int, device: torch.device | None) -> torch.Tensor:
    """Bool [n, n]: key tile j on this axis is inside query tile i's clamped window."""
    if n <= k:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    i = torch.arange(n, device=device)
    centre = i.clamp(k // 2, n - 1 - k // 2)  # windows slide inward at the edges
    return (centre[:, None] - i[None, :]).abs() <= k // 2


def sliding_tile_mask(grid: Dims3, window: Dims3, device: torch.device | None = None) -> torch.Tensor:
    """Bool [nv, nv] static sliding-tile mask over a (nT, nH, nW) tile grid, tiles in row-major order."""
    window = tuple(window)
    if len(window) != 3 or any(not isinstance(w, int) or w < 1 for w in window):
        raise ConfigError("ssta.window", window, "must be three positive integers (odd, e.g. (3, 3, 3))")
    aT, aH, aW = (_axis_window(n, k, device) for n, k in zip(grid, window))
    m = aT[:, None, None, :, None, None] & aH[None, :, None, None, :, None] & aW[None, None, :, None, None, :]
    nv = aT.shape[0] * aH.shape[0] * aW.shape[0]
    return m.reshape(nv, nv)  # [(iT, iH, iW), (jT, jH, jW)]


def tile_means(x_BNnvbsDh: torch.Tensor, valid_nvbs: torch.Tensor) -> torch.Tensor:
    """fp32 [B, N, nv, Dh]: mean over the valid tokens of each tile (padding slots excluded)."""
    w_nvbs = valid_nvbs.to(torch.float32)
    sums = torch.einsum("bnvsd,vs->bnvd", x_BNnvbsDh.float(), w_nvbs)  # [B, N, nv, Dh]
    return sums / w_nvbs.sum(-1).clamp_min(1.0)[:, None]  # every tile has >= 1 valid token


def selective_mask(q_mean_BNnvDh: torch.Tensor, k_mean_BNnvDh: torch.Tensor, topk: int, lam: float) -> torch.Tensor:
    """Bool [B, N, nv, nv]: the top-k key tiles per query tile by lam * sim - (1 - lam) * redundancy."""
    qn = F.normalize(q_mean_BNnvDh.float(), dim=-1)  # [B, N, nv, Dh]
    kn = F.normalize(k_mean_BNnvDh.float(), dim=-1)
    nv = kn.shape[-2]
    sim = (qn @ kn.transpose(-1, -2) + 1) / 2  # [B, N, nv_q, nv_k]
    kk = (kn @ kn.transpose(-1, -2) + 1) / 2  # [B, N, nv_k', nv_k]
    off_diag = ~torch.eye(nv, dtype=torch.bool, device=kn.device)
    redundancy = (kk * off_diag).sum(-2) / max(nv - 1, 1)  # [B, N, nv_k]; 0 for a single tile
    score = lam * sim - (1 - lam) * redundancy[..., None, :]  # [B, N, nv_q, nv_k]
    top_idx = score.topk(min(topk, nv), dim=-1).indices  # [B, N, nv_q, k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top_idx, True)


def _check_topk_lam(topk: int, lam: float) -> None:
    if not isinstance(topk, int) or topk < 0:
        raise ConfigError("ssta.topk", topk, "must be a non-negative integer (0 = sliding window only)")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError("ssta.lam", lam, "must be in [0, 1] (0.7 in HunyuanVideo 1.5)")


def block_mask_from_tiles(
    q_BNnbbsDh: torch.Tensor,
    k_BNnbbsDh: torch.Tensor,
    layout: TileLayout,
    sliding_nvnv: torch.Tensor,
    topk: int,
    lam: float,
) -> torch.Tensor:
    """Bool [B, N, nb, nb] SSTA mask from tiled q and k (video blocks first, then text blocks)."""
    nv, nb = layout.n_video_blocks, layout.n_blocks
    valid_nvbs = layout.block_valid[:nv].to(q_BNnbbsDh.device)
    q_mean = tile_means(q_BNnbbsDh[:, :, :nv], valid_nvbs)  # [B, N, nv, Dh]
    k_mean = tile_means(k_BNnbbsDh[:, :, :nv], valid_nvbs)
    video = selective_mask(q_mean, k_mean, topk, lam) | sliding_nvnv.to(q_mean.device)  # [B, N, nv, nv]
    B, N = video.shape[:2]
    mask = torch.ones(B, N, nb, nb, dtype=torch.bool, device=video.device)  # text rows / cols stay True
    mask[:, :, :nv, :nv] = video
    return mask


def ssta_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    canvas: Dims3,
    text_len: int = 0,
    tile: Dims3 = VIDEO_TILE,
    window: Dims3 = VIDEO_WINDOW,
    topk: int = 64,
    lam: float = 0.7,
) -> torch.Tensor:
    """Bool [B, N, nb, nb] SSTA block mask for q, k `[B, N, L, Dh]` (L = T*H*W + text_len, video first).

    Rows are query blocks, columns key blocks: video tiles first (row-major over the tile grid), then
    ceil(text_len / bs) text blocks. Pass the top-k and the tile / window you want; `default_topk` and
    `default_tiles` give the HunyuanVideo 1.5 choices.
    """
    _check_topk_lam(topk, lam)
    if q.shape != k.shape:
        raise ConfigError("ssta q/k shapes", (tuple(q.shape), tuple(k.shape)), "q and k must both be [B, N, L, Dh]")
    layout = TileLayout(canvas, tile, text_len)
    index_P = layout.gather_index.to(q.device)
    q_t, k_t = to_tiles(q, index_P, layout), to_tiles(k, index_P, layout)  # [B, N, nb, bs, Dh]
    sliding = sliding_tile_mask(layout.grid, window, device=q.device)  # [nv, nv]
    return block_mask_from_tiles(q_t, k_t, layout, sliding, topk, lam)


def kept_block_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks of each query block, for block-gather kernels.

    block_mask bool [..., nb_q, nb_k] -> (idx long [..., nb_q, K], count long [..., nb_q]) with K the largest
    row count; idx[..., :count] are the kept key blocks in ascending order, the rest are padding (unkept ones).
    """
    count = block_mask.sum(-1)  # [..., nb_q]
    K = int(count.max()) if count.numel() else 0
    order = torch.sort(block_mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices  # kept first
    return order[..., :K], count
