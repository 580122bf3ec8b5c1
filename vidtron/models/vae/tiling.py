"""Tiled encode / decode for the causal VAE: bounded memory for long, large videos.

A video is cut into overlapping temporal clips of `tile_frames` = 4k+1 frames; each clip into overlapping
`tile_size` x `tile_size` pixel tiles (decode uses the same spec, divided by the compression ratios). Every tile
goes through the whole VAE; the tiles are stitched back along W, then H, then time.

Layout, per axis (all sizes in pixels / frames; latents are / 8 and / 4):
- spatial: overlap = tile_size * overlap rounded down to a multiple of 8, stride = tile_size - overlap, starts
  0, stride, 2 stride, ... until a tile reaches the end (the last tile may be shorter);
- temporal: clips start every `frame_stride` = (tile_frames - 1) - overlap frames (a multiple of 4). A clip's
  first frame is encoded alone (causal restart), so every clip after the first drops its first latent (encode)
  or its first decoded frame (decode); what remains lines up with the untiled latents / frames.
Stitching (`blend=True`, diffusers' arithmetic): in the e positions where tile k overlaps tile k-1,
out[y] = prev[y] * (1 - y/e) + tile[y] * (y/e), a linear ramp from the previous tile to the new one;
elsewhere each position comes from one tile. `blend=False` cuts each overlap in the middle instead (each side
keeps half of it): a plain crop-and-stitch, to measure seam error against.

Tiled output never equals untiled exactly, whatever the overlap: GroupNorm statistics and the mid-block
attention span the whole input, so each tile sees different statistics. The overlap hides the tile edges
(missing context) and the ramp spreads the per-tile mismatch over e positions instead of one step. The ramp
also gives small weights to values near the tile edges, so where edge error dominates (short latent overlaps
in encode) a middle cut can be as good; see tests/test_vae.py for measured numbers.

Against diffusers' `AutoencoderKLHunyuanVideo.tiled_encode / tiled_decode / _temporal_tiled_*` (equal to 1e-5
on shapes where the two layouts agree): (1) diffusers starts tiles at range(0, length, stride), which can add
a last tile lying inside its neighbour (blended in at the end); we stop once a tile reaches the end.
(2) diffusers blends rows in place after blending columns, so the tile above is ramped twice in overlap
corners; we stitch W then H, a plain separable ramp. (3) diffusers tiles only inputs larger than a tile, and
its `encode` tiles time by default past 16 frames; here the caller chooses (`CausalVAE.encode` never tiles).

Shape legend: B batch, C video channels, F frames, H, W pixels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vidtron.errors import ConfigError
from vidtron.models.vae.model import CausalVAE, split_moments


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes and strides in pixels / frames, validated against the VAE's compression ratios."""

    tile: int  # spatial tile edge, pixels (a multiple of the spatial ratio)
    stride: int  # spatial stride, pixels; tile - stride is the overlap
    frames: int  # temporal clip length, frames (4k+1)
    frame_stride: int  # temporal stride, frames (a multiple of 4); (frames - 1) - frame_stride is the overlap

    @classmethod
    def build(cls, vae: CausalVAE, tile_size: int, tile_frames: int, overlap: float) -> TilePlan:
        s, t = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
        if not 0.0 <= overlap <= 0.5:
            raise ConfigError("overlap", overlap, "must be in [0, 0.5] (a fraction of the tile; 0.25 by default)")
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < s or tile_size % s:
            raise ConfigError("tile_size", tile_size, f"must be a positive multiple of {s} pixels, e.g. 256")
        if (
            isinstance(tile_frames, bool)
            or not isinstance(tile_frames, int)
            or tile_frames < t + 1
            or (tile_frames - 1) % t
        ):
            raise ConfigError("tile_frames", tile_frames, f"must be {t}k+1 with k >= 1, e.g. 17")
        overlap_px = int(tile_size * overlap) // s * s
        overlap_frames = int((tile_frames - 1) * overlap) // t * t
        return cls(tile_size, tile_size - overlap_px, tile_frames, tile_frames - 1 - overlap_frames)


