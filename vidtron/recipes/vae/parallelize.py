"""parallelize_gan: ZeRO (FSDP2) for the VAE + discriminator pair of the GAN recipe.

The VAE is laid out by its own `parallelize_vae` (vidtron/models/vae/parallelize.py); the critic, this recipe's
model, beside it: each discriminator layer (its conv + norm), then the discriminator's root, which holds the last
conv. The pair itself is not an FSDP module: the two networks run (and backpropagate) separately, so each is a root
of its own. Without dp_shard > 1 both stay whole on every rank and the shared update step averages their gradients
(replication).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard

from vidtron.models.vae.parallelize import fsdp_kwargs, shard_vae, uses_fsdp
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions


def _disc_layers(disc: nn.Module) -> list[list[nn.Module]]:
    """The critic's layers with parameters: each conv together with the GroupNorm right after it (if any)."""
    layers: list[list[nn.Module]] = []
    for module in disc.net:
        if isinstance(module, nn.Conv3d):
            layers.append([module])
        elif isinstance(module, nn.GroupNorm):
            layers[-1].append(module)
    return layers


def shard_disc(disc: nn.Module, kw: dict) -> None:
    """fully_shard each discriminator layer but the last conv, then the discriminator root (holding that conv)."""
    for layer in _disc_layers(disc)[:-1]:
        fully_shard(layer if len(layer) > 1 else layer[0], **kw)
    fully_shard(disc, **{**kw, "reshard_after_forward": False})


def parallelize_gan(gan: nn.Module, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> nn.Module:
    """Shard `gan` (a VAEGAN, mesh built) in place when `uses_fsdp(dims)`; returns it."""
    opts = opts or ParallelizeOptions()
    if uses_fsdp(dims):
        kw = fsdp_kwargs(dims, opts)
        shard_vae(gan.vae, kw)
        shard_disc(gan.disc, kw)
    return gan
