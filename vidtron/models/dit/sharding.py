"""The DiT's sharding, beside the model: TP/SP plan tables, the CP/SP token hooks, recompute regions, block groups.

parallelize.py applies these in its fixed order; the mechanisms (DTensor styles, token sharder, CP cores,
recompute, offload) are in vidtron/parallel/ and name no DiT attribute.

## TP / SP plans (small tables of DTensor parallel styles per block type)

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
(text padded to a multiple of tp; see vidtron/parallel/context_wrap.py for the token layout). Entering a TP region all-gathers each
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

Image-to-video: the blocks' optional sixth argument (`FirstFrame`) holds a per-video-token mask; the first block's
hook shards it exactly like the video (`TokenSharder.shard_like_video`) and every block gets that rank's copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from vidtron.parallel import tensor_parallel as tpx
from vidtron.parallel.context_wrap import SequencePaddedCore, TokenSharder
from vidtron.parallel.offload import ActivationOffloader
from vidtron.parallel.offload import apply_offload as offload_blocks
from vidtron.parallel.recompute import Regions, select_blocks
from vidtron.parallel.recompute import apply_recompute as recompute_blocks

# ---------------------------------------------------------------------------------------------------------------
# blocks: index order, groups, recompute regions
# ---------------------------------------------------------------------------------------------------------------
REGIONS: Regions = {
    "DoubleStreamBlock": {"attn": ("img_attn", "txt_attn"), "mlp": ("img_mlp", "txt_mlp")},
    "SingleStreamBlock": {"attn": ("attn",), "mlp": ()},
}


def dit_blocks(model: nn.Module) -> list[nn.Module]:
    """The dual-stream then single-stream blocks, in block-index order."""
    return [*model.double_blocks, *model.single_blocks]


def select_dit_blocks(spec: str, num_double: int, num_single: int, field: str = "memory.recompute_blocks") -> set[int]:
    """A block spec ("all", "double", "single", "none", "0-3+7") over [dual-stream; single-stream] indices."""
    return select_blocks(spec, {"double": num_double, "single": num_single}, field)


def apply_recompute(model: nn.Module, mode: str, blocks: str = "all", selective: str = "attn") -> list[int]:
    """Recompute `mode` (none | selective | full) on the DiT blocks of spec `blocks`; returns the chosen indices."""
    nd, ns = len(model.double_blocks), len(model.single_blocks)
    chosen = sorted(select_dit_blocks(blocks, nd, ns)) if mode != "none" else []
    recompute_blocks(dit_blocks(model), chosen, mode, selective, REGIONS)
    return chosen


def apply_offload(
    model: nn.Module, blocks: str, device=None, prefetch: bool = True, min_bytes: int = 1024
) -> ActivationOffloader | None:
    """Offload the saved activations of the DiT blocks of spec `blocks`; None when the spec is empty."""
    nd, ns = len(model.double_blocks), len(model.single_blocks)
    chosen = sorted(select_dit_blocks(blocks, nd, ns, "memory.offload_blocks"))
    return offload_blocks(dit_blocks(model), chosen, device, prefetch=prefetch, min_bytes=min_bytes)


def apply_activation_memory(model: nn.Module, memory, device: torch.device | str | None = None):
    """Step 3 of parallelize_dit: recompute, then offload (outermost, so a recomputed block's inputs are offloaded).
    `memory` is a MemoryConfig; returns the ActivationOffloader (or None)."""
    apply_recompute(model, memory.recompute, memory.recompute_blocks, memory.selective)
    return apply_offload(model, memory.offload_blocks, device)


# ---------------------------------------------------------------------------------------------------------------
# TP / SP plans: module path inside one block -> style
# ---------------------------------------------------------------------------------------------------------------
def _attention_plan(prefix: str, out: bool) -> dict[str, ParallelStyle]:
    plan = {f"{prefix}.{n}": tpx.col() for n in ("q", "k", "v")}
    plan |= {f"{prefix}.q_norm": tpx.head_norm(), f"{prefix}.k_norm": tpx.head_norm()}
    if out:
        plan[f"{prefix}.o"] = tpx.row_sp()
    return plan


def _sp_mlp_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {prefix: tpx.gather_tokens(), f"{prefix}.fc1": tpx.col(), f"{prefix}.fc2": tpx.row_sp()}


def double_block_plan() -> dict[str, ParallelStyle]:
    """Dual-stream block: per stream, gather tokens -> q/k/v colwise -> joint attention -> o rowwise -> reduce-
    scatter; gather -> fc1 colwise -> fc2 rowwise -> reduce-scatter. Modulation replicated (gradient reduced)."""
    plan: dict[str, ParallelStyle] = {}
    for stream in ("img", "txt"):
        plan[f"{stream}_attn"] = tpx.gather_tokens()
        plan |= _attention_plan(f"{stream}_attn", out=True)
        plan |= _sp_mlp_plan(f"{stream}_mlp")
        plan[f"{stream}_mod"] = tpx.modulation()
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
        "mlp_in": tpx.col(),
        "out": RowwiseParallel(output_layouts=Partial(), use_local_output=False),
        "split": PrepareModuleOutput(
            output_layouts=(Partial(), Partial()),
            desired_output_layouts=(Shard(1), Shard(1)),
            use_local_output=True,
        ),
        "mod": tpx.modulation(),
    }


def refiner_block_plan() -> dict[str, ParallelStyle]:
    """Refiner block (replicated text, no SP): q/k/v colwise from one replicated input, o rowwise; fc1 colwise,
    fc2 rowwise (all-reduce). Norms and gates are replicated by `replicate_rest`."""
    return {
        "attn": PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        "attn.q": tpx.col(),
        "attn.k": tpx.col(),
        "attn.v": tpx.col(),
        "attn.o": tpx.row(),
        "mlp.fc1": tpx.col(),
        "mlp.fc2": tpx.row(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Apply the block plans to every dual, single and refiner block of a DiT, then replicate the rest."""
    for block in model.double_blocks:
        parallelize_module(block, tp_mesh, double_block_plan(), src_data_rank=tpx.SRC_DATA_RANK)
    for block in model.single_blocks:
        parallelize_module(block, tp_mesh, single_block_plan(), src_data_rank=tpx.SRC_DATA_RANK)
    for block in model.text_refiner.blocks:
        parallelize_module(block, tp_mesh, refiner_block_plan(), src_data_rank=tpx.SRC_DATA_RANK)
    tpx.replicate_rest(model, tp_mesh)


# ---------------------------------------------------------------------------------------------------------------
# CP / SP token hooks
# ---------------------------------------------------------------------------------------------------------------
def wrap_tokens(model: nn.Module, sharder: TokenSharder, core: nn.Module) -> None:
    """Install the hooks (see the module doc) and `SequencePaddedCore(core)` as every block's attn_core."""
    blocks = [*model.double_blocks, *model.single_blocks]
    if not blocks:
        raise ValueError("context / sequence parallelism needs at least one dual- or single-stream block")
    lay = sharder.layout
    padded = SequencePaddedCore(core, lay)  # one shared, parameter-free instance

    first_local: list = []  # image-to-video: this rank's FirstFrame (its mask sharded like the video), per batch

    def enter(module, args):  # (img, txt, cond, rope, text_mask[, first]) of the first block
        img, txt, cond, rope, mask, *first = args
        img, txt = sharder.enter(img, txt, rope, mask)
        first_local[:] = [f._replace(mask_BV1=sharder.shard_like_video(f.mask_BV1)) for f in first]
        return img, txt, cond, lay.rope, lay.text_mask, *first_local

    def swap(module, args):
        img, txt, cond, *_ = args
        return img, txt, cond, lay.rope, lay.text_mask, *first_local[: len(args) - 5]

    def leave(module, args):  # (img, cond) of the final layer
        return sharder.exit(args[0]), *args[1:]

    for i, block in enumerate(blocks):
        block.attn_core = padded
        block.register_forward_pre_hook(enter if i == 0 else swap)
    model.final_layer.register_forward_pre_hook(leave)
