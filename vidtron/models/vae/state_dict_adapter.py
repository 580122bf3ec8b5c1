"""State-dict names: ours <-> diffusers' `AutoencoderKLHunyuanVideo`. Tensors are never changed, only renamed.

Differences, one rename rule each (the first rule whose diffusers or our segment occurs in a key applies):
- our causal convs are `nn.Conv3d` subclasses, diffusers wraps an `nn.Conv3d` in `.conv`;
- each block has at most one resampler: `downsample` / `upsample` instead of `downsamplers.0.conv` /
  `upsamplers.0.conv` (themselves wrapping a causal conv);
- the mid block has one attention: `attn` instead of `attentions.0`, `attn.norm` instead of its
  `group_norm`, `attn.to_out` instead of `to_out.0`;
- `norm_out` instead of `conv_norm_out`.
Everything else (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, resnets' `norm1/2`) is identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# (diffusers segment, our segment); matched between dots, first match wins, so longer segments come first
_RENAMES: tuple[tuple[str, str], ...] = (
    ("downsamplers.0.conv.conv", "downsample"),
    ("upsamplers.0.conv.conv", "upsample"),
    ("attentions.0.group_norm", "attn.norm"),
    ("attentions.0.to_out.0", "attn.to_out"),
    ("attentions.0", "attn"),
    ("conv_norm_out", "norm_out"),
    *((f"{name}.conv", name) for name in ("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut")),
)


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    dotted = f".{key}"
    for src, dst in pairs:
        if f".{src}." in dotted:
            return dotted.replace(f".{src}.", f".{dst}.", 1)[1:]
    return key


def from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLHunyuanVideo` state dict -> ours (load with `load_state_dict(strict=True)`)."""
    return {_rename(k, _RENAMES): v for k, v in sd.items()}


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `CausalVAE` state dict -> diffusers `AutoencoderKLHunyuanVideo` names."""
    inverse = tuple((ours, theirs) for theirs, ours in _RENAMES)
    return {_rename(k, inverse): v for k, v in sd.items()}
