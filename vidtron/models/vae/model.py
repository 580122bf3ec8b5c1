"""HunyuanVideo's causal 3D VAE ("884-16c"): 4x temporal, 8x8 spatial compression, 16 latent channels.

Key-for-key the structure of diffusers' `AutoencoderKLHunyuanVideo` (names mapped in `state_dict_adapter`).
`encode` / `decode` never tile; see `tiling.py` for tiled encode / decode of large videos.

Shape legend: B batch, C video channels, F frames (4k+1; images are F=1), H, W pixels;
Z latent channels, f = (F-1)/4 + 1 latent frames, h, w = H/8, W/8 latent height / width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidtron.errors import ConfigError
from vidtron.models.vae.blocks import NORM_EPS, CausalConv3d, DownBlock, MidBlock, UpBlock, run_block
from vidtron.models.vae.configs import VAEConfig

LOGVAR_RANGE = (-30.0, 20.0)  # logvar clamp, as diffusers' DiagonalGaussianDistribution


class Encoder(nn.Module):
    """video [B, C, F, H, W] -> moments [B, 2Z, f, h, w] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.recompute = cfg.gradient_checkpointing
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, cfg.resample_factors(i))
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(video_BCFHW)  # [B, ch0, F, H, W]
        for block in self.down_blocks:
            x = run_block(block, x, self.recompute)  # ... -> [B, ch-1, f, h, w]
        x = run_block(self.mid_block, x, self.recompute)
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, 2Z, f, h, w]


class Decoder(nn.Module):
    """latents [B, Z, f, h, w] (after post_quant_conv) -> video [B, C, F, H, W]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.recompute = cfg.gradient_checkpointing
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, cfg.resample_factors(i))
            for i in range(len(ch))
        )
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z_BZfhw: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z_BZfhw)  # [B, ch-1, f, h, w]
        x = run_block(self.mid_block, x, self.recompute)
        for block in self.up_blocks:
            x = run_block(block, x, self.recompute)  # ... -> [B, ch0, F, H, W]
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, C, F, H, W]


class CausalVAE(nn.Module):
    """KL autoencoder for videos: `encode` -> (mean, logvar), `decode` -> video, `forward` for training."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(z, z, kernel_size=1)

    # ---- encode / decode ----------------------------------------------------------------------------------------

    def encode_moments(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        """video [B, C, F, H, W] in [-1, 1] -> unclamped [mean; logvar] stacked on channels [B, 2Z, f, h, w]
        (diffusers' `h`; tiled encoding blends these)."""
        self.check_video(video_BCFHW)
        return self.quant_conv(self.encoder(video_BCFHW))

    def encode(self, video_BCFHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, C, F, H, W] in [-1, 1], F = 4k+1 -> (mean, logvar), each [B, Z, k+1, H/8, W/8]."""
        return split_moments(self.encode_moments(video_BCFHW))

    def decode(self, z_BZfhw: torch.Tensor) -> torch.Tensor:
        """latents [B, Z, f, h, w] (VAE space, not scaled) -> video [B, C, 4(f-1)+1, 8h, 8w]."""
        self.check_latents(z_BZfhw)
        return self.decoder(self.post_quant_conv(z_BZfhw))

    def forward(
        self, video_BCFHW: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction [B, C, F, H, W], mean, logvar). Decodes a posterior sample, or the mean
        when `sample_posterior` is False."""
        mean, logvar = self.encode(video_BCFHW)
        z = sample_posterior_latents(mean, logvar, generator) if sample_posterior else mean
        return self.decode(z), mean, logvar

    # ---- DiT latent space -------------------------------------------------------------------------------------

    def to_dit_latents(self, z_BZfhw: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's latent space (x scaling_factor, ~unit variance)."""
        return z_BZfhw * self.config.scaling_factor

    def from_dit_latents(self, z_BZfhw: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> VAE latents ready for `decode`."""
        return z_BZfhw / self.config.scaling_factor

    # ---- shapes -------------------------------------------------------------------------------------------------

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, C, F, H, W] -> [B, Z, f, h, w]."""
        b, _, frames, height, width = video_shape
        t, s = self.config.temporal_compression_ratio, self.config.spatial_compression_ratio
        return (b, self.config.latent_channels, (frames - 1) // t + 1, height // s, width // s)

    def check_video(self, video: torch.Tensor) -> None:
        """Raise ConfigError unless video is [B, in_channels, 4k+1, H, W] with H, W multiples of 8."""
        cfg, s = self.config, self.config.spatial_compression_ratio
        if video.ndim != 5:
            raise ConfigError("video.shape", tuple(video.shape), "pass [B, C, F, H, W]; an image is a 1-frame video")
        _, c, frames, height, width = video.shape
        if c != cfg.in_channels:
            raise ConfigError("video channels (dim 1)", c, f"expected in_channels={cfg.in_channels}: [B, C, F, H, W]")
        if (frames - 1) % cfg.temporal_compression_ratio:
            k = (frames - 1) // cfg.temporal_compression_ratio
            raise ConfigError("video frames (dim 2)", frames, f"use 4k+1 frames (1, 5, 9, ...): trim to {4 * k + 1}")
        for name, size in (("height (dim 3)", height), ("width (dim 4)", width)):
            if size % s or size == 0:
                raise ConfigError(
                    f"video {name}", size, f"must be a multiple of {s}: crop or pad to {max(size // s, 1) * s}"
                )

    def check_latents(self, z: torch.Tensor) -> None:
        """Raise ConfigError unless z is [B, latent_channels, f, h, w]."""
        if z.ndim != 5:
            raise ConfigError("latents.shape", tuple(z.shape), "pass [B, Z, f, h, w]")
        if z.shape[1] != self.config.latent_channels:
            raise ConfigError(
                "latent channels (dim 1)", z.shape[1], f"expected latent_channels={self.config.latent_channels}"
            )


def split_moments(moments_B2Zfhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 2Z, f, h, w] -> (mean, logvar clamped to LOGVAR_RANGE), each [B, Z, f, h, w]."""
    mean, logvar = moments_B2Zfhw.chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


def sample_posterior_latents(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn on the generator's device (diffusers' convention)."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over all latent dims: [B]."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1)
