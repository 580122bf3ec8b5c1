"""A 3D PatchGAN discriminator for videos (and 1-frame images): real/fake logits per space-time patch.

pix2pix's NLayerDiscriminator lifted to 3D, as in VQGAN / MAGVIT-style video tokenizers: a stride-2 conv, then
`layers - 1` stride-2 conv + norm + LeakyReLU blocks (channels doubling, capped at 8x), one stride-1 block and a
1-channel stride-1 conv. Kernels are (3, 4, 4) with temporal padding 1, so a 1-frame image stays 1 frame and
every stride-2 layer maps F frames to ceil(F / 2). GroupNorm instead of BatchNorm: statistics per sample, so the
logits do not depend on the batch split across data-parallel ranks and there are no running buffers to sync.

Shape legend: B batch, C channels, F frames, H, W pixels; f, h, w patch-grid sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from vidtron.errors import ConfigError

KERNEL = (3, 4, 4)
PADDING = (1, 1, 1)


def min_input_size(layers: int) -> int:
    """Smallest H (or W) that leaves at least one patch: each stride-2 layer halves, the last two take 1 off."""
    return 3 * 2**layers


def _groups(channels: int) -> int:
    """The largest divisor of `channels` that is <= 32 (GroupNorm groups)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def _block(in_ch: int, out_ch: int, stride: int, norm: bool) -> list[nn.Module]:
    # no bias before a norm (pix2pix): the norm removes it, and a parameter without gradient only collects noise
    conv = nn.Conv3d(in_ch, out_ch, KERNEL, stride=(stride, stride, stride), padding=PADDING, bias=not norm)
    layers: list[nn.Module] = [conv]
    if norm:
        layers.append(nn.GroupNorm(_groups(out_ch), out_ch))
    return [*layers, nn.LeakyReLU(0.2)]


class PatchDiscriminator3D(nn.Module):
    """video [B, C, F, H, W] in [-1, 1] -> patch logits [B, 1, f, h, w] (> 0 means "looks real")."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        self.num_layers = layers
        mult = [min(2**i, 8) for i in range(layers + 1)]
        blocks = _block(in_channels, channels, 2, norm=False)
        for i in range(1, layers):
            blocks += _block(channels * mult[i - 1], channels * mult[i], 2, norm=True)
        blocks += _block(channels * mult[layers - 1], channels * mult[layers], 1, norm=True)
        blocks.append(nn.Conv3d(channels * mult[layers], 1, KERNEL, stride=1, padding=PADDING))
        self.net = nn.Sequential(*blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """VQGAN's init: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        h, w = video_BCFHW.shape[-2:]
        need = min_input_size(self.num_layers)
        if min(h, w) < need:
            raise ConfigError(
                "video height/width", (h, w), f"a {self.num_layers}-layer discriminator needs >= {need} pixels"
            )
        return self.net(video_BCFHW)  # [B, 1, f, h, w]
