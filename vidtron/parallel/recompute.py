"""Activation recompute of a model's blocks, applied from outside without renaming a parameter.

Which modules are the blocks and their regions is the model's (the DiT's: vidtron/models/dit/sharding.py). DiT
block indices count the dual-stream blocks first (0 .. n_double - 1), then the single-stream ones; a block spec
(`memory.recompute_blocks`, `memory.offload_blocks`) is "all", "double", "single", "" / "none", or indices and
inclusive ranges joined by "," or "+" ("0-3,7", "double+50-59"; "+" needs no quoting in Hydra overrides).

Policies (`memory.recompute`):
- full: a chosen block's forward runs under non-reentrant `torch.utils.checkpoint`; only its inputs stay saved
  and backward re-runs the whole block.
- selective, `memory.selective=attn`: the q/k/v projections (with qk-norm) and the attention core of the block are
  each recomputed; the core's inputs are the q/k/v that the projections recompute, so the block keeps only the
  modulated inputs of the projections (saved anyway by the MLP / output side).
- selective, `memory.selective=mlp`: the dual-stream MLPs (fc1 -> gelu -> fc2) keep only their input. The single-
  stream block's MLP (`mlp_in` + an inline gelu) has no module boundary to recompute, so it is left as is there.

How: a module's `forward` is replaced on the instance (not the class) by a checkpointed call of the original bound
forward, so module paths and state-dict keys stay the same (torch's `checkpoint_wrapper` would insert
`_checkpoint_wrapped_module.`), and hooks on the module (FSDP2, TP, CP token sharding) run once around it, outside
the checkpoint. The attention core may be one instance shared by every block (context_wrap.py), so it is wrapped per
block in a parameter-free `RecomputedCore` instead. Apply after TP/SP and CP, before compile and FSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidtron.errors import ConfigError

RECOMPUTE_MODES = ("none", "selective", "full")
SELECTIVE_REGIONS = ("attn", "mlp")

Regions = dict[str, dict[str, tuple[str, ...]]]  # block class name -> region -> child modules it recomputes


def select_blocks(spec: str, groups: dict[str, int], field: str = "memory.recompute_blocks") -> set[int]:
    """Parse a block spec into a set of block indices. `groups` names the model's block kinds in index order with
    their counts (e.g. {"double": 20, "single": 40}); a group's name selects all its blocks, "all" every block."""
    total, named, start = sum(groups.values()), {}, 0
    for name, count in groups.items():
        named[name], start = range(start, start + count), start + count
    named["all"] = range(total)
    chosen: set[int] = set()
    for part in (p.strip() for p in str(spec).replace("+", ",").split(",")):
        if part in ("", "none"):
            continue
        if part in named:
            chosen.update(named[part])
            continue
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not dash)):
            raise ConfigError(field, spec, f"use {', '.join(named)}, none, or indices / ranges such as 0-3,7")
        first, last = int(lo), int(hi or lo)
        if not first <= last < total:
            counts = " + ".join(f"{n} {k}" for k, n in groups.items())
            raise ConfigError(field, spec, f"block indices run from 0 to {total - 1} ({counts})")
        chosen.update(range(first, last + 1))
    return chosen


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Recompute `module` in backward: its instance `forward` becomes a non-reentrant checkpoint of the original.
    Idempotent; parameter names are untouched."""
    if getattr(module, "_vidtron_recompute", False):
        return module
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    module._vidtron_recompute = True
    return module


class RecomputedCore(nn.Module):
    """A parameter-free attention core recomputed in backward (the core `inner` may be shared between blocks)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        if any(True for _ in inner.parameters()) or any(True for _ in inner.buffers()):
            raise ValueError("RecomputedCore expects a parameter-free attention core (state-dict keys would change)")
        self.inner = inner

    def forward(
        self, q_BNLDh: torch.Tensor, k_BNLDh: torch.Tensor, v_BNLDh: torch.Tensor, text_mask_BT: torch.Tensor | None
    ) -> torch.Tensor:
        return checkpoint(self.inner, q_BNLDh, k_BNLDh, v_BNLDh, text_mask_BT, use_reentrant=False)


def recompute_region(block: nn.Module, region: str, regions: Regions) -> None:
    """Selective recompute of one region of a block, from the model's `regions` table; "attn" also recomputes the
    block's attention core (its `attn_core` seam)."""
    kind = type(block).__name__
    table = next((regions[k] for k in regions if k == kind or kind.endswith(k)), None)  # FSDP renames the class
    if table is None:
        raise ValueError(f"selective recompute knows {sorted(regions)}, not {kind}")
    for name in table[region]:
        checkpoint_module(getattr(block, name))
    if region == "attn" and not isinstance(block.attn_core, RecomputedCore):
        block.attn_core = RecomputedCore(block.attn_core)


def apply_recompute(blocks: list[nn.Module], chosen: list[int], mode: str, selective: str, regions: Regions) -> None:
    """Apply recompute `mode` (none | selective | full) to `blocks[i]` for i in `chosen`."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError("memory.recompute", mode, f"choose one of {list(RECOMPUTE_MODES)}")
    if selective not in SELECTIVE_REGIONS:
        raise ConfigError("memory.selective", selective, f"choose one of {list(SELECTIVE_REGIONS)}")
    if mode == "none":
        return
    for i in chosen:
        if mode == "full":
            checkpoint_module(blocks[i])
        else:
            recompute_region(blocks[i], selective, regions)
