"""Tile layout for SSTA: reorder the (T, H, W) video canvas into tiles, pad the text to whole blocks, and back.

Shape legend:
    B batch, N heads, Dh head dim
    T, H, W        latent canvas after patchify (video tokens are first, in (t, h, w) row-major order)
    Tt             text tokens (after the video tokens)
    L = T*H*W + Tt tokens in the original order
    nT, nH, nW     tile grid = ceil(T / tile_t), ceil(H / tile_h), ceil(W / tile_w)
    nv = nT*nH*nW  video blocks (one per tile, in (t, h, w) row-major order of the tile grid)
    nt             text blocks = ceil(Tt / bs), placed after the video blocks
    nb = nv + nt   blocks;  bs = prod(tile) tokens per block;  P = nb * bs tokens in tiled order

Inside a video block the tokens keep (t, h, w) row-major order within the tile. Slots that fall outside the
canvas (T, H, W not tile multiples) and the slots after the last text token are padding: they hold zeros
when gathered and `block_valid` marks them False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from vidtron.errors import ConfigError

Dims3 = tuple[int, int, int]


def _check_dims3(name: str, value: object) -> Dims3:
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) and v >= 1 for v in value)
    if not ok:
        raise ConfigError(name, value, "must be three positive integers (T, H, W)")
    return tuple(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class TileLayout:
    """How the L tokens of one attention call map onto nb blocks of bs tokens."""

    canvas: Dims3  # (T, H, W) latent tokens after patchify
    tile: Dims3  # tokens per tile on each axis, e.g. (6, 8, 8) -> 384-token blocks
    text_len: int = 0  # Tt text tokens after the video tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "canvas", _check_dims3("ssta.canvas", self.canvas))
        object.__setattr__(self, "tile", _check_dims3("ssta.tile", self.tile))
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ConfigError("ssta.text_len", self.text_len, "must be a non-negative integer")

    @property
    def grid(self) -> Dims3:
        """(nT, nH, nW) tiles per axis."""
        return tuple(math.ceil(c / t) for c, t in zip(self.canvas, self.tile))  # type: ignore[return-value]

    @property
    def block_size(self) -> int:
        return math.prod(self.tile)  # bs

    @property
    def n_video_tokens(self) -> int:
        return math.prod(self.canvas)  # T*H*W

    @property
    def n_video_blocks(self) -> int:
        return math.prod(self.grid)  # nv

    @property
    def n_text_blocks(self) -> int:
        return math.ceil(self.text_len / self.block_size)  # nt

    @property
    def n_blocks(self) -> int:
        return self.n_video_blocks + self.n_text_blocks  # nb

    @property
    def seq_len(self) -> int:
        return self.n_video_tokens + self.text_len  # L

    @property
    def tiled_len(self) -> int:
        return self.n_blocks * self.block_size  # P

    @cached_property
    def gather_index(self) -> torch.Tensor:
        """LongTensor [P]: original token index of each tiled slot; padding slots hold L (an appended zero)."""
        T, H, W = self.canvas
        (nT, nH, nW), (tT, tH, tW), L = self.grid, self.tile, self.seq_len
        video_THW = torch.arange(T * H * W).view(T, H, W)
        pad = (0, nW * tW - W, 0, nH * tH - H, 0, nT * tT - T)  # F.pad order: last axis first
        video_THW = F.pad(video_THW, pad, value=L)  # [nT*tT, nH*tH, nW*tW]
        video = video_THW.view(nT, tT, nH, tH, nW, tW).permute(0, 2, 4, 1, 3, 5).reshape(-1)  # [nv*bs]
        text = torch.full((self.n_text_blocks * self.block_size,), L, dtype=torch.long)  # [nt*bs]
        text[: self.text_len] = torch.arange(self.n_video_tokens, L)
        return torch.cat([video, text])  # [P]

    @cached_property
    def scatter_index(self) -> torch.Tensor:
        """LongTensor [L]: tiled slot of each original token (the inverse of `gather_index` on real tokens)."""
        slots_P = torch.arange(self.tiled_len)
        real_P = self.gather_index < self.seq_len
        inverse_L = torch.empty(self.seq_len, dtype=torch.long)
        inverse_L[self.gather_index[real_P]] = slots_P[real_P]
        return inverse_L

    @cached_property
    def block_valid(self) -> torch.Tensor:
        """Bool [nb, bs]: True for slots holding a real token (video or text, ignoring any text padding mask)."""
        return (self.gather_index < self.seq_len).view(self.n_blocks, self.block_size)


def to_tiles(x_BNLDh: torch.Tensor, gather_index_P: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Original order [B, N, L, Dh] -> tiled blocks [B, N, nb, bs, Dh], zeros in padding slots."""
    B, N, L, Dh = x_BNLDh.shape
    if L != layout.seq_len:
        raise ConfigError("ssta tokens L", L, f"expected T*H*W + text_len = {layout.seq_len} for {layout}")
    x_BNL1Dh = F.pad(x_BNLDh, (0, 0, 0, 1))  # [B, N, L+1, Dh]; token L is the zero pad source
    x_BNPDh = x_BNL1Dh.index_select(2, gather_index_P)  # [B, N, P, Dh]
    return x_BNPDh.view(B, N, layout.n_blocks, layout.block_size, Dh)


def from_tiles(x_BNnbbsDh: torch.Tensor, scatter_index_L: torch.Tensor) -> torch.Tensor:
    """Tiled blocks [B, N, nb, bs, Dh] -> original order [B, N, L, Dh] (padding slots dropped)."""
    x_BNPDh = x_BNnbbsDh.flatten(2, 3)  # [B, N, P, Dh]
    return x_BNPDh.index_select(2, scatter_index_L)  # [B, N, L, Dh]


def key_valid_blocks(
    block_valid_nbbs: torch.Tensor, text_mask_BTt: torch.Tensor | None, layout: TileLayout
) -> torch.Tensor:
    """Bool [B, nb, bs] (or [1, nb, bs] without a text mask): True where a key is a real, unmasked token."""
    if text_mask_BTt is None:
        return block_valid_nbbs[None]  # [1, nb, bs]
    B, Tt = text_mask_BTt.shape
    if Tt != layout.text_len:
        raise ConfigError("ssta text_mask length", Tt, f"expected text_len={layout.text_len}")
    valid_BP = block_valid_nbbs.flatten().expand(B, -1).clone()  # [B, P]
    start = layout.n_video_blocks * layout.block_size  # text slots follow the video blocks
    valid_BP[:, start : start + Tt] &= text_mask_BTt.to(device=valid_BP.device, dtype=torch.bool)
    return valid_BP.view(B, layout.n_blocks, layout.block_size)
