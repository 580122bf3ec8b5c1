"""dit_t2v batches from the bucketed stream (data.format=video|latent): latents + text for one DP rank.

format=video decodes each step's clips and encodes them with the stand-in autoencoder of data.root (or the
CausalVAE of data.vae) and the text encoder; format=latent reads what `vidtron-data encode` cached.
Legend: b rows on this rank, C latent channels, f latent frames, h, w latent height/width, T text tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vidtron.errors import ConfigError, DataError
from vidtron.models.text.encoders import TextBatch
from vidtron.models.vae import CausalVAE
from vidtron.models.vae.configs import from_diffusers_config
from vidtron.models.vae.state_dict_adapter import from_diffusers
from vidtron.platform.config import TrainConfig
from vidtron.platform.data.latents import load_latent_sample, load_uncond, to_model_input
from vidtron.platform.data.loader import BucketLoader, LocalBatch
from vidtron.recipes.dit_t2v.data import load_autoencoder


def load_causal_vae(path: str | Path) -> CausalVAE:
    """A CausalVAE from a diffusers-layout folder: config.json + *.safetensors (one file or the shards of a sharded
    export; diffusers or our names)."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not (path / "config.json").exists() or not weights:
        raise ConfigError("data.vae", str(path), "give a folder with config.json and a *.safetensors file")
    vae = CausalVAE(from_diffusers_config(json.loads((path / "config.json").read_text())))
    sd = {k: v for f in weights for k, v in load_file(str(f)).items()}
    vae.load_state_dict(from_diffusers(sd) if any(".conv.weight" in k for k in sd) else sd)
    return vae.eval()


class LatentEncoder:
    """Pixels [B, 3, F, H, W] in [-1, 1] -> DiT latents [B, C, f, h, w]: the stand-in PCA autoencoder's code,
    or a CausalVAE's posterior mean times its scaling factor."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def channels(self) -> int:
        """Latent channels C of the code (the DiT's in_channels must match)."""
        return self.model.config.latent_channels if isinstance(self.model, CausalVAE) else self.model.channels

    @torch.no_grad()
    def __call__(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, CausalVAE):
            mean, _ = self.model.encode(video_BCFHW)
            return self.model.to_dit_latents(mean)
        return self.model.encode(video_BCFHW)

    @torch.no_grad()
    def decode(self, z_BCfhw: torch.Tensor) -> torch.Tensor:
        """DiT latents -> pixels [B, 3, F, H, W] (the inverse of `__call__` up to the VAE's reconstruction)."""
        if isinstance(self.model, CausalVAE):
            return self.model.decode(self.model.from_dit_latents(z_BCfhw))
        return self.model.decode(z_BCfhw)


def check_latent_channels(data_channels: int, model_channels: int, field_value: int) -> None:
    """The autoencoder's latent channels must be the DiT's in_channels (model.latent_channels sets them)."""
    if data_channels != model_channels:
        fix = f"the data's autoencoder gives {data_channels} latent channels, the model takes {model_channels}: "
        raise ConfigError("model.latent_channels", field_value, fix + f"set model.latent_channels={data_channels}")


def build_latent_encoder(root: str | Path, vae: str = "") -> LatentEncoder:
    return LatentEncoder(load_causal_vae(vae) if vae else load_autoencoder(root))


def _stack_rows(rows: list[dict | None], latent_shape: tuple, uncond: TextBatch) -> tuple[torch.Tensor, TextBatch]:
    """Cached rows -> latents [b, C, f, h, w] and their text; missing rows get zeros and the empty caption."""
    like = next((r for r in rows if r is not None), None)
    zeros = torch.zeros(latent_shape) if like is None else torch.zeros_like(like["latents"])
    blank = {"states": uncond.states[0], "mask": uncond.mask[0], "pooled": uncond.pooled[0]}
    full = [r if r is not None else {"latents": zeros, **blank} for r in rows]
    text = TextBatch(*(torch.stack([r[k] for r in full]) for k in ("states", "mask", "pooled")))
    return torch.stack([r["latents"] for r in full]), text


class StreamData:
    """Per-step batches of one data-parallel rank from the bucket loader."""

    def __init__(self, cfg: TrainConfig, text_encoder, dit_cfg):
        self.cfg, self.dit_cfg, self.text_encoder = cfg, dit_cfg, text_encoder
        self.loader = BucketLoader(cfg.data, cfg.seed, dit_cfg.patch_size, dit_cfg.patch_size_t)
        if cfg.data.format == "latent":
            self.uncond = load_uncond(cfg.data.root)
            if self.uncond.states.shape[-1] != dit_cfg.text_dim or self.uncond.pooled.shape[-1] != dit_cfg.pooled_dim:
                raise DataError(
                    f"latent shards in {cfg.data.root} hold text dims {self.uncond.states.shape[-1]}/"
                    f"{self.uncond.pooled.shape[-1]}; model.flavor={cfg.model.flavor} wants "
                    f"{dit_cfg.text_dim}/{dit_cfg.pooled_dim}: re-run `vidtron-data encode --flavor {cfg.model.flavor}`"
                )
        else:
            self.encoder = build_latent_encoder(cfg.data.root, cfg.data.vae)
            check_latent_channels(self.encoder.channels, dit_cfg.in_channels, cfg.model.latent_channels)
            self.uncond = text_encoder.encode([""])
        self.tokens_per_sample = min(self.tokens(b) for b in self.loader.buckets)  # the tightest split for CP

    def tokens(self, bucket) -> int:
        return bucket.tokens(self.dit_cfg.patch_size, self.dit_cfg.patch_size_t)

    def batch(self, cursor: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, TextBatch, LocalBatch]:
        """(latents [b, C, f, h, w], text with b rows, the rows' plan incl. weights) of the batch at `cursor`."""
        lb = self.loader.local_batch(cursor, dp_rank, dp)
        if self.cfg.data.format == "latent":
            rows = self.loader.read_latents(lb, load_latent_sample)
            shape = (self.dit_cfg.in_channels, *lb.bucket.latent_shape())
            return (*_stack_rows(rows, shape, self.uncond), lb)
        latents = self.encoder(to_model_input(self.loader.pixels(lb)))  # [b, C, f, h, w]
        return latents, self.text_encoder.encode(self.loader.captions(lb)), lb
