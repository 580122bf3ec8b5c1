"""The VAE + discriminator pair, its two optimizers, and one training step (shared by the recipe and the demo).

`VAEGAN` holds both networks as submodules (`vae.*`, `disc.*`), so one DCP state dict covers both and a checkpoint
resumes the critic too; the two AdamW optimizers are passed to `save_checkpoint` / `load_checkpoint` as a list
(DCP's `get_state_dict` flattens them by parameter name). The LPIPS network is frozen and not part of it.

Data parallelism: either replication, where every rank holds both networks whole and `train_step` averages the
gradients over the data-parallel group before each update, or ZeRO (`parallelize.py`), where FSDP2 shards the
params, gradients and AdamW state and averages the gradients itself (they arrive as DTensors, which `_update` then
leaves alone). Either way the adaptive weight's last-layer gradients (this rank's, full tensors) are averaged over
the group before their norms, so any layout takes the same steps as one rank on the whole batch.

Shape legend: B batch, C channels, F frames, H, W pixels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vidtron.models.vae import FLAVORS, CausalVAE
from vidtron.models.vae.tiling import tiled_decode, tiled_encode
from vidtron.platform.config import OptimConfig
from vidtron.platform.errors import ConfigError
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


def build_optimizers(gan: VAEGAN, o: OptimConfig, cfg: VAERecipeConfig) -> dict[str, torch.optim.Optimizer]:
    """{"vae": AdamW(optim.*), "disc": AdamW(lr * disc_lr_scale, betas disc_beta1/2)}. Each param group carries
    `lr_scale`, so a schedule sets group["lr"] = lr * group["lr_scale"]."""
    vae = torch.optim.AdamW(
        [{"params": list(gan.vae.parameters()), "lr_scale": 1.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    disc = torch.optim.AdamW(
        [{"params": list(gan.disc.parameters()), "lr_scale": cfg.disc_lr_scale}],
        lr=o.lr * cfg.disc_lr_scale,
        betas=(cfg.disc_beta1, cfg.disc_beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    return {"vae": vae, "disc": disc}


def set_lr(optimizers: dict[str, torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


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


def _update(module: nn.Module, opt: torch.optim.Optimizer, grad_clip: float, group) -> torch.Tensor:
    """Average the gradients over `group` (unless FSDP did: DTensor gradients), clip, step, clear; returns the
    pre-clip global grad norm. A NaN/inf norm skips the update (the norm is the same on every rank after
    averaging, so all ranks skip together)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if group is not None and params and not isinstance(params[0].grad, DTensor):
        flat = dp_mean(group)(torch.cat([p.grad.flatten() for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded grads: the norm of the whole
    if torch.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def train_step(
    gan: VAEGAN,
    optimizers: dict[str, torch.optim.Optimizer],
    objective: VAEObjective,
    batch: dict,
    step: int,
    lr: float,
    grad_clip: float,
    group=None,
) -> dict[str, float]:
    """One optimizer step of the VAE, then (after disc_start steps) one of the discriminator on the same batch.

    batch: {"video": [b, C, F, H, W] in [-1, 1], "eps": [b, Z, f, h, w] or None, "tiled": bool}, on the model's
    device. Returns the step's metrics averaged over `group` ("loss" is the VAE's total loss; a non-finite
    "grad_norm" / "disc_grad_norm" means that update was skipped)."""
    cfg = objective.cfg
    set_lr(optimizers, lr)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    video, eps = batch["video"], batch["eps"]
    recon, mean, logvar = reconstruct(gan.vae, video, eps, tiling_kwargs(cfg) if batch["tiled"] else None)
    with frozen(gan.disc):
        terms = objective.generator_terms(gan.disc, video, recon, mean, logvar, step, gan.last_layer, dp_mean(group))
    terms["loss"].backward()
    terms["grad_norm"] = _update(gan.vae, optimizers["vae"], grad_clip, group)
    if adversarial_on(step, cfg.disc_start) and cfg.adv_weight > 0:
        d_terms = objective.discriminator_loss(gan.disc, video, recon)
        d_terms["d_loss"].backward()
        d_terms["disc_grad_norm"] = _update(gan.disc, optimizers["disc"], grad_clip, group)
        terms.update(d_terms)
    return _metrics(terms, group)


def _metrics(terms: dict[str, torch.Tensor], group) -> dict[str, float]:
    """Scalar terms as floats, averaged over the data-parallel group in one all-reduce."""
    names = sorted(terms)
    values = dp_mean(group)(torch.stack([terms[n].detach().float().reshape(()) for n in names]))
    return dict(zip(names, values.tolist()))
