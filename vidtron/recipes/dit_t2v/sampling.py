"""Text-to-video and image-to-video sampling with a trained DiT: Euler steps, time shift, CFG or the guidance embedding.

Image-to-video (a DiT with image_condition="token_replace"): latent frame 0 holds the reference image's latent at
every step (the DiT modulates its tokens with the timestep-0 conditioning) and only the other frames are integrated,
as diffusers' HunyuanVideoImageToVideoPipeline does; the sampled frame 0 is the image latent exactly.

Legend: B batch, C latent channels, F latent frames, H, W latent height/width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidtron.models.text.encoders import TextBatch
from vidtron.recipes.dit_t2v.flow_matching import VelocityFn, cfg_combine, euler_sample, replace_first_frame


@dataclass
class SampleOptions:
    steps: int = 30  # Euler steps
    shift: float | None = None  # time shift; None = HunyuanVideo's rule (17 under 20 steps, else 7)
    cfg_scale: float = 5.0  # classifier-free guidance scale (1 = off); ignored for guidance-embedded models
    guidance: float = 6.0  # guidance-embedding scale, for distilled flavors
    seed: int = 0


def _cat(a: TextBatch, b: TextBatch) -> TextBatch:
    return TextBatch(torch.cat([a.states, b.states]), torch.cat([a.mask, b.mask]), torch.cat([a.pooled, b.pooled]))


def make_velocity_fn(model, text: TextBatch, uncond: TextBatch, opts: SampleOptions, guidance_embeds: bool):
    """(x, timestep) -> guided velocity. CFG runs the conditional and unconditional rows as one batch."""
    use_cfg = opts.cfg_scale != 1.0 and not guidance_embeds
    batch_text = _cat(text, uncond) if use_cfg else text

    def velocity(x_BCFHW: torch.Tensor, timestep_B: torch.Tensor) -> torch.Tensor:
        b = x_BCFHW.shape[0]
        x = torch.cat([x_BCFHW, x_BCFHW]) if use_cfg else x_BCFHW
        t = torch.cat([timestep_B, timestep_B]) if use_cfg else timestep_B
        g = torch.full((x.shape[0],), opts.guidance * 1000.0, device=x.device) if guidance_embeds else None
        v = model(x, t, batch_text.states, batch_text.mask, batch_text.pooled, g)
        return cfg_combine(v[:b], v[b:], opts.cfg_scale) if use_cfg else v

    return velocity


def frozen_first_frame(velocity: VelocityFn) -> VelocityFn:
    """The velocity with latent frame 0 zeroed: Euler steps then leave the conditioning frame exactly as it is."""

    def frozen(x_BCFHW: torch.Tensor, timestep_B: torch.Tensor) -> torch.Tensor:
        v_BCFHW = velocity(x_BCFHW, timestep_B)
        return torch.cat([torch.zeros_like(v_BCFHW[:, :, :1]), v_BCFHW[:, :, 1:]], dim=2)

    return frozen


@torch.no_grad()
def sample_latents(
    model,
    text: TextBatch,
    uncond: TextBatch,
    latent_shape: tuple,
    opts: SampleOptions,
    guidance_embeds: bool,
    image_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents [B, C, F, H, W] for the B captions encoded in `text` (`uncond`: the empty caption, one row).
    `image_latents` [B or 1, C, 1, H, W]: image-to-video, latent frame 0 is this reference latent throughout."""
    b = text.states.shape[0]
    uncond = TextBatch(uncond.states.expand(b, -1, -1), uncond.mask.expand(b, -1), uncond.pooled.expand(b, -1))
    gen = torch.Generator().manual_seed(opts.seed)  # CPU generator: the same noise on every device and rank
    noise = torch.randn((b, *latent_shape), generator=gen).to(text.states.device)
    velocity = make_velocity_fn(model, text, uncond, opts, guidance_embeds)
    if image_latents is not None:
        noise = replace_first_frame(noise, image_latents.to(noise.device).expand(b, -1, -1, -1, -1))
        velocity = frozen_first_frame(velocity)
    return euler_sample(velocity, noise, opts.steps, opts.shift)
