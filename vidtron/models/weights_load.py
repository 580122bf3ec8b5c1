"""Streaming, sharded weight loading shared by the model folders (DiT, VAE): layout plans and the in-place fill.

A model folder describes each external layout as a `LayoutFn`: our tensor names and (global) shapes -> one
`TensorPlan` per tensor, saying which source tensors hold it. A plan is rows concatenated along dim 0 from pieces
of source tensors (a renamed tensor is one whole piece; a fused q;k;v is cut into three), optionally with its
columns (dim 1) permuted: ours[:, j] = source[:, cols[j]].

Loading (`load_weights`) fills the model IN PLACE, tensor by tensor: for each parameter / buffer it takes the box
of the global tensor this rank holds (a plain tensor: all of it; a DTensor, TP- or FSDP2-sharded: its local chunk,
from its placements and mesh coordinates) and reads only that box from the source: safetensors through
`safe_open(...).get_slice(name)[rows, cols]`, a torch file through `torch.load(weights_only=True, mmap=True)`
views. A fused source tensor is read only in the rows the piece covers; a permuted one only in the source columns
the local columns need. So a rank reads about what it holds, and memory peaks at one local tensor (plus its read
buffer), never the model. No collectives: every rank reads its own part of the same files.

Errors (before anything is written) are one `ConfigError(field, path, fix)` each: no such path, no weights in it,
an unrecognised layout, missing tensors, unexpected tensors, a shape mismatch. Loading never unpickles arbitrary
objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from vidtron.errors import ConfigError
from vidtron.models.weights_io import Box, TensorSource, open_source

_FEW = 3  # names shown in an error message


class Piece(NamedTuple):
    """`rows` rows of the source tensor `key` from row `start` (dim 0)."""

    key: str
    start: int
    rows: int


@dataclass(frozen=True)
class TensorPlan:
    """One of our tensors = its pieces concatenated along dim 0, then (if `cols` is given) columns permuted."""

    pieces: tuple[Piece, ...]
    cols: torch.Tensor | None = None  # [ours dim 1] source column of each of our columns

    @staticmethod
    def whole(key: str, shape: torch.Size) -> TensorPlan:
        """Our tensor is the source tensor `key`, as it is."""
        return TensorPlan((Piece(key, 0, shape[0] if len(shape) else 1),))


LayoutFn = Callable[[dict[str, torch.Size]], dict[str, TensorPlan]]  # our shapes -> plans


@dataclass
class InitReport:
    """What `load_weights` did on this rank."""

    path: str
    layout: str  # the detected layout ("vidtron", "diffusers", "hunyuan", "dcp")
    loaded: list[str]  # our tensors filled
    missing: list[str] = field(default_factory=list)  # ours left untouched (strict=False only)
    unexpected: list[str] = field(default_factory=list)  # source tensors not used (strict=False only)
    bytes_read: int = 0  # bytes of tensor data this rank read from the source
    materialized: bool = False  # the model was on the meta device and was materialized with to_empty


# ---------------------------------------------------------------------------------------------------------------
# reading one box of one of our tensors
# ---------------------------------------------------------------------------------------------------------------
def local_box(t: torch.Tensor) -> Box:
    """The box of the global tensor this rank holds: all of a plain tensor, the local chunk of a DTensor."""
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    else:
        shape, offset = t.shape, (0,) * t.dim()
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _runs(sorted_idx: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive values in a sorted 1-D index tensor."""
    breaks = (torch.nonzero(sorted_idx.diff() != 1).flatten() + 1).tolist()
    bounds = [0, *breaks, len(sorted_idx)]
    return [(int(sorted_idx[a]), int(sorted_idx[b - 1]) + 1) for a, b in zip(bounds, bounds[1:])]