def tiled_encode(
    vae: CausalVAE,
    video: torch.Tensor,
    *,
    tile_size: int = 256,
    tile_frames: int = 17,
    overlap: float = 0.25,
    blend: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode` tile by tile: video [B, C, F, H, W] -> (mean, logvar), each [B, Z, f, h, w].

    tile_size: spatial tile edge in pixels; tile_frames: clip length in frames (4k+1); overlap: fraction of a tile
    shared with its neighbour; blend: ramp-blend the overlaps (False: cut them in the middle). The unclamped
    moments are blended, as in diffusers."""
    vae.check_video(video)
    plan = TilePlan.build(vae, tile_size, tile_frames, overlap)
    s, t = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
    clips, out_starts = [], []
    for k, f0 in enumerate(_starts(video.size(2) - 1, plan.frames - 1, plan.frame_stride)):
        clip = video[:, :, f0 : f0 + plan.frames]  # [B, C, 4k+1, H, W]
        m = _spatial_tiles(vae.encode_moments, clip, plan.tile, plan.stride, 1, s, blend)  # [B, 2Z, f', h, w]
        clips.append(m if k == 0 else m[:, :, 1:])  # drop the latent of the clip's lone first frame
        out_starts.append(0 if k == 0 else f0 // t + 1)
    total = (video.size(2) - 1) // t + 1
    return split_moments(_stitch(clips, out_starts, dim=2, total=total, blend=blend))


def tiled_decode(
    vae: CausalVAE,
    z: torch.Tensor,
    *,
    tile_size: int = 256,
    tile_frames: int = 17,
    overlap: float = 0.25,
    blend: bool = True,
) -> torch.Tensor:
    """`vae.decode` tile by tile: latents [B, Z, f, h, w] -> video [B, C, 4(f-1)+1, 8h, 8w].

    Same tile spec as `tiled_encode`, in pixels / frames of the output: a tile is tile_size / 8 latents wide and
    (tile_frames - 1) / 4 + 1 latent frames long."""
    vae.check_latents(z)
    plan = TilePlan.build(vae, tile_size, tile_frames, overlap)
    s, t = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
    clips, out_starts = [], []
    for k, l0 in enumerate(_starts(z.size(2) - 1, (plan.frames - 1) // t, plan.frame_stride // t)):
        clip = z[:, :, l0 : l0 + (plan.frames - 1) // t + 1]  # [B, Z, f', h, w]
        v = _spatial_tiles(vae.decode, clip, plan.tile // s, plan.stride // s, s, 1, blend)  # [B, C, F', H, W]
        clips.append(v if k == 0 else v[:, :, 1:])  # drop the frame decoded from the clip's first latent alone
        out_starts.append(0 if k == 0 else l0 * t + 1)
    total = (z.size(2) - 1) * t + 1
    return _stitch(clips, out_starts, dim=2, total=total, blend=blend)


def use_tiling(p: float, generator: torch.Generator | None = None) -> bool:
    """True with probability p: the random tiling switch of the VAE's final fine-tune (tiling on / off at random
    so that tiled and untiled paths agree). Seed `generator` identically on all ranks for a shared decision."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError("tiling probability p", p, "must be in [0, 1]")
    device = generator.device if generator is not None else "cpu"
    return bool(torch.rand((), generator=generator, device=device) < p)


def maybe_tiled_encode(
    vae: CausalVAE, video: torch.Tensor, p: float, generator: torch.Generator | None = None, **tiling
) -> tuple[torch.Tensor, torch.Tensor]:
    """`tiled_encode(vae, video, **tiling)` with probability p, else `vae.encode(video)`."""
    return tiled_encode(vae, video, **tiling) if use_tiling(p, generator) else vae.encode(video)


def maybe_tiled_decode(
    vae: CausalVAE, z: torch.Tensor, p: float, generator: torch.Generator | None = None, **tiling
) -> torch.Tensor:
    """`tiled_decode(vae, z, **tiling)` with probability p, else `vae.decode(z)`."""
    return tiled_decode(vae, z, **tiling) if use_tiling(p, generator) else vae.decode(z)


def seam_error(x: torch.Tensor, reference: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> float:
    """Worst seam: the largest mean |step of (x - reference)| between two neighbouring rows or columns (along
    `dims`), mean over all other positions. A hard tile seam shows up as one large step; a ramp spreads it."""
    err = x - reference
    worst = 0.0
    for d in dims:
        d = d % err.ndim
        steps = err.diff(dim=d).abs()
        worst = max(worst, steps.mean(dim=[i for i in range(err.ndim) if i != d]).max().item())
    return worst


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts 0, stride, 2 stride, ... so that the last tile [start, start + tile) reaches `length`."""
    return [i * stride for i in range(1 + math.ceil(max(length - tile, 0) / stride))]


def _spatial_tiles(fn, x: torch.Tensor, tile: int, stride: int, mul: int, div: int, blend: bool) -> torch.Tensor:
    """fn over overlapping (tile x tile) windows of x [..., H, W], stitched along W then H. An input position p
    maps to output position p * mul // div (1/8 for encode, 8 for decode)."""
    H, W = x.shape[-2:]
    hs, ws = _starts(H, tile, stride), _starts(W, tile, stride)
    rows = []
    for y in hs:
        tiles = [fn(x[..., y : y + tile, x0 : x0 + tile]) for x0 in ws]  # each [B, C', F', tile', tile']
        rows.append(_stitch(tiles, [x0 * mul // div for x0 in ws], -1, W * mul // div, blend))  # [..., tile', W']
    return _stitch(rows, [y * mul // div for y in hs], -2, H * mul // div, blend)  # [..., H', W']


def _stitch(tiles: list[torch.Tensor], starts: list[int], dim: int, total: int, blend: bool) -> torch.Tensor:
    """Join tiles placed at `starts` along `dim` into one tensor of length `total`. Consecutive tiles overlap by
    at most a stride, and the last one reaches `total`."""
    ends = [s + tile.size(dim) for s, tile in zip(starts, tiles)]
    overlaps = [0] + [max(0, min(ends[k - 1], ends[k]) - starts[k]) for k in range(1, len(tiles))] + [0]
    pieces = []
    for k, (tile, s) in enumerate(zip(tiles, starts)):
        e, lo = overlaps[k], 0
        if k > 0 and blend and e > 0:
            prev = tiles[k - 1].narrow(dim, s - starts[k - 1], e)
            w = torch.arange(e, device=tile.device, dtype=tile.dtype) / e  # 0, 1/e, ..., (e-1)/e
            w = w.view([e if i == dim % tile.ndim else 1 for i in range(tile.ndim)])
            pieces.append(prev * (1 - w) + tile.narrow(dim, 0, e) * w)
            lo = e
        elif k > 0:
            lo = e // 2  # no blend: take over from the previous tile in the middle of the overlap
        hi = total - s if k == len(tiles) - 1 else starts[k + 1] - s + (0 if blend else overlaps[k + 1] // 2)
        pieces.append(tile.narrow(dim, lo, hi - lo))
    return torch.cat(pieces, dim=dim)
