"""LPIPS (Zhang et al. 2018, "vgg" variant v0.1) in plain torch, with weights from a local file only.

The VGG16 feature stack keeps torchvision's layer indices (`features.0` ... `features.29`), so real weights load
by name; the five linear heads are named as in the `lpips` package (`lin0.model.1.weight` ... `lin4`). A weights
file may use any of three vocabularies, mapped by `canonical_names`:
    ours / torchvision vgg16:   features.N.weight|bias        (torchvision's classifier.* is ignored)
    lpips package LPIPS():      net.sliceK.N.weight|bias      (scaling_layer.* is ignored: fixed constants)
    heads (all):                linK.model.1.weight           [1, C_K, 1, 1]
LPIPS is never downloaded: without a path the loss term is off and the run warns once.

Shape legend: N images (frames), C channels, H, W pixels.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vidtron.errors import ConfigError

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # up to relu5_3
TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised
SCALE = (0.458, 0.448, 0.450)
_IGNORED = re.compile(r"^(classifier\.|scaling_layer\.)")
_LPIPS_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.")


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]`: conv/ReLU/max-pool with the same indices (names load as-is)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """The lpips package's NetLinLayer: dropout then a 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]: [N, 3, H, W] x 2 -> [N]. Frozen, eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        for k, ch in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: the heads' dropout never fires

    def taps(self, x_N3HW: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs LPIPS compares, each [N, C_k, H_k, W_k]."""
        x = (x_N3HW - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, x_N3HW: torch.Tensor, y_N3HW: torch.Tensor) -> torch.Tensor:
        total = x_N3HW.new_zeros(x_N3HW.size(0))
        for k, (fx, fy) in enumerate(zip(self.taps(x_N3HW), self.taps(y_N3HW))):
            diff = (_unit_channels(fx) - _unit_channels(fy)).pow(2)  # [N, C_k, H_k, W_k]
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(1, 2, 3))  # spatial mean -> [N]
        return total


def _unit_channels(f_NCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise each position's feature vector to unit length (LPIPS' normalize_tensor)."""
    return f_NCHW / (f_NCHW.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def canonical_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision / lpips-package / own state dict to our names; drop the keys LPIPS does not use."""
    out = {}
    for name, value in state.items():
        if _IGNORED.match(name):
            continue
        out[_LPIPS_SLICE.sub(r"features.\1.", name)] = value
    return out


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS with every weight loaded by name from the local safetensors file at `path` (strict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("vae.lpips_path", str(path), "no such file; give a local safetensors file or leave it empty")
    net = LPIPS()
    state, expected = canonical_names(load_file(str(path))), net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise ConfigError(
            "vae.lpips_path",
            str(path),
            f"not LPIPS-VGG16 weights (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape "
            f"{misshaped[:3]}); expected features.N.* (or net.sliceK.N.*) and linK.model.1.weight",
        )
    net.load_state_dict(state)
    return net


def build_lpips(path: str) -> LPIPS | None:
    """`load_lpips(path)`, or None with one warning when no path is configured (the LPIPS term is then off)."""
    if not path:
        warnings.warn(
            "vae.lpips_path is empty: the LPIPS loss term is off (give a local LPIPS-VGG16 safetensors file to turn "
            "it on; nothing is downloaded)",
            stacklevel=2,
        )
        return None
    return load_lpips(path)
