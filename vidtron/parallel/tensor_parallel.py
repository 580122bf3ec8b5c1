"""Tensor + sequence parallel mechanisms: the DTensor parallel styles a model's plan table is built from.

A model's own tables (which linear is column / row, where tokens are gathered) and the reasoning behind them live
beside it (vidtron/models/dit/sharding.py); this file names no model attribute. Styles: `col` (Replicate in ->
local [.., out/tp]), `row` (-> all-reduce -> replicated), `row_sp` (-> reduce-scatter -> token shard), `gather_tokens`
(token shard -> all tokens, kept a DTensor), `head_norm` (per-head norms on local heads), `ModulationParallel` (a
column-sharded modulation linear whose small output is all-gathered forward and reduce-scattered backward, for
vectors that multiply token shards), `ReplicateParallel` (parameters as TP-replicated DTensors, local tensors in and
out); plus `replicate_rest` and `reduce_partial_grads`.

Shape legend: B batch, L tokens, D model dim, tp the TP degree. "local" = this TP rank's piece.
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
    RowwiseParallel,
    SequenceParallel,
)

# Every rank builds the same full model from the run seed, as FSDP2 also assumes, so sharding slices the local
# copy instead of scattering rank 0's (saves one collective per parameter at start-up).
SRC_DATA_RANK = None


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
            replicated = DTensor.from_local(
                param.data, mesh, (Replicate(),), run_check=False
            )  # no comm: see SRC_DATA_RANK
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


def col() -> ParallelStyle:
    return ColwiseParallel()  # Replicate in -> local [.., out/tp]


def row_sp() -> ParallelStyle:
    return RowwiseParallel(output_layouts=Shard(1))  # local [.., in/tp] -> reduce-scatter -> local token shard


def row() -> ParallelStyle:
    return RowwiseParallel()  # local [.., in/tp] -> all-reduce -> replicated


def gather_tokens() -> ParallelStyle:
    """Token shard -> all tokens, kept as a DTensor so q, k, v share one gather and one reduce-scatter."""
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=False)


def head_norm() -> ParallelStyle:
    return SequenceParallel(sequence_dim=2, use_local_output=True)  # qk RMSNorm on [B, L, N/tp, Dh]


def modulation() -> ParallelStyle:
    return ModulationParallel()


# ---------------------------------------------------------------------------------------------------------------
# applying them
# ---------------------------------------------------------------------------------------------------------------
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
