"""parallelize_dit: apply the parallel layout to a single-device DiT from outside, in one fixed order.

1. TP/SP plans        (tensor parallel heads / MLP hidden; sequence parallel norms and residuals)
2. context parallel   (swap every block's `attn_core` for ring / Ulysses / USP)
3. recompute/offload  (activation memory policies)
4. torch.compile
5. FSDP2 per block, then the root (ZeRO-3 by default; ZeRO-2 keeps params after forward; HSDP with
   dp_replicate > 1). Parameters are sharded over dp_shard x cp (CP ranks hold the same parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vidtron.parallel.dims import ParallelDims
from vidtron.platform.errors import ConfigError


@dataclass
class ParallelizeOptions:
    zero_stage: int = 3  # 3: reshard params after forward; 2: keep them until backward; 1 acts like 2 with FSDP2
    param_dtype: str = "float32"  # FSDP2 mixed precision: dtype of the all-gathered params


def _fsdp_mesh(dims: ParallelDims):
    mesh = dims.mesh
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def apply_fsdp(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions) -> None:
    """fully_shard every dual- and single-stream block, the refiner, then the root."""
    import torch

    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, opts.param_dtype), reduce_dtype=torch.float32)
    kw = {"mesh": _fsdp_mesh(dims), "mp_policy": mp, "reshard_after_forward": opts.zero_stage >= 3}
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, **kw)
    fully_shard(model.text_refiner, **kw)
    fully_shard(model, **{**kw, "reshard_after_forward": False})


def parallelize_dit(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> nn.Module:
    """Apply `dims` to `model` in place (and return it)."""
    opts = opts or ParallelizeOptions()
    if dims.tp > 1:
        raise ConfigError(
            "parallel.tp", dims.tp, "tensor parallelism is not wired into the trainer yet; use parallel.tp=1"
        )
    if dims.cp > 1:
        raise ConfigError(
            "parallel.cp", dims.cp, "context parallelism is not wired into the trainer yet; use parallel.cp=1"
        )
    if dims.dp_shard * dims.cp > 1 or dims.dp_replicate > 1:
        apply_fsdp(model, dims, opts)
    return model
