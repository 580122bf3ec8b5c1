"""What the trainer trains for recipe dit_t2v: the model, each step's batch, and the flow-matching loss.

Every random draw of a sample (noise, time, caption dropout, guidance scale) comes from a generator keyed by
(seed, step, position in the global batch), so any data-parallel layout sees the same numbers as one rank.
Legend: b local batch, C latent channels, F latent frames, H, W latent height/width, T text tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vidtron.errors import ConfigError
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config, latent_shape
from vidtron.models.dit.parallelize import parallelize_dit
from vidtron.models.text.encoders import TextBatch, build_text_encoder
from vidtron.parallel.materialize import materialize
from vidtron.platform.config import TrainConfig
from vidtron.platform.data.sampler import GlobalSampler
from vidtron.platform.init_from import init_from
from vidtron.platform.task import Phase
from vidtron.recipes.dit_t2v.data import LatentSet, build_latent_set, load_autoencoder
from vidtron.recipes.dit_t2v.flow_matching import (
    logit_normal_t,
    noisy_latents,
    replace_first_frame,
    sample_generator,
    sigma_from_t,
    timestep_from_sigma,
    velocity_target,
)
from vidtron.recipes.dit_t2v.stream import StreamData, check_latent_channels
from vidtron.tools.flops import dit_train_flops


class DiTTextToVideo:
    """The dit_t2v task: a DiT learning the flow-matching velocity of latents given their captions."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dit_cfg = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
        check_image_condition(cfg, self.dit_cfg.image_condition == "token_replace")
        self.text_encoder = build_text_encoder(cfg.text, self.dit_cfg.text_dim, self.dit_cfg.pooled_dim)
        self.stream: StreamData | None = None
        if cfg.data.format != "memory":  # bucketed clips (or cached latents) read per step; cursor counts batches
            self.stream = StreamData(cfg, self.text_encoder, self.dit_cfg)
            self.tokens_per_sample = self.stream.tokens_per_sample
            return
        self.autoencoder = load_autoencoder(cfg.data.root)
        self.data: LatentSet = build_latent_set(cfg.data, self.text_encoder, self.autoencoder)
        self.sampler = GlobalSampler(len(self.data.keys), cfg.seed)
        _, c, f, h, w = self.data.latents.shape
        p, pt = self.dit_cfg.patch_size, self.dit_cfg.patch_size_t
        self.tokens_per_sample = (f // pt) * (h // p) * (w // p)
        check_latent_channels(c, self.dit_cfg.in_channels, cfg.model.latent_channels)

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward, vidtron/tools/flops.py) of one sample of the configured clip shape."""
        d = self.cfg.data
        latent = latent_shape(d.frames, d.height, d.width)
        return float(dit_train_flops(self.dit_cfg, latent, self.cfg.text.tokens, 1)["total"])

    def build_model(self) -> DiT:
        """The model on the meta device: the trainer lays it out, then `materialize` allocates the local shards."""
        with torch.device("meta"):
            return DiT(self.dit_cfg)

    def materialize(self, model: DiT, device: torch.device) -> DiT:
        """Allocate this rank's shards on `device` and initialise them from the run seed, so every layout starts from
        the weights one rank would have (vidtron/parallel/materialize.py); then load `model.init_from` if set (a
        resumed run then loads its checkpoint over it)."""
        materialize(model, device, model.init_function(self.cfg.seed))
        if self.cfg.model.init_from:  # then the released / previous-stage weights, each rank reading its slices
            init_from(model, self.cfg.model.init_from, kind="dit")
        return model

    def validate_layout(self, dims) -> None:
        """Reject layouts this DiT and clip shape cannot use (heads, MLP width, tokens), listing valid ones."""
        dims.validate_for(self.dit_cfg.num_heads, self.tokens_per_sample, self.dit_cfg.mlp_hidden)

    def parallelize(self, model: DiT, dims, opts) -> DiT:
        return parallelize_dit(model, dims, opts)

    def local_batch(self, step: int, cursor: int, dp_rank: int, dp: int) -> dict:
        """This data-parallel rank's slice of global batch `step` (stream position `cursor`)."""
        if self.stream is not None:
            return self._stream_batch(step, cursor, dp_rank, dp)
        batch = self.cfg.data.batch_size
        idx = self.sampler.global_indices(cursor, batch)
        part = GlobalSampler.local_slice(batch, dp_rank, dp)
        draws = [self._draw(step, pos, self.data.latents.shape[1:]) for pos in range(batch)[part]]
        rows = torch.tensor(idx[part])
        drop = torch.tensor([d["drop"] for d in draws])
        text = _select_text(self.data.text.index(rows), self.data.uncond, drop)
        return {
            "latents": self.data.latents[rows],  # [b, C, F, H, W]
            "noise": torch.stack([d["noise"] for d in draws]),  # [b, C, F, H, W]
            "sigma": torch.stack([d["sigma"] for d in draws]),  # [b]
            "guidance": torch.stack([d["guidance"] for d in draws]),  # [b], diffusers units (scale * 1000)
            "text": text,
            "indices": idx[part],
        }

    def _stream_batch(self, step: int, cursor: int, dp_rank: int, dp: int) -> dict:
        """Rows of the bucketed global batch `cursor`; weight-0 rows (padding, unreadable) add nothing to the loss."""
        latents, text, lb = self.stream.batch(cursor, dp_rank, dp)
        draws = [self._draw(step, pos, latents.shape[1:]) for pos in lb.positions]
        drop = torch.tensor([d["drop"] for d in draws])
        return {
            "latents": latents,  # [b, C, F, H, W]
            "noise": torch.stack([d["noise"] for d in draws]),  # [b, C, F, H, W]
            "sigma": torch.stack([d["sigma"] for d in draws]),  # [b]
            "guidance": torch.stack([d["guidance"] for d in draws]),  # [b]
            "text": _select_text(text, self.stream.uncond, drop),
            "weight": lb.weight,  # [b]
            "loss_scale": dp / lb.global_samples,  # sum of weighted per-sample losses -> this rank's share of the mean
            "indices": [None if it is None else it.sample for it in lb.items],
            "global_samples": lb.global_samples,
            "global_tokens": lb.global_samples * self.stream.tokens(lb.bucket),
        }

    @property
    def cursor_unit(self) -> str:
        """What the trainer's data cursor counts (the checkpoint manifest records it)."""
        return "global_batches" if self.stream is not None else "samples"

    def next_cursor(self, cursor: int) -> int:
        """The data position after the global batch at `cursor`: + 1 batch (buckets) or + batch_size samples."""
        return cursor + (1 if self.stream is not None else self.cfg.data.batch_size)

    def _draw(self, step: int, pos: int, shape: torch.Size) -> dict:
        """Sample `pos`'s time, noise, caption drop and guidance scale from its keyed generator, in that order."""
        gen = sample_generator(self.cfg.seed, step, pos)
        flow, (g_min, g_max) = self.cfg.flow, self.guidance_range()
        t = logit_normal_t(gen, flow.logit_mean, flow.logit_std)
        noise = torch.randn(shape, generator=gen)
        drop = bool(torch.rand((), generator=gen) < self.cfg.data.caption_dropout)
        scale = g_min + (g_max - g_min) * torch.rand((), generator=gen)
        return {"sigma": sigma_from_t(t), "noise": noise, "drop": drop, "guidance": scale * 1000.0}

    def guidance_range(self) -> tuple[float, float]:
        """[min, max] of the guidance scale drawn per sample (used by guidance-embedded models)."""
        return self.cfg.flow.guidance_min, self.cfg.flow.guidance_max

    def phases(self, model: torch.nn.Module, batch: dict, step: int, device: torch.device) -> Iterator[Phase]:
        """One update of the one optimizer: the flow-matching loss (the trainer applies autocast around it)."""
        yield Phase("model", self.loss(model, batch, device))

    def loss(self, model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        """This rank's share of the mean velocity MSE of `batch` (weighted per sample for bucketed streams).
        Image-to-video: latent frame 0 enters clean (the model gives its tokens the timestep-0 modulation) and the
        loss covers the other frames only."""
        x1, x0 = batch["latents"].to(device), batch["noise"].to(device)
        sigma = batch["sigma"].to(device)
        text: TextBatch = batch["text"]
        guidance = batch["guidance"].to(device) if self.dit_cfg.guidance_embeds else None
        x_t = noisy_latents(x1, x0, sigma)
        i2v = self.dit_cfg.image_condition == "token_replace"
        if i2v:
            _check_i2v_frames(x1.shape[2])
            x_t = replace_first_frame(x_t, x1)  # [b, C, F, H, W]: frame 0 is the clean reference latent
        v = model(
            x_t,
            timestep_from_sigma(sigma),
            text.states.to(device),
            text.mask.to(device),
            text.pooled.to(device),
            guidance,
        )
        target = velocity_target(x1, x0)
        if i2v:
            v, target = v[:, :, 1:], target[:, :, 1:]  # [b, C, F - 1, H, W]: no loss on the conditioning frame
        if "weight" not in batch:
            return F.mse_loss(v.float(), target)
        per_sample = (v.float() - target).pow(2).flatten(1).mean(1)  # [b]
        return (per_sample * batch["weight"].to(device)).sum() * batch["loss_scale"]


def check_image_condition(cfg: TrainConfig, i2v: bool) -> None:
    """Image-to-video trains in recipe dit_t2v only, on clips of >= 2 latent frames (frame 0 is the condition)."""
    if not i2v:
        return
    if cfg.recipe != "dit_t2v":
        fix = "image-to-video (token_replace) trains with recipe=dit_t2v; drop model.image_condition here"
        raise ConfigError("model.image_condition", cfg.model.image_condition, fix)
    _check_i2v_frames(latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)[0], "data.frames")
    for bucket in cfg.data.buckets:
        _check_i2v_frames(latent_shape(bucket.frames, bucket.height, bucket.width)[0], "data.buckets[].frames")


def _check_i2v_frames(latent_frames: int, field: str = "latent frames") -> None:
    if latent_frames < 2:
        fix = "image-to-video needs >= 2 latent frames (>= 5 pixel frames): frame 0 is the reference image"
        raise ConfigError(field, latent_frames, fix)


def _select_text(text: TextBatch, uncond: TextBatch, drop_b: torch.Tensor) -> TextBatch:
    """Replace dropped captions with the empty caption's encoding."""
    if not bool(drop_b.any()):
        return text
    m = drop_b.view(-1, 1)
    return TextBatch(
        states=torch.where(m.unsqueeze(-1), uncond.states, text.states),
        mask=torch.where(m, uncond.mask, text.mask),
        pooled=torch.where(m, uncond.pooled, text.pooled),
    )
