"""Reconstruction quality of a VAE on held-out clips: PSNR and (per-frame) SSIM, tiled and untiled.

PSNR is per clip over all its pixels, 10 log10(range^2 / MSE) with range = 2 for [-1, 1] videos (inf for a
perfect reconstruction), averaged over clips. SSIM is Wang et al.'s (Gaussian window 11, sigma 1.5, K1 = 0.01,
K2 = 0.03, "valid" filtering) on each frame and channel, averaged over pixels, channels and frames, then clips:
frame-wise 2D SSIM is what video VAE papers report (a 3D window would also mix motion into "structure").
Reconstructions decode the posterior mean and are clamped to [-1, 1] first, as a saved video would be.

Shape legend: B clips, C channels, F frames, H, W pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidtron.models.vae import CausalVAE
from vidtron.platform.data.shards import read_clips
from vidtron.recipes.dit_t2v.data import videos_to_tensor
from vidtron.recipes.vae.gan import reconstruct

DATA_RANGE = 2.0  # videos live in [-1, 1]


def psnr(x_BCFHW: torch.Tensor, y_BCFHW: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-clip PSNR in dB: [B] (inf where the clips are identical)."""
    mse = (x_BCFHW.double() - y_BCFHW.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()  # mse == 0 -> inf


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def _filter(x_NCHW: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid region only, per channel."""
    c = x_NCHW.size(1)
    x = F.conv2d(x_NCHW, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along W
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H


def ssim(
    x_BCFHW: torch.Tensor,
    y_BCFHW: torch.Tensor,
    data_range: float = DATA_RANGE,
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-clip SSIM: [B], the mean of per-frame 2D SSIM maps (frames smaller than the window shrink it)."""
    b, c, f, h, w = x_BCFHW.shape
    window = min(window, h, w)
    window -= 1 - window % 2  # keep it odd
    g = _gaussian_window(window, sigma)
    x = x_BCFHW.double().transpose(1, 2).reshape(b * f, c, h, w)  # [B*F, C, H, W]
    y = y_BCFHW.double().transpose(1, 2).reshape(b * f, c, h, w)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).view(b, f).mean(dim=1).float()


@torch.no_grad()
def reconstruct_mean(vae: CausalVAE, video_BCFHW: torch.Tensor, tiling: dict | None = None) -> torch.Tensor:
    """Decode the posterior mean (tiled when `tiling` holds tiled_encode/decode keyword arguments), clamped."""
    recon, _, _ = reconstruct(vae, video_BCFHW, None, tiling)
    return recon.clamp(-1.0, 1.0)


@torch.no_grad()
def evaluate(vae: CausalVAE, videos_BCFHW: torch.Tensor, tiling: dict | None = None, batch_size: int = 4) -> dict:
    """{"psnr", "ssim"} means over the clips (PSNR over finite values; inf when every clip is perfect)."""
    was_training = vae.training
    vae.eval()
    p, s = [], []
    for i in range(0, videos_BCFHW.size(0), batch_size):
        x = videos_BCFHW[i : i + batch_size]
        r = reconstruct_mean(vae, x, tiling)
        p.append(psnr(x, r))
        s.append(ssim(x, r))
    vae.train(was_training)
    p_all = torch.cat(p)
    finite = p_all[torch.isfinite(p_all)]
    return {
        "psnr": float(finite.mean()) if finite.numel() else math.inf,
        "ssim": float(torch.cat(s).mean()),
        "clips": int(videos_BCFHW.size(0)),
    }


def evaluate_tiled_and_untiled(vae: CausalVAE, videos_BCFHW: torch.Tensor, tiling: dict) -> dict:
    """{"untiled": {...}, "tiled": {...}}: the same clips through both paths."""
    return {"untiled": evaluate(vae, videos_BCFHW), "tiled": evaluate(vae, videos_BCFHW, tiling)}


def load_eval_clips(root: str, frames: int = 0, limit: int = 0) -> torch.Tensor:
    """Held-out clips from shards under `root` (e.g. `vidtron-data synth --seed 1`) as [B, C, F, H, W] in
    [-1, 1]; the first `frames` frames when > 0, the first `limit` clips when > 0."""
    clips = read_clips(root)
    clips = clips[:limit] if limit > 0 else clips
    video = videos_to_tensor([c.video for c in clips])
    return video[:, :, :frames] if frames > 0 else video
