"""parallelize_gan: ZeRO (FSDP2) for the VAE + discriminator pair, applied from outside the single-device models.

Layouts (the recipe is data parallel only: tp = cp = 1):
    dp_shard > 1                 FSDP2 over dp_shard; HSDP over (dp_replicate, dp_shard) when dp_replicate > 1 too.
                                 ZeRO-3 (parallel.zero.stage=3, the default) reshards each block's params after its
                                 forward; ZeRO-2 (and 1) keeps them until the backward. Grads and AdamW state are
                                 sharded in both; FSDP averages the gradients over the data-parallel ranks.
    dp_shard = 1, dp_replicate   replication: both networks whole on every rank, `gan.train_step` averages the
                                 gradients by hand.

Units, in forward order: each encoder down block, the encoder's and decoder's mid blocks, each decoder up block,
each discriminator layer (its conv + norm); then each network's root, `gan.vae` and `gan.disc`, which hold the rest
(conv_in / norm_out / conv_out, quant convs; the critic's last conv). The pair itself is not an FSDP module: the two
networks run (and backpropagate) separately, so each is a root of its own.

The VAE is called through `encode_moments` and `decode` (tiled or not), never `forward`, so those two methods are
registered as FSDP forward methods. Roots keep their params after forward (as the DiT's root): the decoder's last
conv weight (`VAEGAN.last_layer`) is then the unsharded tensor that is in the graph, a plain full tensor that the
adaptive weight's `autograd.grad` differentiates (its gradient is this rank's, averaged by hand like replication's).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from vidtron.parallel.dims import ParallelDims

VAE_FORWARD_METHODS = ("encode_moments", "decode")  # what `reconstruct` / tiling call instead of forward


def uses_fsdp(dims: ParallelDims) -> bool:
    """ZeRO sharding is on when there is more than one dp_shard rank (pure dp_replicate stays replicated)."""
    return dims.dp_shard > 1


def _fsdp_mesh(dims: ParallelDims):
    mesh = dims.mesh
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def _disc_layers(disc: nn.Module) -> list[list[nn.Module]]:
    """The critic's layers with parameters: each conv together with the GroupNorm right after it (if any)."""
    layers: list[list[nn.Module]] = []
    for module in disc.net:
        if isinstance(module, nn.Conv3d):
            layers.append([module])
        elif isinstance(module, nn.GroupNorm):
            layers[-1].append(module)
    return layers


def shard_vae(vae: nn.Module, kw: dict) -> None:
    """fully_shard the encoder's and decoder's blocks, then the VAE root; encode / decode become FSDP forwards."""
    enc, dec = vae.encoder, vae.decoder
    for block in [*enc.down_blocks, enc.mid_block, dec.mid_block, *dec.up_blocks]:
        fully_shard(block, **kw)
    fully_shard(vae, **{**kw, "reshard_after_forward": False})
    for name in VAE_FORWARD_METHODS:
        register_fsdp_forward_method(vae, name)


def shard_disc(disc: nn.Module, kw: dict) -> None:
    """fully_shard each discriminator layer but the last conv, then the discriminator root (holding that conv)."""
    for layer in _disc_layers(disc)[:-1]:
        fully_shard(layer if len(layer) > 1 else layer[0], **kw)
    fully_shard(disc, **{**kw, "reshard_after_forward": False})


def parallelize_gan(gan: nn.Module, dims: ParallelDims, zero_stage: int = 3, param_dtype: str = "float32") -> nn.Module:
    """Shard `gan` (a VAEGAN, mesh built) in place when `uses_fsdp(dims)`; returns it."""
    if not uses_fsdp(dims):
        return gan
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
    kw = {"mesh": _fsdp_mesh(dims), "mp_policy": mp, "reshard_after_forward": zero_stage >= 3}
    shard_vae(gan.vae, kw)
    shard_disc(gan.disc, kw)
    return gan
