"""The dit_t2v training set: clips from shards -> latents (through the VAE or its stand-in) + cached text.

Every rank holds the (small) latent set in memory; the global sampler decides which samples a step uses.
Legend: N samples, C latent channels, F latent frames, H, W latent height/width, T text tokens, D text dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vidtron.errors import ConfigError, DataError
from vidtron.models.text.encoders import TextBatch
from vidtron.models.vae.patch_pca import PatchPCAAutoencoder
from vidtron.platform.config import DataConfig
from vidtron.platform.data.shards import read_clips

AE_FILE = "autoencoder.safetensors"


@dataclass
class LatentSet:
    latents: torch.Tensor  # [N, C, F, H, W]
    text: TextBatch  # N rows
    uncond: TextBatch  # 1 row: the empty caption (classifier-free guidance)
    keys: list[str]
    captions: list[str]


def load_autoencoder(root: str | Path) -> PatchPCAAutoencoder:
    path = Path(root) / AE_FILE
    if not path.exists():
        raise DataError(
            f"data.root={str(root)!r} has no {AE_FILE}; run `vidtron-data synth` (or `vidtron-data fit-ae`) on it"
        )
    return PatchPCAAutoencoder.from_state_dict(load_file(str(path)))


def videos_to_tensor(videos: list[np.ndarray]) -> torch.Tensor:
    """uint8 [F, H, W, 3] clips -> float [N, 3, F, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3)
    return x.float() / 127.5 - 1.0


def build_latent_set(data: DataConfig, text_encoder, ae: PatchPCAAutoencoder) -> LatentSet:
    clips = read_clips(data.root)
    want = (data.frames, data.height, data.width, 3)
    for clip in clips:
        if tuple(clip.video.shape) != want:
            raise ConfigError(
                "data.frames/height/width",
                want[:3],
                f"shard sample {clip.key!r} is {tuple(clip.video.shape[:3])}; set data.frames/height/width to match the data",
            )
    with torch.no_grad():
        latents = torch.cat(
            [ae.encode(videos_to_tensor([c.video for c in clips[i : i + 32]])) for i in range(0, len(clips), 32)]
        )
    captions = [c.caption for c in clips]
    return LatentSet(
        latents=latents,
        text=text_encoder.encode(captions),
        uncond=text_encoder.encode([""]),
        keys=[c.key for c in clips],
        captions=captions,
    )
