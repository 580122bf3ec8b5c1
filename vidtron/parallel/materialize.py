"""Materialise a model built on the meta device after its layout is applied: only the local shards are allocated.

Build on meta -> TP / CP / FSDP from outside -> `materialize(model, device, init_full)`. Each parameter's FULL
tensor is computed by `init_full(name, shape)` one at a time (so peak host memory is the local shards plus the
largest single parameter, not the model), and this rank copies its own slice of it: the slice a DTensor's
placements give it (TP column / row shards, FSDP2's Shard(0) over the data-parallel mesh, replicas), or the whole
tensor for a plain parameter. Since the full tensor does not depend on the layout, every layout starts from exactly
the weights one rank would have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

InitFull = Callable[[str, torch.Size], torch.Tensor]  # (parameter name, full shape) -> full fp32 tensor on CPU


def local_slices(t: DTensor) -> tuple[slice, ...]:
    """The slices of the full tensor that this rank's local shard of `t` holds."""
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `param` (a DTensor's local shard, or a plain tensor whole)."""
    if isinstance(param, DTensor):
        local = param.to_local()
        local.copy_(full[local_slices(param)].reshape(local.shape))
    else:
        param.copy_(full)


def materialize(model: nn.Module, device: torch.device | str, init_full: InitFull) -> nn.Module:
    """Allocate `model`'s (meta) parameters and buffers on `device` and fill every parameter from `init_full`."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            copy_full_(param, init_full(name, param.shape).to(device=param.device, dtype=param.dtype))
    return model


def on_meta(model: nn.Module) -> bool:
    """True when any parameter of `model` still lives on the meta device."""
    return any(p.is_meta for p in model.parameters())
