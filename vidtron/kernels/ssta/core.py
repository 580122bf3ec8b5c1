"""SSTA as a model's attention core when the canvas changes per call: `SSTAOptions` + `CanvasSSTA`.

`SSTAAttention` (torch_impl.py) is built for one fixed canvas and text length. A sampling run knows the canvas
only when the model sees the latents, and the text length the core sees depends on the layout (TP pads the text
to a multiple of tp), so `CanvasSSTA` holds the options, takes the canvas from a setter (`set_canvas`, called by
whoever knows the token grid, e.g. a forward pre-hook on the model) and infers the text length from q:
text_len = L - T*H*W. It builds (and caches) one `SSTAAttention` per (canvas, text_len, device).

Shape legend: B batch, N heads, L tokens (video (T, H, W) row-major, then Tt text), Tt text tokens, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vidtron.errors import ConfigError
from vidtron.kernels.ssta.mask import _check_topk_lam, default_tiles, default_topk
from vidtron.kernels.ssta.tiles import Dims3, _check_dims3
from vidtron.kernels.ssta.torch_impl import BACKENDS, SSTAAttention


@dataclass(frozen=True)
class SSTAOptions:
    """SSTA settings of a run (HunyuanVideo 1.5 defaults)."""

    tile: Dims3 | None = None  # tokens per tile (T, H, W); None: (6, 8, 8), or (1, 16, 24) for a single frame
    window: Dims3 | None = None  # sliding window in tiles; None: (3, 3, 3), or (1, 1, 1) for a single frame
    topk: int = 64  # selective key tiles per query tile (0 = sliding window only)
    halve_topk: bool = True  # use topk // 2 for clips of <= 31 latent frames (`default_topk`)
    lam: float = 0.7  # similarity vs redundancy weight of the selective score
    backend: str = "torch"  # torch (any device, differentiable) | triton (forward only)

    def __post_init__(self) -> None:
        if self.tile is not None:
            object.__setattr__(self, "tile", _check_dims3("ssta.tile", self.tile))
        if self.window is not None:
            object.__setattr__(self, "window", _check_dims3("ssta.window", self.window))
        _check_topk_lam(self.topk, self.lam)
        if self.backend not in BACKENDS:
            raise ConfigError("ssta.backend", self.backend, f"choose one of {list(BACKENDS)}")

    def resolve(self, canvas: Dims3) -> tuple[Dims3, Dims3, int]:
        """(tile, window, topk) for a canvas: the defaults filled in, top-k halved for short clips."""
        tile, window = default_tiles(canvas)
        topk = default_topk(canvas[0], self.topk) if self.halve_topk else self.topk
        return self.tile or tile, self.window or window, topk


class CanvasSSTA(nn.Module):
    """SSTA attention core (`forward(q, k, v, text_mask) -> out`, the attn_core contract) for the canvas last given
    to `set_canvas`. q, k, v `[B, N, T*H*W + Tt, Dh]`, video first; the text length is what follows the video.
    `last_density` holds the fraction of video-video block pairs the last call kept (a 0-dim tensor). No
    parameters or persistent buffers, so state dicts and layouts are unchanged."""

    def __init__(self, opts: SSTAOptions | None = None):
        super().__init__()
        self.opts = opts or SSTAOptions()
        self.canvas: Dims3 | None = None
        self.last_density: torch.Tensor | None = None
        self._cores: dict[tuple, SSTAAttention] = {}  # not submodules: rebuilt on demand, never saved

    def set_canvas(self, canvas: Dims3) -> None:
        """The latent token grid (T, H, W) of the video tokens of the next calls."""
        self.canvas = _check_dims3("ssta.canvas", tuple(int(c) for c in canvas))

    def extra_repr(self) -> str:
        return f"{self.opts}, canvas={self.canvas}"

    def core_for(self, text_len: int, device: torch.device) -> SSTAAttention:
        """The cached fixed-canvas core for the current canvas and this text length."""
        key = (self.canvas, text_len, str(device))
        if key not in self._cores:
            tile, window, topk = self.opts.resolve(self.canvas)
            core = SSTAAttention(self.canvas, text_len, tile, window, topk, self.opts.lam, self.opts.backend)
            self._cores[key] = core.to(device)
        return self._cores[key]

    def forward(
        self,
        q_BNLDh: torch.Tensor,
        k_BNLDh: torch.Tensor,
        v_BNLDh: torch.Tensor,
        text_mask_BTt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.canvas is None:
            raise ConfigError("ssta.canvas", None, "call set_canvas((T, H, W)) with the latent token grid first")
        text_len = q_BNLDh.shape[2] - math.prod(self.canvas)
        if text_len < 0:
            fix = f"q holds {q_BNLDh.shape[2]} tokens, fewer than the canvas's T*H*W = {math.prod(self.canvas)}"
            raise ConfigError("ssta.canvas", self.canvas, fix)
        core = self.core_for(text_len, q_BNLDh.device)
        out = core(q_BNLDh, k_BNLDh, v_BNLDh, text_mask_BTt)  # [B, N, L, Dh]
        self.last_density = core.last_density
        return out
