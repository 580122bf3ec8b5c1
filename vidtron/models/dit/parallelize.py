"""parallelize_dit: apply the parallel layout to a single-device DiT from outside, in one fixed order.

1. TP/SP plans        heads / MLP hidden over tp (column / row linears); the residual streams between the TP
                      regions sharded over tokens (the tables: sharding.py; the styles: vidtron/parallel/)
2. context parallel   every block's `attn_core` becomes ring / Ulysses / USP (or stays dense; or SSTA with
                      `opts.attention="ssta"`: alone, or as Ulysses' inner core; ring / USP refused), wrapped to drop SP
                      padding; hooks shard video (+ RoPE) over cp and both streams over tp before the first block
                      and gather the video before the final layer (hooks: sharding.py; sharder:
                      vidtron/parallel/context_wrap.py)
3. recompute/offload  activation recompute (full / selective), then layer-wise offload (regions: sharding.py)
4. torch.compile      each dual- / single-stream block (`opts.compile`, trainer.compile=true), in place: names
                      and hooks stay (FSDP2 then wraps the compiled blocks, as torchtitan does)
5. FSDP2 per block, then the root (ZeRO-3 by default; ZeRO-2 keeps params after forward; HSDP with
   dp_replicate > 1); skipped for parallel.zero.engine=deepspeed, where the trainer hands the model to DeepSpeed
   ZeRO instead (vidtron/parallel/deepspeed_zero.py). Parameters are sharded over dp_shard x cp (CP ranks hold
   the same parameters); with tp > 1 FSDP2 shards the TP DTensors on the 2D (dp_shard_cp, tp) mesh.

Gradients: FSDP averages over dp_replicate x dp_shard x cp. CP ranks each compute the full loss of their data-
parallel group and the CP backward makes their gradients sum to cp x the gradient (context_wrap.py), so the average
is exact. TP ranks hold the full gradient of replicated parameters and their own shard of sharded ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vidtron.kernels.attention import DenseAttention
from vidtron.kernels.ssta import CanvasSSTA
from vidtron.models.dit.sharding import apply_activation_memory, apply_tensor_parallel, dit_blocks, wrap_tokens
from vidtron.parallel.context import build_cp_attention
from vidtron.parallel.context_wrap import TokenSharder
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions
from vidtron.parallel.tensor_parallel import reduce_partial_grads


def _fsdp_mesh(dims: ParallelDims):
    mesh = dims.mesh
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def _uses_fsdp(dims: ParallelDims) -> bool:
    return dims.dp_shard * dims.cp > 1 or dims.dp_replicate > 1


def apply_fsdp(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions) -> None:
    """fully_shard every dual- and single-stream block, the refiner, then the root."""
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, opts.param_dtype), reduce_dtype=torch.float32)
    kw = {"mesh": _fsdp_mesh(dims), "mp_policy": mp, "reshard_after_forward": opts.zero_stage >= 3}
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, **kw)
    fully_shard(model.text_refiner, **kw)
    fully_shard(model, **{**kw, "reshard_after_forward": False})


def attention_core(model: nn.Module, opts: ParallelizeOptions) -> nn.Module | None:
    """The per-token-set attention core `opts.attention` asks for, or None for dense (keep the blocks' own).

    ssta: one shared `CanvasSSTA`; a forward pre-hook on the model sets its canvas to the model's token grid of
    every call (the full grid: under Ulysses the core sees every video token of its heads, and under TP all tokens).
    """
    if opts.attention == "dense":
        return None
    core = CanvasSSTA(opts.ssta)

    def set_canvas(module, args, kwargs):  # DiT.forward(latents [B, C, F, H, W], ...)
        latents = args[0] if args else kwargs["latents"]
        core.set_canvas(module.token_grid(latents.shape))

    model.register_forward_pre_hook(set_canvas, with_kwargs=True)
    return core


def apply_context_parallel(model: nn.Module, dims: ParallelDims, inner: nn.Module | None = None) -> None:
    """Swap the attention cores for the CP core (`inner`, or dense, when cp == 1) and install the token-sharding
    hooks. `inner` is the per-rank core: Ulysses runs it after its all-to-all (SSTA plugs in here)."""
    local_heads = model.config.num_heads // dims.tp
    core = build_cp_attention(dims, heads=local_heads, inner=inner) or inner or DenseAttention()
    wrap_tokens(model, TokenSharder(dims.mesh["cp"], dims.mesh["tp"]), core)


def parallelize_dit(model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> nn.Module:
    """Apply `dims` (mesh built) to `model` in place (and return it). Training and sampling both come here; with
    `opts.inference` (sampling) it stops after step 2: no recompute / offload, no FSDP (one data stream)."""
    opts = opts or ParallelizeOptions()
    dims.validate_for(model.config.num_heads, None, model.config.mlp_hidden)
    opts.check_layout(dims)
    inner = attention_core(model, opts)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh["tp"])
    if dims.tp > 1 or dims.cp > 1:
        apply_context_parallel(model, dims, inner)
    elif inner is not None:  # one process (or data parallel only): the blocks run the core directly
        for block in dit_blocks(model):
            block.attn_core = inner
    if opts.inference:
        return model
    apply_activation_memory(model, opts.memory)  # 3. recompute, then offload
    if opts.compile:  # 4.
        for block in dit_blocks(model):
            block.compile()
    if _uses_fsdp(dims) and opts.zero_engine == "fsdp2":
        apply_fsdp(model, dims, opts)
    elif dims.tp > 1:
        reduce_partial_grads(model)
    return model


__all__ = ["ParallelizeOptions", "apply_context_parallel", "apply_fsdp", "attention_core", "parallelize_dit"]
