"""Tensor + sequence parallel plans for the DiT, as small tables of DTensor parallel styles per block type.

Shape legend: B batch, V video tokens, T text tokens, L = V + T, D model dim, N heads, Dh head dim, M MLP hidden,
tp the TP degree. "local" = this TP rank's piece.

TP (Megatron column / row pairs): q, k, v and the MLP's first linear are column-parallel (each rank computes N/tp
whole heads and M/tp hidden features), the attention output and the MLP's second linear are row-parallel (partial
sums over the local heads / hidden, then reduced). qk RMSNorm is per head, so it runs on the local heads with no
communication (`SequenceParallel(sequence_dim=2)`: its weight is replicated, its gradient reduced). The
single-stream block's output linear takes [attention, MLP hidden] in the interleaved column order of
`blocks.interleave_attn_mlp`, so it is one ordinary row-parallel linear whose contiguous column shard matches the
local heads and local MLP features for every tp that divides N and M.

SP (between the TP regions of the dual- and single-stream blocks): the residual streams, the LayerNorms, the adaLN
modulation and the gated residual adds work on a token shard `[B, L_s/tp, D]` of each stream, video AND text
(text padded to a multiple of tp; see context_wrap.py for the token layout). Entering a TP region all-gathers each
stream's tokens (`PrepareModuleInput` Shard(1) -> Replicate); leaving it reduce-scatters (`RowwiseParallel` with
`output_layouts=Shard(1)`), so SP costs the same bytes as plain TP's all-reduce. The single-stream block gathers /
reduce-scatters at its `join` / `split` seams, one collective per stream, keeping [video; text] order.

Gradient conventions (what makes the pieces compose):
- an activation replicated over TP has its FULL gradient on every TP rank; a token-sharded one the full gradient of
  its own tokens (DTensor's redistribute semantics);
- a modulation vector `[B, k*D]` is replicated but multiplies token shards, so each rank's gradient of it is a
  partial sum: `ModulationParallel` keeps the modulation weight column-sharded, all-gathers the small vector in
  forward and reduce-scatters its partial gradient in backward (never the weight's gradient);
- every other parameter outside the TP linears (patch embedding, conditioning MLPs, refiner norms and gates, final
  layer) becomes a TP-replicated DTensor with local tensors in and out (`ReplicateParallel`), so the optimizer,
  gradient clipping, FSDP2 and DCP see one kind of parameter on one mesh.

The token refiner runs on the full (replicated) text: plain TP, no SP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

# Every rank builds the same full model from the run seed (DiTTextToVideo.build_model), as FSDP2 also assumes, so
# sharding slices the local copy instead of scattering rank 0's (saves one collective per parameter at start-up).
_SRC = None


# ---------------------------------------------------------------------------------------------------------------
# styles
# ---------------------------------------------------------------------------------------------------------------
class ReplicateParallel(ParallelStyle):
    """Parameters become TP-replicated DTensors; tensor inputs are taken as replicated, outputs come back local.
    For modules computed in full on every TP rank (embeddings, refiner norms and gates, the final layer): their
    gradients are already full on every rank."""

    @staticmethod
    def _prepare_input(module, inputs, mesh):
        return tuple(
            DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    @staticmethod
    def _prepare_output(module, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for p_name, param in list(module.named_parameters(recurse=False)):
            replicated = DTensor.from_local(param.data, mesh, (Replicate(),), run_check=False)  # no comm: see _SRC
            module.register_parameter(p_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate_params, self._prepare_input, self._prepare_output)


class ModulationParallel(ColwiseParallel):
    """An adaLN modulation linear `[B, D] -> [B, k*D]` whose output multiplies token shards (SP).

    Column-parallel weight (each rank stores k*D/tp output features); forward all-gathers the small `[B, k*D]`
    vector; backward takes the gradient as Partial (each rank saw only its tokens) and reduce-scatters it, which
    sums the token shards' contributions and keeps this rank's features in one collective."""

    def __init__(self):
        super().__init__(output_layouts=Replicate(), use_local_output=True)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        outputs = outputs.redistribute(placements=output_layouts)  # Shard(-1) -> Replicate: all-gather
        return outputs.to_local(grad_placements=(Partial(),))


def _col() -> ParallelStyle:
    return ColwiseParallel()  # Replicate in -> local [.., out/tp]


def _row_sp() -> ParallelStyle:
    return RowwiseParallel(output_layouts=Shard(1))  # local [.., in/tp] -> reduce-scatter -> local token shard


def _row() -> ParallelStyle:
    return RowwiseParallel()  # local [.., in/tp] -> all-reduce -> replicated


def _gather_tokens() -> ParallelStyle:
    """Token shard -> all tokens, kept as a DTensor so q, k, v share one gather and one reduce-scatter."""
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=False)


def _head_norm() -> ParallelStyle:
    return SequenceParallel(sequence_dim=2, use_local_output=True)  # qk RMSNorm on [B, L, N/tp, Dh]


def _modulation() -> ParallelStyle:
    return ModulationParallel()


# ---------------------------------------------------------------------------------------------------------------
# the plans: module path inside one block -> style
# ---------------------------------------------------------------------------------------------------------------
def _attention_plan(prefix: str, out: bool) -> dict[str, ParallelStyle]:
    plan = {f"{prefix}.{n}": _col() for n in ("q", "k", "v")}
    plan |= {f"{prefix}.q_norm": _head_norm(), f"{prefix}.k_norm": _head_norm()}
    if out:
        plan[f"{prefix}.o"] = _row_sp()
    return plan


def _sp_mlp_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {prefix: _gather_tokens(), f"{prefix}.fc1": _col(), f"{prefix}.fc2": _row_sp()}


def double_block_plan() -> dict[str, ParallelStyle]:
    """Dual-stream block: per stream, gather tokens -> q/k/v colwise -> joint attention -> o rowwise -> reduce-
    scatter; gather -> fc1 colwise -> fc2 rowwise -> reduce-scatter. Modulation replicated (gradient reduced)."""
    plan: dict[str, ParallelStyle] = {}
    for stream in ("img", "txt"):
        plan[f"{stream}_attn"] = _gather_tokens()
        plan |= _attention_plan(f"{stream}_attn", out=True)
        plan |= _sp_mlp_plan(f"{stream}_mlp")
        plan[f"{stream}_mod"] = _modulation()
    return plan


def single_block_plan() -> dict[str, ParallelStyle]:
    """Single-stream block: join gathers both streams' tokens ([video; text], one all-gather each); q/k/v and
    mlp_in colwise; out rowwise over the interleaved [attention, MLP] columns, left as partial sums; split
    reduce-scatters each stream back to its token shard."""
    return {
        "join": PrepareModuleInput(
            input_layouts=(Shard(1), Shard(1)),
            desired_input_layouts=(Replicate(), Replicate()),
            use_local_output=False,
        ),
        **_attention_plan("attn", out=False),
        "mlp_in": _col(),
        "out": RowwiseParallel(output_layouts=Partial(), use_local_output=False),
        "split": PrepareModuleOutput(
            output_layouts=(Partial(), Partial()),
            desired_output_layouts=(Shard(1), Shard(1)),
            use_local_output=True,
        ),
        "mod": _modulation(),
    }


def refiner_block_plan() -> dict[str, ParallelStyle]:
    """Refiner block (replicated text, no SP): q/k/v colwise from one replicated input, o rowwise; fc1 colwise,
    fc2 rowwise (all-reduce). Norms and gates are replicated by `replicate_rest`."""
    return {
        "attn": PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        "attn.q": _col(),
        "attn.k": _col(),
        "attn.v": _col(),
        "attn.o": _row(),
        "mlp.fc1": _col(),
        "mlp.fc2": _row(),
    }


# ---------------------------------------------------------------------------------------------------------------
# applying them
# ---------------------------------------------------------------------------------------------------------------
def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Apply the block plans to every dual, single and refiner block of a DiT, then replicate the rest."""
    for block in model.double_blocks:
        parallelize_module(block, tp_mesh, double_block_plan(), src_data_rank=_SRC)
    for block in model.single_blocks:
        parallelize_module(block, tp_mesh, single_block_plan(), src_data_rank=_SRC)
    for block in model.text_refiner.blocks:
        parallelize_module(block, tp_mesh, refiner_block_plan(), src_data_rank=_SRC)
    replicate_rest(model, tp_mesh)


def replicate_rest(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Every module that still owns plain (non-DTensor) parameters gets `ReplicateParallel`."""
    for module in list(model.modules()):
        own = list(module.parameters(recurse=False))
        if own and not any(isinstance(p, DTensor) for p in own):
            ReplicateParallel()._apply(module, tp_mesh)


def reduce_partial_grads(model: nn.Module) -> None:
    """Without FSDP (which does this itself), turn Partial parameter gradients (the per-head qk norms) into the
    parameter's own placement as soon as they are accumulated: one all-reduce of Dh floats each, in backward.

    The gradient hooks are registered at the first forward, not now: moving the module (`model.to(device)`) swaps
    DTensor parameters (torch.utils.swap_tensors) and that drops tensor hooks."""

    def reduce(param: torch.Tensor) -> None:
        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
            param.grad = param.grad.redistribute(placements=param.placements)

    def register_once(module, args) -> None:
        for p in module.parameters():
            if isinstance(p, DTensor) and any(isinstance(pl, Replicate) for pl in p.placements):
                p.register_post_accumulate_grad_hook(reduce)
        handle.remove()

    handle = model.register_forward_pre_hook(register_once)
