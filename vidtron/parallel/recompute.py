"""Activation recompute for the DiT's blocks, applied from outside without renaming a parameter.

Block indices count the dual-stream blocks first (0 .. n_double - 1), then the single-stream ones; a block spec
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

from vidtron.platform.errors import ConfigError

RECOMPUTE_MODES = ("none", "selective", "full")
SELECTIVE_REGIONS = ("attn", "mlp")

# block class name -> region -> child modules recomputed (the attention core is handled separately)
REGIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "DoubleStreamBlock": {"attn": ("img_attn", "txt_attn"), "mlp": ("img_mlp", "txt_mlp")},
    "SingleStreamBlock": {"attn": ("attn",), "mlp": ()},
}


def dit_blocks(model: nn.Module) -> list[nn.Module]:
    """The dual-stream then single-stream blocks, in block-index order."""
    return [*model.double_blocks, *model.single_blocks]


def select_blocks(spec: str, num_double: int, num_single: int, field: str = "memory.recompute_blocks") -> set[int]:
    """Parse a block spec (see the module doc) into a set of block indices."""
    total = num_double + num_single
    named = {"all": range(total), "double": range(num_double), "single": range(num_double, total)}
    chosen: set[int] = set()
    for part in (p.strip() for p in str(spec).replace("+", ",").split(",")):
        if part in ("", "none"):
            continue
        if part in named:
            chosen.update(named[part])
            continue
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not dash)):
            raise ConfigError(field, spec, "use all, double, single, none, or indices / ranges such as 0-3,7")
        first, last = int(lo), int(hi or lo)
        if not first <= last < total:
            raise ConfigError(
                field, spec, f"block indices run from 0 to {total - 1} ({num_double} dual + {num_single})"
            )
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


def recompute_region(block: nn.Module, region: str) -> None:
    """Selective recompute of one region (`attn` or `mlp`) of a dual- or single-stream block."""
    kind = type(block).__name__
    table = next((REGIONS[k] for k in REGIONS if k == kind or kind.endswith(k)), None)  # FSDP renames the class
    if table is None:
        raise ValueError(f"selective recompute knows {sorted(REGIONS)}, not {kind}")
    for name in table[region]:
        checkpoint_module(getattr(block, name))
    if region == "attn" and not isinstance(block.attn_core, RecomputedCore):
        block.attn_core = RecomputedCore(block.attn_core)


def apply_recompute(model: nn.Module, mode: str, blocks: str = "all", selective: str = "attn") -> list[int]:
    """Apply recompute `mode` (none | selective | full) to the blocks of `blocks`; returns the chosen indices."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError("memory.recompute", mode, f"choose one of {list(RECOMPUTE_MODES)}")
    if selective not in SELECTIVE_REGIONS:
        raise ConfigError("memory.selective", selective, f"choose one of {list(SELECTIVE_REGIONS)}")
    if mode == "none":
        return []
    chosen = sorted(select_blocks(blocks, len(model.double_blocks), len(model.single_blocks)))
    all_blocks = dit_blocks(model)
    for i in chosen:
        if mode == "full":
            checkpoint_module(all_blocks[i])
        else:
            recompute_region(all_blocks[i], selective)
    return chosen
