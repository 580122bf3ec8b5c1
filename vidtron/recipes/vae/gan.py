"""The VAE + discriminator pair, its two optimizers' param groups, and one training step as two update phases.

`VAEGAN` holds both networks as submodules (`vae.*`, `disc.*`), so one DCP state dict covers both and a checkpoint
resumes the critic too; the two AdamW optimizers are passed to `save_checkpoint` / `load_checkpoint` as a list
(DCP's `get_state_dict` flattens them by parameter name). The LPIPS network is frozen and not part of it.

Data parallelism: either replication, where every rank holds both networks whole and the shared update step
(vidtron/platform/update.py) averages the gradients over the data-parallel group before each update, or ZeRO
(`parallelize.py`), where FSDP2 shards the params, gradients and AdamW state and averages the gradients itself (they
arrive as DTensors, which the update step then leaves alone). Either way the adaptive weight's last-layer gradients (this rank's, full tensors) are averaged over
the group before their norms, so any layout takes the same steps as one rank on the whole batch.

Shape legend: B batch, C channels, F frames, H, W pixels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from vidtron.errors import ConfigError
from vidtron.models.vae import FLAVORS, CausalVAE
from vidtron.models.vae.tiling import tiled_decode, tiled_encode
from vidtron.platform.task import Phase
from vidtron.recipes.vae.config import VAERecipeConfig
from vidtron.recipes.vae.discriminator import PatchDiscriminator3D
from vidtron.recipes.vae.losses import Reduce, VAEObjective, adversarial_on


class VAEGAN(nn.Module):
    """The trained pair: `vae` (a CausalVAE) and `disc` (its 3D PatchGAN critic)."""

    def __init__(self, vae: CausalVAE, disc: PatchDiscriminator3D):
        super().__init__()
        self.vae = vae
        self.disc = disc

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight: the adaptive adversarial weight compares gradient norms here. Under ZeRO
        (parallelize.py) read it after a decode: it is then the gathered full weight in the graph, not the shard."""
        return self.vae.decoder.conv_out.weight


def build_gan(cfg: VAERecipeConfig, seed: int) -> VAEGAN:
    """Both networks, initialised from `seed` (identical on every rank)."""
    if cfg.flavor not in FLAVORS:
        raise ConfigError("vae.flavor", cfg.flavor, f"choose one of {sorted(FLAVORS)}")
    torch.manual_seed(seed)
    vae = CausalVAE(FLAVORS[cfg.flavor])
    disc = PatchDiscriminator3D(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers)
    return VAEGAN(vae, disc)


def optimizer_groups(gan: VAEGAN, cfg: VAERecipeConfig) -> dict[str, list[dict]]:
    """{"vae": AdamW over optim.*, "disc": AdamW at lr * disc_lr_scale with betas (disc_beta1, disc_beta2)}, as the
    param groups the trainer's `build_optimizers` takes (`lr_scale` multiplies the scheduled LR)."""
    disc = {"params": list(gan.disc.parameters()), "lr_scale": cfg.disc_lr_scale}
    return {
        "vae": [{"params": list(gan.vae.parameters()), "lr_scale": 1.0}],
        "disc": [{**disc, "betas": (cfg.disc_beta1, cfg.disc_beta2)}],
    }


def tiling_kwargs(cfg: VAERecipeConfig) -> dict:
    return {"tile_size": cfg.tile_size, "tile_frames": cfg.tile_frames, "overlap": cfg.tile_overlap}


def reconstruct(
    vae: CausalVAE, video_BCFHW: torch.Tensor, eps_BZfhw: torch.Tensor | None, tiling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recon [B, C, F, H, W], mean, logvar [B, Z, f, h, w]); decodes mean + std * eps (the mean when eps is None),
    through `tiled_encode` / `tiled_decode` when `tiling` (their keyword arguments) is given."""
    mean, logvar = tiled_encode(vae, video_BCFHW, **tiling) if tiling else vae.encode(video_BCFHW)
    z = mean if eps_BZfhw is None else mean + torch.exp(0.5 * logvar) * eps_BZfhw
    recon = tiled_decode(vae, z, **tiling) if tiling else vae.decode(z)
    return recon, mean, logvar


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients for `module` inside (gradients still flow through it to its inputs).

    Under FSDP the registered params are the sharded ones outside a forward / backward and the unsharded ones in
    between, and each unshard copies `requires_grad` from the sharded param; so both the params found on entry and
    those registered on exit are restored."""
    entered = list(module.parameters())
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p in [*entered, *module.parameters()]:
            p.requires_grad_(True)


def dp_mean(group) -> Reduce:
    """x -> mean of x over the data-parallel `group` (identity without one)."""

    def mean(x: torch.Tensor) -> torch.Tensor:
        if group is None:
            return x
        x = x.detach().clone()
        dist.all_reduce(x, group=group)
        return x / dist.get_world_size(group)

    return mean


def phases(gan: VAEGAN, objective: VAEObjective, batch: dict, step: int, group=None) -> Iterator[Phase]:
    """One step of the pair as two phases: the VAE's update, then (after disc_start steps) the discriminator's on
    the same batch, against the reconstruction the VAE made before its update (as VQGAN trains).

    batch: {"video": [b, C, F, H, W] in [-1, 1], "eps": [b, Z, f, h, w] or None, "tiled": bool}, on the model's
    device. The VAE phase's metrics are its loss terms (l1, kl, g_loss, adaptive_weight, ...); the critic's are
    d_loss and its logits' means. `group` averages the adaptive weight's last-layer gradients (see the module doc).
    """
    cfg = objective.cfg
    video, eps = batch["video"], batch["eps"]
    recon, mean, logvar = reconstruct(gan.vae, video, eps, tiling_kwargs(cfg) if batch["tiled"] else None)
    with frozen(gan.disc):
        terms = objective.generator_terms(gan.disc, video, recon, mean, logvar, step, gan.last_layer, dp_mean(group))
    loss = terms.pop("loss")
    yield Phase("vae", loss, terms)
    if adversarial_on(step, cfg.disc_start) and cfg.adv_weight > 0:
        d_terms = objective.discriminator_loss(gan.disc, video, recon)
        yield Phase("disc", d_terms["d_loss"], d_terms)
