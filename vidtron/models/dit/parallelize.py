"""parallelize_dit: apply the parallel layout to a single-device DiT from outside, in one fixed order.

1. TP/SP plans        heads / MLP hidden over tp (column / row linears); the residual streams between the TP
                      regions sharded over tokens (vidtron/parallel/tensor_parallel.py)
2. context parallel   every block's `attn_core` becomes ring / Ulysses / USP (or stays dense), wrapped to drop SP
                      padding; hooks shard video (+ RoPE) over cp and both streams over tp before the first block
                      and gather the video before the final layer (vidtron/parallel/context_wrap.py)
3. recompute/offload  activation recompute (full / selective), then layer-wise offload (vidtron/parallel/offload.py)
4. torch.compile      (not yet)
5. FSDP2 per block, then the root (ZeRO-3 by default; ZeRO-2 keeps params after forward; HSDP with
   dp_replicate > 1); skipped for parallel.zero.engine=deepspeed, where the trainer hands the model to DeepSpeed
   ZeRO instead (vidtron/parallel/deepspeed_zero.py). Parameters are sharded over dp_shard x cp (CP ranks hold
   the same parameters); with tp > 1 FSDP2 shards the TP DTensors on the 2D (dp_shard_cp, tp) mesh.

Gradients: FSDP averages over dp_replicate x dp_shard x cp. CP ranks each compute the full loss of their data-
parallel group and the CP backward makes their gradients sum to cp x the gradient (context_wrap.py), so the average
is exact. TP ranks hold the full gradient of replicated parameters and their own shard of sharded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vidtron.kernels.attention import DenseAttention
from vidtron.parallel.context import build_cp_attention
from vidtron.parallel.context_wrap import TokenSharder, wrap_tokens
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.offload import apply_activation_memory
from vidtron.parallel.tensor_parallel import apply_tensor_parallel, reduce_partial_grads
from vidtron.platform.config import MemoryConfig


@dataclass
class ParallelizeOptions:
    zero_stage: int = 3  # 3: reshard params after forward; 2: keep them until backward; 1 acts like 2 with FSDP2
    zero_engine: str = "fsdp2"  # fsdp2: step 5 here; deepspeed: no FSDP, the trainer wraps the model afterwards
    param_dtype: str = "float32"  # FSDP2 mixed precision: dtype of the all-gathered params
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # step 3: recompute / offload policies


def _fsdp_mesh(dims: ParallelDims):
    mesh = dims.mesh
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def _uses_fsdp(dims: ParallelDims) -> bool:
    return dims.dp_shard * dims.cp > 1 or dims.dp_replicate > 1


def apply_fsdp(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions) -> None:
    """fully_shard every dual- and single-stream block, the refiner, then the root."""
    import torch

    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, opts.param_dtype), reduce_dtype=torch.float32)
    kw = {"mesh": _fsdp_mesh(dims), "mp_policy": mp, "reshard_after_forward": opts.zero_stage >= 3}
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, **kw)
    fully_shard(model.text_refiner, **kw)
    fully_shard(model, **{**kw, "reshard_after_forward": False})


def apply_context_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Swap the attention cores for the CP core (dense when cp == 1) and install the token-sharding hooks."""
    local_heads = model.config.num_heads // dims.tp
    core = build_cp_attention(dims, heads=local_heads) or DenseAttention()
    wrap_tokens(model, TokenSharder(dims.mesh["cp"], dims.mesh["tp"]), core)


def parallelize_dit(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> nn.Module:
    """Apply `dims` (mesh built) to `model` in place (and return it)."""
    opts = opts or ParallelizeOptions()
    dims.validate_for(model.config.num_heads, None, model.config.mlp_hidden)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh["tp"])
    if dims.tp > 1 or dims.cp > 1:
        apply_context_parallel(model, dims)
    apply_activation_memory(model, opts.memory)  # 3. recompute, then offload
    if _uses_fsdp(dims) and opts.zero_engine == "fsdp2":
        apply_fsdp(model, dims, opts)
    elif dims.tp > 1:
        reduce_partial_grads(model)
    return model
