"""parallelize_vae: ZeRO (FSDP2) for the causal 3D VAE, applied from outside the single-device model.

Units, in forward order: each encoder down block, the encoder's and decoder's mid blocks, each decoder up block;
then the VAE root, which holds the rest (conv_in / norm_out / conv_out, quant convs) and keeps its params after
forward (so the decoder's last conv weight is the unsharded tensor in the graph: the GAN recipe's adaptive weight
differentiates it). The VAE is called through `encode_moments` and `decode` (tiled or not), never `forward`, so those
two methods are registered as FSDP forward methods. Layouts: FSDP2 over dp_shard, HSDP over (dp_replicate, dp_shard)
when dp_replicate > 1 too; ZeRO-3 reshards each block after its forward, ZeRO-2 (and 1) keeps it until backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions

VAE_FORWARD_METHODS = ("encode_moments", "decode")  # what `reconstruct` / tiling call instead of forward


def uses_fsdp(dims: ParallelDims) -> bool:
    """ZeRO sharding is on when there is more than one dp_shard rank (pure dp_replicate stays replicated)."""
    return dims.dp_shard > 1


def fsdp_kwargs(dims: ParallelDims, opts: ParallelizeOptions) -> dict:
    """fully_shard's mesh, mixed precision and resharding for `opts` (fp32 reduction always)."""
    mesh = dims.mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else dims.mesh["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, opts.param_dtype), reduce_dtype=torch.float32)
    return {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": opts.zero_stage >= 3}


def shard_vae(vae: nn.Module, kw: dict) -> None:
    """fully_shard the encoder's and decoder's blocks, then the VAE root; encode / decode become FSDP forwards."""
    enc, dec = vae.encoder, vae.decoder
    for block in [*enc.down_blocks, enc.mid_block, dec.mid_block, *dec.up_blocks]:
        fully_shard(block, **kw)
    fully_shard(vae, **{**kw, "reshard_after_forward": False})
    for name in VAE_FORWARD_METHODS:
        register_fsdp_forward_method(vae, name)


def parallelize_vae(vae: nn.Module, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> nn.Module:
    """Shard `vae` (mesh built) in place when `uses_fsdp(dims)`; returns it."""
    opts = opts or ParallelizeOptions()
    if uses_fsdp(dims):
        shard_vae(vae, fsdp_kwargs(dims, opts))
    return vae
