"""Flow matching for the DiT, in the convention of the released HunyuanVideo weights.

The one place where the paper's time and the network's inputs meet:

    paper:     x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I) noise, x1 = data latent, t in [0, 1] (t = 1 is data)
    network:   sigma = 1 - t              (noise level, as diffusers' FlowMatchEulerDiscreteScheduler)
               timestep = 1000 * sigma    (what the DiT's `timestep` input receives)
               v = dx/dsigma = x0 - x1    (what the DiT predicts; the paper's u_t = x1 - x0 is -v)
    sampling:  sigma_i = shift(linspace(1, 0, n + 1)[:-1]) then 0;  x <- x + (sigma_{i+1} - sigma_i) * v
               shift(s) = k s / (1 + (k - 1) s), k = 7 for >= 20 steps and 17 below (HunyuanVideo)

A real HunyuanVideo checkpoint therefore fine-tunes and samples here unchanged.

Legend: B batch, C latent channels, F latent frames, H, W latent height/width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000.0


def sample_generator(seed: int, step: int, sample_index: int) -> torch.Generator:
    """A generator for one training sample: the same sample at the same step draws the same noise on any layout."""
    digest = hashlib.blake2b(f"{seed}/{step}/{sample_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def logit_normal_t(gen: torch.Generator, mean: float, std: float) -> torch.Tensor:
    """One paper-time t in (0, 1): sigmoid of N(mean, std)."""
    return torch.sigmoid(torch.randn((), generator=gen) * std + mean)


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    return 1.0 - t


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def noisy_latents(x1: torch.Tensor, x0: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """x = sigma x0 + (1 - sigma) x1 (= the paper's (1 - t) x0 + t x1)."""
    s = sigma_B.view(-1, *([1] * (x1.ndim - 1)))
    return s * x0 + (1.0 - s) * x1


def velocity_target(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = x0 - x1: the released weights' sign (the paper's u_t negated)."""
    return x0 - x1


def replace_first_frame(x_BCFHW: torch.Tensor, clean_BCFHW: torch.Tensor) -> torch.Tensor:
    """Latent frame 0 from `clean` (image-to-video: the reference image's latent, at noise level 0), the other frames
    from `x`."""
    return torch.cat([clean_BCFHW[:, :, :1].to(x_BCFHW.dtype), x_BCFHW[:, :, 1:]], dim=2)


def default_shift(steps: int) -> float:
    return 17.0 if steps < 20 else 7.0


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] noise levels from 1 down to 0, time-shifted as HunyuanVideo's pipeline does."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,C,F,H,W], timestep [B]) -> v


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int, shift: float | None = None) -> torch.Tensor:
    """Integrate from pure noise (sigma = 1) to data (sigma = 0) with Euler steps."""
    sigmas = sampling_sigmas(steps, default_shift(steps) if shift is None else shift)
    x = noise
    for i in range(steps):
        timestep = timestep_from_sigma(sigmas[i]).expand(x.shape[0]).to(x.device, x.dtype)
        x = euler_step(x, velocity(x, timestep), float(sigmas[i]), float(sigmas[i + 1]))
    return x