def _read_columns(source: TensorSource, key: str, rows: slice, rest: Box, cols: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of source `key` at our columns `rest[0]` (source columns `cols[rest[0]]`): only the runs of
    source columns needed are read, then put in our order."""
    wanted = cols[rest[0]]
    unique, inverse = torch.unique(wanted, sorted=True, return_inverse=True)
    parts = [source.read(key, (rows, slice(a, b), *rest[1:])) for a, b in _runs(unique)]
    return torch.cat(parts, dim=1)[:, inverse]


def read_box(source: TensorSource, plan: TensorPlan, box: Box) -> torch.Tensor:
    """The box `box` of our tensor described by `plan`, read from `source` (only the source data it needs)."""
    if not box:
        return source.read(plan.pieces[0].key, ())
    rows, rest = box[0], box[1:]
    parts, at = [], 0
    for piece in plan.pieces:
        lo, hi = max(rows.start, at), min(rows.stop, at + piece.rows)
        if lo < hi:
            src_rows = slice(piece.start + lo - at, piece.start + hi - at)
            if plan.cols is None:
                parts.append(source.read(piece.key, (src_rows, *rest)))
            else:
                parts.append(_read_columns(source, piece.key, src_rows, rest, plan.cols))
        at += piece.rows
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------
def source_shapes(plans: dict[str, TensorPlan], ours: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The shape each source tensor must have for `plans` to fill tensors of shapes `ours` (a fused source:
    as many rows as its pieces reach)."""
    shapes: dict[str, torch.Size] = {}
    for name, plan in plans.items():
        shape = ours[name]
        for piece in plan.pieces:
            if not len(shape):
                shapes[piece.key] = torch.Size([])
                continue
            rows = max(shapes[piece.key][0] if piece.key in shapes else 0, piece.start + piece.rows)
            shapes[piece.key] = torch.Size([rows, *shape[1:]])
    return shapes


def check_match(
    field_name: str,
    path: str,
    want: dict[str, torch.Size],
    have: dict[str, torch.Size],
    strict: bool,
    layout: str,
) -> tuple[set[str], list[str]]:
    """Compare the tensors the model needs (`want`) with those found (`have`), both by source name. Raises a
    ConfigError for missing (strict), unexpected (strict) and mis-shaped tensors; returns (missing, unexpected)."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if strict and missing:
        fix = f"the {layout} weights lack {len(missing)} of the {len(want)} tensors this model needs, e.g. "
        raise ConfigError(field_name, path, fix + f"{missing[:_FEW]}; a different model? (strict=False loads the rest)")
    if strict and unexpected:
        fix = f"the {layout} weights hold {len(unexpected)} tensors this model has no place for, e.g. "
        raise ConfigError(field_name, path, fix + f"{unexpected[:_FEW]}; check the flavor and its overrides")
    wrong = sorted(k for k in set(want) & set(have) if tuple(want[k]) != tuple(have[k]))
    if wrong:
        k = wrong[0]
        fix = f"{k}: this model expects shape {tuple(want[k])}, the file holds {tuple(have[k])}"
        more = f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else ""
        raise ConfigError(field_name, path, fix + more + "; the weights are of a different model size or flavor")
    return set(missing), unexpected


def detect_layout(
    have: set[str], ours: dict[str, torch.Size], layouts: dict[str, LayoutFn], field_name: str, path: str
) -> tuple[str, dict[str, TensorPlan]]:
    """The layout whose plans use the most of the source's tensor names (a ConfigError when none uses any)."""
    best: tuple[int, str, dict[str, TensorPlan]] | None = None
    for name, layout_fn in layouts.items():
        plans = layout_fn(ours)
        score = len({p.key for plan in plans.values() for p in plan.pieces} & have)
        if best is None or score > best[0]:
            best = (score, name, plans)
    if best is None or best[0] == 0:
        fix = (
            f"an unrecognised layout: none of its {len(have)} tensors (e.g. {sorted(have)[:_FEW]}) is named as in "
            f"the {list(layouts)} layouts of this model"
        )
        raise ConfigError(field_name, path, fix)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------------------
# filling the model
# ---------------------------------------------------------------------------------------------------------------
def materialize(model: nn.Module, device: torch.device | str | None) -> bool:
    """If any parameter or buffer is on the meta device, allocate them all on `device` (uninitialised:
    `to_empty`); returns whether it did. Non-persistent buffers are the caller's to fill afterwards."""
    if not any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        return False
    if device is None:
        raise ValueError("the model is on the meta device: pass device= to materialize it before loading")
    model.to_empty(device=device)
    return True


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (DTensors as they are, with global shapes)."""
    return model.state_dict(keep_vars=True)


def fill(targets: dict[str, torch.Tensor], plans: dict[str, TensorPlan], source: TensorSource) -> list[str]:
    """Copy each target's local box from `source`, in place (under no_grad); returns the names filled."""
    for name, t in targets.items():
        box = local_box(t)
        local = t.to_local() if isinstance(t, DTensor) else t
        if tuple(local.shape) != tuple(b.stop - b.start for b in box):
            raise RuntimeError(f"{name}: local shape {tuple(local.shape)} does not match its box {box}")
        if local.numel():
            with torch.no_grad():
                local.copy_(read_box(source, plans[name], box))
    return list(targets)


def _skipped(targets: dict, plans: dict[str, TensorPlan], missing: set[str], strict: bool, where: tuple) -> set[str]:
    """Our tensors that cannot be filled: no plan in this layout, or a source tensor missing."""
    unplanned = sorted(set(targets) - set(plans))
    if strict and unplanned:
        field_name, path, layout = where
        fix = f"this model has {len(unplanned)} tensors the {layout} layout has no name for, e.g. {unplanned[:_FEW]}"
        raise ConfigError(field_name, path, fix)
    return set(unplanned) | {k for k in plans if k in targets and any(p.key in missing for p in plans[k].pieces)}


def _plan(
    model: nn.Module, source: TensorSource, layouts: dict[str, LayoutFn], field_name: str, path: str, strict: bool
) -> tuple[str, dict[str, TensorPlan], set[str], list[str]]:
    """Every check, from names and shapes only: (layout, plans, our tensors to skip, unexpected source tensors)."""
    have = source.shapes()
    ours = {k: t.shape for k, t in model_tensors(model).items()}
    layout, plans = detect_layout(set(have), ours, layouts, field_name, path)
    missing, unexpected = check_match(field_name, path, source_shapes(plans, ours), have, strict, layout)
    return layout, plans, _skipped(ours, plans, missing, strict, (field_name, path, layout)), unexpected


def check_weights(
    model: nn.Module, path: str | Path, layouts: dict[str, LayoutFn], *, field_name: str, strict: bool = True
) -> InitReport:
    """The checks of `load_weights` alone, reading only names and shapes (file headers): nothing is written and
    `model` may be on the meta device, so a launcher can refuse bad weights before starting any process."""
    with open_source(path, field_name) as source:
        layout, _, skip, unexpected = _plan(model, source, layouts, field_name, str(path), strict)
        return InitReport(str(path), layout, [], sorted(skip), unexpected)


def load_weights(
    model: nn.Module,
    path: str | Path,
    layouts: dict[str, LayoutFn],
    *,
    field_name: str,
    strict: bool = True,
    device: torch.device | str | None = None,
) -> InitReport:
    """Fill `model`'s parameters and persistent buffers in place from `path`, in whichever of `layouts` its
    tensor names follow. `model` may be plain, TP / FSDP2-sharded (DTensors: each rank reads its local chunks) or
    on the meta device (materialized on `device` first). `strict=False` leaves tensors the source lacks as they
    are (uninitialised after materializing: the caller initialises them) and ignores extra source tensors (both
    listed in the report); shapes must always match. Every check runs before the first tensor is written. Call it
    before the first forward (FSDP2 parameters sharded)."""
    with open_source(path, field_name) as source:
        layout, plans, skip, unexpected = _plan(model, source, layouts, field_name, str(path), strict)
        materialized = materialize(model, device)
        targets = {k: t for k, t in model_tensors(model).items() if k not in skip}
        loaded = fill(targets, plans, source)
        return InitReport(str(path), layout, loaded, sorted(skip), unexpected, source.bytes_read, materialized)
