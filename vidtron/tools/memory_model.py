"""Analytic per-rank memory of DiT training for a layout and an activation policy (validated against
memory_accounting.py on CPU; used by `vidtron-plan`).

Shape legend: B batch per data-parallel rank, V video tokens (latent F/pt * H/p * W/p), T text tokens, Vc = ceil(V /
cp) this CP rank's video chunk, D model dim, M MLP hidden, N heads, tp / cp / S = dp_shard * cp the TP, CP and FSDP
shard degrees, s bytes per activation element.

Activations: each block's saved tensors are listed item by item (name, bytes), from what autograd saves in
`vidtron/models/dit/blocks.py` under the TP/SP plans (`tensor_parallel.py`) and the CP token layout
(`context_wrap.py`). A tensor lives in one of three token layouts:
  res  the residual stream between TP regions, token-sharded by SP: [B, X/tp, D] (X = Vc or T, padded to tp)
  gat  the all-gathered input of a TP region: [B, X, D]
  loc  inside a TP region: all tokens, features split by tp: [B, X, D/tp] or [B, X, M/tp]
and the attention core saves q, k, v, out (+ an fp32 log-sum-exp) in its own layout (ring: the CP chunk with local
heads; Ulysses: all video tokens with heads / (tp * ulysses)). Policies drop items: full recompute keeps the block
inputs only; selective attn drops the q/k norm tensors and the core's saves but keeps its q/k/v inputs; selective
mlp drops the dual-stream MLP hidden. Offloaded blocks move every item of >= `min_bytes` to host memory.

Model states (FSDP2): fp32 master params, fp32 gradients and AdamW's two fp32 moments, sharded over S with dim-0
padding (ZeRO-3 and 2; ZeRO-1 behaves as 2 under FSDP2); TP splits the column / row linears of the blocks and the
refiner as their plans in tensor_parallel.py say. Buffers: unsharded params (param_dtype) of two blocks (ZeRO-3:
current + prefetch) or of every block (ZeRO-2: kept from forward to backward), the unsharded gradient of two blocks
before reduce-scatter (fp32), CP ring K/V double buffers. Working memory: one block's full activations rematerialized in backward (recompute) or copied
back (offload, plus the prefetched next), and gradient buffers of the block being differentiated.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from vidtron.models.dit.configs import DiTConfig
from vidtron.models.dit.sharding import select_dit_blocks as select_blocks

GIB = 1024**3
VAE_STRIDE = (4, 8, 8)  # causal VAE compression (t, h, w); frames 4k+1 -> k+1 latent frames


@dataclass(frozen=True)
class Layout:
    """A 5D layout (see ParallelDims) plus the ZeRO stage."""

    tp: int = 1
    cp: int = 1
    cp_mode: str = "ring"  # ring | ulysses | usp
    ulysses: int = 1  # Ulysses degree inside CP (cp for ulysses, 1 for ring)
    dp_shard: int = 1
    dp_replicate: int = 1
    zero_stage: int = 3

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp_shard * self.dp_replicate

    @property
    def shard(self) -> int:
        """FSDP shard degree: dp_shard x cp (CP ranks hold the same parameters)."""
        return self.dp_shard * self.cp

    @property
    def name(self) -> str:
        mode = {"ring": "r", "ulysses": "u", "usp": f"s{self.ulysses}"}[self.cp_mode] if self.cp > 1 else ""
        cp = f"cp{self.cp}{mode}"
        return f"tp{self.tp}-{cp}-fs{self.dp_shard}-dr{self.dp_replicate}-z{self.zero_stage}"


@dataclass(frozen=True)
class Policy:
    """Activation policy, as in MemoryConfig."""

    recompute: str = "none"  # none | selective | full
    selective: str = "attn"  # attn | mlp
    recompute_blocks: str = "all"
    offload_blocks: str = ""

    @property
    def name(self) -> str:
        rc = {"none": "-", "selective": f"sel-{self.selective}", "full": "full"}[self.recompute]
        if self.recompute != "none" and self.recompute_blocks != "all":
            rc += f"[{self.recompute_blocks}]"
        return rc + (f" off[{self.offload_blocks}]" if self.offload_blocks else "")


@dataclass(frozen=True)
class Workload:
    """What one data-parallel rank processes per step, and the dtypes."""

    video_grid: tuple[int, int, int]  # latent (F, H, W) of one clip
    text_tokens: int = 256
    batch: int = 1  # clips per data-parallel rank
    act_bytes: int = 2  # activation dtype (bf16 via FSDP2 param_dtype); 4 for fp32
    param_bytes: int = 2  # FSDP2 param_dtype of the unsharded (all-gathered) parameters
    min_offload_bytes: int = 1024  # ActivationOffloader.min_bytes


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a pixel clip after the 4x8x8 causal VAE."""
    return ((frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1], width // VAE_STRIDE[2])


def video_tokens(cfg: DiTConfig, grid: tuple[int, int, int]) -> int:
    return math.prod(n // p for n, p in zip(grid, cfg.patch))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Tokens:
    """Token counts of one rank under a layout (see context_wrap.py)."""

    B: int
    V: int  # all video tokens
    Vc: int  # this CP rank's video chunk, padded to tp (gathered count in TP regions)
    T: int  # text tokens, padded to tp
    attn_tokens: int  # tokens of the core's saved q/k/v/out
    attn_heads_div: int  # the core's heads are N / attn_heads_div
    out_is_view: bool  # B == 1 with the dense core: the output projection's input views the core's output
    cp: int = 1


def layout_tokens(cfg: DiTConfig, w: Workload, lay: Layout) -> Tokens:
    V = video_tokens(cfg, w.video_grid)
    chunk = _ceil(V, lay.cp)  # CP chunk (the cores see it without the SP padding)
    T = lay.tp * _ceil(w.text_tokens, lay.tp)
    # ring: q/k/v/out of the chunk + text with local heads; Ulysses (and USP's inner Ulysses): u chunks, heads / u
    return Tokens(
        B=w.batch,
        V=V,
        Vc=lay.tp * _ceil(chunk, lay.tp),
        T=T,
        attn_tokens=lay.ulysses * chunk + T,
        attn_heads_div=lay.tp * lay.ulysses,
        out_is_view=w.batch == 1 and lay.cp == 1,
        cp=lay.cp,
    )


def _rms(name: str, n: int, cfg: DiTConfig, tp: int) -> list[tuple[str, int]]:
    """q or k RMSNorm on [B, X, N/tp, Dh]: 8 bytes per element in fp32 and in bf16 (input, fp32 copy, output),
    plus the fp32 rsqrt per head."""
    return [(name, 8 * n * cfg.hidden_size // tp), (name + ".rsqrt", 4 * n * cfg.num_heads // tp)]


def _attention_items(cfg: DiTConfig, tok: Tokens, s: int) -> list[tuple[str, int]]:
    n = tok.B * tok.attn_tokens
    D = cfg.hidden_size // tok.attn_heads_div
    lse = 4 * n * cfg.num_heads // tok.attn_heads_div
    return [("core.qkv", 3 * s * n * D), ("core.out", s * n * D), ("core.lse", lse), ("core.mask", s * tok.B * tok.T)]


def _stream_items(cfg: DiTConfig, X: int, tok: Tokens, s: int, tp: int) -> list[tuple[str, int]]:
    """One stream (X tokens) of a dual-stream block, outside the attention core."""
    B, D, M = tok.B, cfg.hidden_size, cfg.mlp_hidden
    res, gat = s * B * X // tp * D, s * B * X * D
    stats = 4 * B * X // tp  # LayerNorm mean or rstd (fp32 on CUDA)
    items = [("ln1.in", res), ("ln1.mean", stats), ("ln1.rstd", stats), ("ln1.out", res), ("qkv.in", gat)]
    items += _rms("q", B * X, cfg, tp) + _rms("k", B * X, cfg, tp)
    items += [("o.in", 0 if tok.out_is_view else gat // tp), ("o.out", res), ("ln2.in", res), ("ln2.mean", stats)]
    items += [("ln2.rstd", stats), ("ln2.out", res)]
    items += [("mlp.in", gat), ("mlp.hidden", 2 * s * B * X * M // tp), ("mlp.out", res)]
    return items


def _modulation_items(bd: int, silu: int, scales: int, mods: int, width: int) -> list[tuple[str, int]]:
    """adaLN: silu(cond) per modulation linear, (1 + scale) per modulate call, the modulation outputs [B, width D]
    (gates are views of them); `bd` = bytes of one [B, D] vector."""
    return [("silu", bd)] * silu + [("scale", bd)] * scales + [("mod.out", width * bd)] * mods


def double_block_items(cfg: DiTConfig, tok: Tokens, s: int, tp: int, pol: str) -> list[tuple[str, int]]:
    """Saved tensors of one dual-stream block under policy `pol` (none | sel-attn | sel-mlp | full)."""
    B, D = tok.B, cfg.hidden_size
    if pol == "full":
        return [("inputs", s * B * (tok.Vc + tok.T) // tp * D)]
    items = _modulation_items(s * B * D, silu=2, scales=4, mods=2, width=6)
    for X, tag in ((tok.Vc, "img."), (tok.T, "txt.")):
        items += [(tag + n, b) for n, b in _stream_items(cfg, X, tok, s, tp)]
    items += _attention_items(cfg, tok, s)
    return _apply_selective(items, pol, cfg, tok, s, tp)


def single_block_items(cfg: DiTConfig, tok: Tokens, s: int, tp: int, pol: str) -> list[tuple[str, int]]:
    """Saved tensors of one single-stream block under policy `pol` (its MLP has no selective region)."""
    B, D, M = tok.B, cfg.hidden_size, cfg.mlp_hidden
    L = tok.Vc + tok.T
    res, gat = s * B * L // tp * D, s * B * L * D
    if pol == "full":
        return [("inputs", res)]
    items = _modulation_items(s * B * D, silu=1, scales=2, mods=1, width=3)
    items += [("ln.in", res), ("ln.mean", 4 * B * L // tp), ("ln.rstd", 4 * B * L // tp), ("ln.out", res)]
    items += [("joint.in", gat), ("mlp_in.out", s * B * L * M // tp)]
    items += _rms("q", B * L, cfg, tp) + _rms("k", B * L, cfg, tp)
    items += [("out.in", s * B * L * (D + M) // tp), ("out.out", res)]
    items += _attention_items(cfg, tok, s)
    return _apply_selective(items, pol, cfg, tok, s, tp)


_ATTN_REGION = ("q", "q.rsqrt", "k", "k.rsqrt")  # dropped by selective attn (with every core.* item)


def _apply_selective(items, pol: str, cfg: DiTConfig, tok: Tokens, s: int, tp: int) -> list[tuple[str, int]]:
    if pol == "sel-mlp":
        return [(n, b) for n, b in items if not n.endswith(".mlp.hidden")]
    if pol != "sel-attn":
        return items
    kept = [(n, b) for n, b in items if not n.startswith("core.") and n.split(".", 1)[-1] not in _ATTN_REGION]
    kept = [(n, b) for n, b in kept if n not in _ATTN_REGION]
    loc = s * tok.B * (tok.Vc + tok.T) * cfg.hidden_size // tp  # one of q, k, v, out in the block layout
    kept += [("core.inputs", 3 * loc)]  # the recomputed core's inputs
    if tok.out_is_view and any(n.endswith("o.in") for n, _ in items):  # o's input now keeps the core's output
        kept += [("core.out", loc)]
    return kept


def block_policies(cfg: DiTConfig, pol: Policy) -> list[str]:
    """Per block index: none | sel-attn | sel-mlp | full."""
    nd, ns = cfg.num_double_blocks, cfg.num_single_blocks
    chosen = select_blocks(pol.recompute_blocks, nd, ns) if pol.recompute != "none" else set()
    tag = "full" if pol.recompute == "full" else f"sel-{pol.selective}"
    return [tag if i in chosen else "none" for i in range(nd + ns)]


def first_block_extra(cfg: DiTConfig, tok: Tokens, s: int, tp: int) -> list[tuple[str, int]]:
    """Under CP without TP the first block's video input is a view of its chunk of the embedded video, so the first
    block's saves keep the whole (padded) embedding alive (context.shard_video_tokens narrows)."""
    if tok.cp == 1 or tp > 1:
        return []
    return [("cp.embedding", s * tok.B * (tok.cp - 1) * _ceil(tok.V, tok.cp) * cfg.hidden_size)]


def other_items(cfg: DiTConfig, tok: Tokens, s: int, tp: int) -> list[tuple[str, int]]:
    """Saved outside the blocks: conditioning MLPs, patch embed, refiner, RoPE tables, final layer, loss."""
    B, D, V, T = tok.B, cfg.hidden_size, tok.V, tok.T
    mlps = [256, cfg.pooled_dim] + ([256] if cfg.guidance_embeds else []) + [256, cfg.text_dim]
    Mr, P = int(D * cfg.mlp_ratio), math.prod(cfg.patch) * cfg.out_channels
    ref = s * B * T * D * (6 + 5 / tp) + 2 * s * B * T * Mr / tp + 2 * 4 * 2 * B * T + s * B * T * T
    patch_in = cfg.in_channels * math.prod(cfg.patch)
    items = [("cond", s * B * (sum(mlps) + 2 * D * len(mlps) + D)), ("patch.in", s * B * V * patch_in)]
    items += [("refiner.in", s * B * T * cfg.text_dim), ("refiner", int(ref * cfg.num_refiner_blocks))]
    items += [("rope", 2 * 4 * V * cfg.head_dim), ("final", 3 * s * B * V * D + 2 * 4 * B * V)]
    items += [("loss", 2 * 4 * B * V * P)]
    return items


@dataclass
class Activations:
    device: int  # saved-activation bytes held on the device at the end of forward
    host: int  # bytes offloaded to host memory
    per_block: list[int] = field(default_factory=list)  # device bytes per block
    per_block_none: list[int] = field(default_factory=list)  # bytes per block without recompute / offload
    per_block_host: list[int] = field(default_factory=list)  # offloaded bytes per block
    other: int = 0


def activation_bytes(cfg: DiTConfig, w: Workload, lay: Layout, pol: Policy) -> Activations:
    """Saved-activation bytes of one rank for a whole forward."""
    tok, s, tp = layout_tokens(cfg, w, lay), w.act_bytes, lay.tp
    nd = cfg.num_double_blocks
    offloaded = select_blocks(pol.offload_blocks, nd, cfg.num_single_blocks, "memory.offload_blocks")
    cache: dict[tuple, tuple[int, int, int]] = {}  # (kind, policy, first, offloaded) -> (device, host, none)
    out = Activations(0, 0)
    for i, bp in enumerate(block_policies(cfg, pol)):
        key = (i < nd, bp, i == 0, i in offloaded)
        if key not in cache:
            cache[key] = _block_bytes(cfg, tok, s, tp, *key, w.min_offload_bytes)
        device, host, none = cache[key]
        out.per_block.append(device)
        out.per_block_host.append(host)
        out.per_block_none.append(none)
        out.host += host
    out.other = sum(int(b) for _, b in other_items(cfg, tok, s, tp))
    out.device = sum(out.per_block) + out.other
    return out


def _block_bytes(cfg, tok, s, tp, double, bp, first, offloaded, min_bytes) -> tuple[int, int, int]:
    """(device, host, without any policy) bytes of one block."""
    fn = double_block_items if double else single_block_items
    extra = first_block_extra(cfg, tok, s, tp) if first else []
    items = fn(cfg, tok, s, tp, bp) + extra
    host = sum(b for _, b in items if b >= min_bytes) if offloaded else 0
    none = sum(b for _, b in fn(cfg, tok, s, tp, "none") + extra)
    return sum(b for _, b in items) - host, host, none


# --------------------------------------------------------------------------------------------------------------
# model states
# --------------------------------------------------------------------------------------------------------------
@functools.cache
def _tp_table() -> dict[tuple[str, str], str]:
    """(block list, module path in the block) -> "rows" (column-parallel: weight and bias split on dim 0) or "cols"
    (row-parallel: weight split on dim 1), read from the TP plans so the two never drift apart."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from vidtron.models.dit import sharding as tp

    plans = {"double_blocks": tp.double_block_plan(), "single_blocks": tp.single_block_plan()}
    plans["text_refiner.blocks"] = tp.refiner_block_plan()
    table = {}
    for kind, plan in plans.items():
        for path, style in plan.items():
            if isinstance(style, ColwiseParallel | RowwiseParallel):
                table[kind, path] = "rows" if isinstance(style, ColwiseParallel) else "cols"
    return table


def _tp_split(name: str) -> str:
    """How TP splits a parameter: "rows", "cols" (row-parallel weights only; their bias is replicated) or ""."""
    parts = name.split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        key = (parts[0], ".".join(parts[2:-1]))
    elif parts[:2] == ["text_refiner", "blocks"]:
        key = ("text_refiner.blocks", ".".join(parts[3:-1]))
    else:
        return ""
    split = _tp_table().get(key, "")
    return "" if split == "cols" and parts[-1] != "weight" else split


def _local_numel(split: str, rows: int, cols: int, tp: int, shard: int) -> int:
    """Elements of a parameter on one rank: TP split, then FSDP's dim-0 shard (padded)."""
    rows, cols = (rows // tp, cols) if split == "rows" else (rows, cols // tp) if split == "cols" else (rows, cols)
    return _ceil(rows, shard) * cols


@functools.lru_cache(maxsize=8)
def param_groups(shapes: tuple) -> tuple[Counter, dict[str, Counter]]:
    """Parameters grouped by (TP split, rows, cols) with counts, for all of them and per block."""
    everything: Counter = Counter()
    per_block: dict[str, Counter] = {}
    for name, shape in shapes:
        key = (_tp_split(name), shape[0], math.prod(shape[1:]))
        everything[key] += 1
        if name.startswith(("double_blocks", "single_blocks")):
            per_block.setdefault(".".join(name.split(".")[:2]), Counter())[key] += 1
    return everything, per_block


def _numel(groups: Counter, tp: int, shard: int) -> int:
    return sum(count * _local_numel(*key, tp, shard) for key, count in groups.items())


def param_shapes(cfg: DiTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of DiT(cfg), built on the meta device."""
    from vidtron.models.dit import DiT

    with torch.device("meta"):
        model = DiT(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@dataclass
class ModelStates:
    params: int  # fp32 sharded master params
    grads: int  # fp32 sharded gradients
    optimizer: int  # AdamW exp_avg + exp_avg_sq (fp32)
    unsharded: int  # all-gathered params (param_dtype) alive at peak
    grad_buffers: int  # unsharded gradients before reduce-scatter (fp32)
    block_params: int  # largest block's parameters on this rank after TP (unsharded)


def model_state_bytes(shapes, w: Workload, lay: Layout) -> ModelStates:
    everything, per_block = param_groups(tuple(shapes))
    local = _numel(everything, lay.tp, lay.shard)
    biggest = max((_numel(g, lay.tp, 1) for g in per_block.values()), default=0)
    if lay.shard * lay.dp_replicate == 1:  # no FSDP: the params are used directly
        unsharded, grad_buf = 0, 0
    elif lay.zero_stage >= 3:
        unsharded, grad_buf = 2 * biggest * w.param_bytes, 2 * biggest * 4
    else:
        unsharded, grad_buf = _numel(everything, lay.tp, 1) * w.param_bytes, 2 * biggest * 4
    return ModelStates(4 * local, 4 * local, 8 * local, unsharded, grad_buf, biggest)


# --------------------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    layout: Layout
    policy: Policy
    states: ModelStates
    acts: Activations
    working: int  # backward working set: a rematerialized / copied-back block, gradient buffers
    comm_buffers: int  # CP ring K/V double buffers
    fragmentation: float = 0.05  # allocator slack on top of the sum
    reserve: int = 3 * GIB  # CUDA context, NCCL, kernels

    @property
    def model_states(self) -> int:
        s = self.states
        return s.params + s.grads + s.optimizer

    @property
    def peak(self) -> int:
        s = self.states
        total = self.model_states + s.unsharded + s.grad_buffers + self.acts.device + self.working + self.comm_buffers
        return int(total * (1 + self.fragmentation)) + self.reserve


def working_bytes(cfg: DiTConfig, w: Workload, lay: Layout, acts: Activations) -> int:
    """Backward working set: the largest block rematerialized (recompute) or copied back with the next one
    prefetched (offload), plus the gradients of one block's streams and MLP hidden."""
    tok = layout_tokens(cfg, w, lay)
    remat = max((n - d for n, d in zip(acts.per_block_none, acts.per_block)), default=0)
    fetched = 2 * max(acts.per_block_host, default=0)
    grads = w.act_bytes * tok.B * (tok.Vc + tok.T) * (4 * cfg.hidden_size + 2 * cfg.mlp_hidden // lay.tp)
    return max(remat, fetched) + grads


def comm_buffer_bytes(cfg: DiTConfig, w: Workload, lay: Layout) -> int:
    """Ring K/V in flight (2 blocks) and fp32 dK/dV accumulators (2); TP gather / reduce-scatter staging (2)."""
    tok = layout_tokens(cfg, w, lay)
    chunk_bytes = tok.B * _ceil(tok.V, lay.cp) * cfg.hidden_size // lay.tp
    ring = 2 * 2 * (w.act_bytes + 4) * chunk_bytes if lay.cp // lay.ulysses > 1 else 0
    tp = 2 * w.act_bytes * tok.B * (tok.Vc + tok.T) * cfg.hidden_size if lay.tp > 1 else 0
    return ring + tp


def estimate(cfg: DiTConfig, w: Workload, lay: Layout, pol: Policy, shapes=None, states=None) -> Estimate:
    """Per-rank memory of training `cfg` on `w` with layout `lay` and policy `pol` (`shapes` from param_shapes and
    `states` from model_state_bytes may be passed in when pricing many policies)."""
    if states is None:
        states = model_state_bytes(shapes if shapes is not None else param_shapes(cfg), w, lay)
    acts = activation_bytes(cfg, w, lay, pol)
    return Estimate(lay, pol, states, acts, working_bytes(cfg, w, lay, acts), comm_buffer_bytes(cfg, w, lay))
