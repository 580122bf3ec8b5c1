"""Collective accounting: bytes per collective type, measured (a dispatch mode) and predicted (an analytic model).

Bytes are the payload per rank, the "size" of nccl-tests: all_reduce and broadcast the tensor, all_gather the
gathered output, reduce_scatter the unreduced input, all_to_all the input, send the tensor sent (receives are the
other side of a send and are not counted again). For a group of g ranks the bytes on the wire per rank are then
size for send, (g-1)/g x size for all-gather / reduce-scatter / all-to-all and 2(g-1)/g x size for a ring all-reduce.

`CollectiveBytes` is a TorchDispatchMode that sees every c10d and functional collective, including those DTensor
issues (it lets DTensor desugar first, as CommDebugMode does). `analytic_bytes` predicts the same table for one
forward + backward of the DiT under a layout from the model's shapes and the plans in tensor_parallel.py,
context_wrap.py, vidtron/parallel/context and parallelize.py (FSDP2). Shape legend: b local batch, V video tokens,
Vc = ceil(V/cp) per CP rank, Vp = Vc padded to a multiple of tp, T text tokens, Tp = T padded to a multiple of tp,
D model dim, N heads, Dh head dim, M MLP hidden.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "broadcast")
_F32 = 4

# op name -> (kind, where the payload is: an argument index, or "out" for the op's result)
_c10d, _fn, _fna = torch.ops.c10d, torch.ops._c10d_functional, torch.ops._c10d_functional_autograd
_OPS = {
    _c10d.allreduce_: ("all_reduce", 0),
    _c10d.allreduce_coalesced_: ("all_reduce", 0),
    _c10d.allgather_: ("all_gather", 0),
    _c10d._allgather_base_: ("all_gather", 0),
    _c10d.allgather_into_tensor_coalesced_: ("all_gather", 0),
    _c10d.reduce_scatter_: ("reduce_scatter", 1),
    _c10d._reduce_scatter_base_: ("reduce_scatter", 1),
    _c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1),
    _c10d.alltoall_: ("all_to_all", 1),
    _c10d.alltoall_base_: ("all_to_all", 1),
    _c10d.send: ("send", 0),
    _c10d.broadcast_: ("broadcast", 0),
    _fn.all_reduce: ("all_reduce", 0),
    _fn.all_reduce_: ("all_reduce", 0),
    _fn.all_reduce_coalesced: ("all_reduce", 0),
    _fn.all_gather_into_tensor: ("all_gather", "out"),
    _fn.all_gather_into_tensor_coalesced: ("all_gather", "out"),
    _fn.reduce_scatter_tensor: ("reduce_scatter", 0),
    _fn.reduce_scatter_tensor_coalesced: ("reduce_scatter", 0),
    _fn.all_to_all_single: ("all_to_all", 0),
    _fn.broadcast: ("broadcast", 0),
    _fna.all_gather_into_tensor: ("all_gather", "out"),
    _fna.reduce_scatter_tensor: ("reduce_scatter", 0),
    _fna.all_to_all_single: ("all_to_all", 0),
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveBytes(TorchDispatchMode):
    """`with CollectiveBytes() as cb: ...` then `cb.bytes` / `cb.counts`: {kind: total} over the block."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn the op into local ops + collectives, then see those
        out = func(*args, **kwargs)
        spec = _OPS.get(getattr(func, "_overloadpacket", None))
        if spec is not None:
            kind, where = spec
            self.record(kind, _nbytes(out if where == "out" else args[where]), args, kwargs)
        return out

    def record(self, kind: str, nbytes: int, args: tuple, kwargs: dict) -> None:
        """One collective of `kind` with payload `nbytes` (its op's args, for subclasses that key by group)."""
        self.bytes[kind] += nbytes
        self.counts[kind] += 1


# ---------------------------------------------------------------------------------------------------------------
# the analytic model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """What one step of one rank processes."""

    batch: int  # b: samples per data-parallel rank
    video_tokens: int  # V
    text_tokens: int  # T
    zero_stage: int = 3  # 3: blocks re-gather their params in backward
    act_bytes: int = _F32  # activation dtype in TP / CP collectives (2 under trainer.precision=bf16)
    param_bytes: int = _F32  # FSDP2 all-gathered parameter dtype (2 under bf16); gradients reduce in fp32
    recompute_blocks: bool = False  # memory.recompute=full: each block's forward collectives run again in backward
    recompute_attention: bool = False  # full or selective attention recompute: the ring's forward sends run again


_COLWISE = ("q", "k", "v", "fc1", "mlp_in")  # module names whose weight / bias shard dim 0 under TP
_ROWWISE = ("o", "fc2", "out")  # module names whose weight shards dim 1 under TP (bias replicated)
_MODULATION = ("img_mod", "txt_mod", "mod")  # column-parallel in the dual / single blocks (not the refiner's)


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The TP-local shape of parameter `name` (the plans of tensor_parallel.py)."""
    if tp == 1 or not (name.startswith(("double_blocks", "single_blocks", "text_refiner.blocks"))):
        return shape
    module, leaf = name.split(".")[-2:]
    if module in _COLWISE or (module in _MODULATION and not name.startswith("text_refiner")):
        return (shape[0] // tp, *shape[1:])
    if module in _ROWWISE and leaf == "weight":
        return (shape[0], shape[1] // tp)
    return shape


def fsdp_units(named_shapes) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """FSDP2 units of parallelize.apply_fsdp over (name, shape) pairs (e.g. memory_model.param_shapes): each block,
    the refiner, and the root (everything else)."""
    units: dict[str, list] = defaultdict(list)
    for name, shape in named_shapes:
        parts = name.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            unit = ".".join(parts[:2])
        elif parts[0] == "text_refiner":
            unit = "text_refiner"
        else:
            unit = "root"
        units[unit].append((name, tuple(shape)))
    return units


def _fsdp_bytes(units: dict, tp: int, shard: int, replicate: int, w: Workload) -> dict[str, int]:
    """FSDP2 over `units` (fsdp_units): all-gather the padded flat params per unit in w.param_bytes (twice for
    re-sharded units under ZeRO-3), reduce-scatter the fp32 gradients once, all-reduce the sharded gradients over
    dp_replicate (HSDP)."""
    out: dict[str, int] = defaultdict(int)
    if shard * replicate == 1:
        return out
    for unit, params in units.items():
        shard_numel = 0
        for name, shape in params:
            local = tp_local_shape(name, shape, tp)
            shard_numel += math.ceil(local[0] / shard) * math.prod(local[1:])  # FSDP2 pads dim 0 per param
        gathers = 2 if (w.zero_stage >= 3 and unit != "root") else 1
        if shard > 1:
            out["all_gather"] += gathers * shard * shard_numel * w.param_bytes
            out["reduce_scatter"] += shard * shard_numel * _F32
        if replicate > 1:
            out["all_reduce"] += shard_numel * _F32
    return out


def _ceil_div(n: int, k: int) -> int:
    return -(-n // k)


def _round_up(n: int, k: int) -> int:
    return _ceil_div(n, k) * k


def _tp_bytes(cfg, dims, w: Workload) -> dict[str, int]:
    """TP + SP activations (tensor_parallel.py, context_wrap.py); each gather's adjoint is a reduce-scatter and
    vice versa, so forward + backward moves each SP boundary once each way. Everything here is an activation or the
    gradient of a compute-dtype parameter: w.act_bytes. Full recompute runs each block's forward half again."""
    out: dict[str, int] = defaultdict(int)
    tp, b, D, T, a = dims.tp, w.batch, cfg.hidden_size, w.text_tokens, w.act_bytes
    if tp == 1:
        return out
    vp = _round_up(_ceil_div(w.video_tokens, dims.cp), tp)
    tpad = _round_up(T, tp)
    act = {"img": b * vp * D * a, "txt": b * tpad * D * a}  # one stream's gathered activations
    again = int(w.recompute_blocks)  # forward collectives repeated in backward
    for _ in range(cfg.num_double_blocks):
        for s in ("img", "txt"):
            out["all_gather"] += (4 + 2 * again) * act[s]  # attn in, MLP in (fwd); o, fc2 adjoints (bwd)
            out["reduce_scatter"] += (4 + 2 * again) * act[s]
            out["all_gather"] += (1 + again) * b * 6 * D * a  # the modulation vector (forward)
            out["reduce_scatter"] += b * 6 * D * a  # its partial gradient (backward)
            out["all_reduce"] += b * D * a  # the gradient of the modulation's input (column-parallel, backward)
            out["all_reduce"] += 2 * cfg.head_dim * a  # qk-norm weight gradients
    for _ in range(cfg.num_single_blocks):
        out["all_gather"] += (2 + again) * (act["img"] + act["txt"])  # join (forward), split adjoint (backward)
        out["reduce_scatter"] += (2 + again) * (act["img"] + act["txt"])
        out["all_gather"] += (1 + again) * b * 3 * D * a
        out["reduce_scatter"] += b * 3 * D * a
        out["all_reduce"] += b * D * a + 2 * cfg.head_dim * a
    out["all_reduce"] += cfg.num_refiner_blocks * 4 * b * T * D * a  # o, fc2 (fwd); attn in, fc1 in (bwd)
    out["all_gather"] += 2 * act["img"] + act["txt"]  # exit gather (fwd); entry splits' adjoints (bwd)
    # the last block's text output feeds nothing, so backward skips what only flows from it
    if cfg.num_single_blocks:
        out["all_gather"] -= act["txt"]  # the text adjoint of the last split
    elif cfg.num_double_blocks:
        out["all_gather"] -= 2 * act["txt"]  # the text o and fc2 adjoints
        out["reduce_scatter"] -= act["txt"]  # the text MLP gather's adjoint
    return out


def _cp_bytes(cfg, dims, w: Workload) -> dict[str, dict[str, int]]:
    """Context parallel attention per block: {"ulysses": its all-to-alls and text gathers (Ulysses group), "ring": the
    K/V sends (ring group), "cp_exit": the final gather of the video over all cp ranks}. Q/K/V and outputs move in
    w.act_bytes; the ring's dK/dV accumulators travel in fp32. Recompute runs forward exchanges again in backward:
    full recompute all of them, selective attention recompute the ring's K/V and Ulysses' q, k, v (not its output)."""
    out = {"ulysses": defaultdict(int), "ring": defaultdict(int), "cp_exit": defaultdict(int)}
    if dims.cp == 1:
        return out
    b, Dh, D, a = w.batch, cfg.head_dim, cfg.hidden_size, w.act_bytes
    vc = _ceil_div(w.video_tokens, dims.cp)
    tpad = _round_up(w.text_tokens, dims.tp)
    heads = cfg.num_heads // dims.tp
    blocks = cfg.num_double_blocks + cfg.num_single_blocks
    u, r = dims.ulysses, dims.ring
    vid = b * heads * vc * Dh  # elements of one of q / k / v / out: video rows of this CP rank, local heads
    if u > 1:
        again_a2a = 4 * vid if w.recompute_blocks else 3 * vid * int(w.recompute_attention)
        out["ulysses"]["all_to_all"] += blocks * (2 * 4 * vid + again_a2a) * a  # q, k, v in, out back; fwd + bwd
        txt = b * heads * tpad * Dh * a
        out["ulysses"]["all_gather"] += blocks * (1 + int(w.recompute_blocks)) * txt  # text out over heads (fwd)
        out["ulysses"]["reduce_scatter"] += blocks * txt  # its adjoint (backward)
    if r > 1:
        kv = 2 * vid  # a ring K/V block: u * Vc tokens of N/(tp*u) heads, the same elements
        again = int(w.recompute_attention or w.recompute_blocks)
        # K/V forward (again under recompute), K/V backward, dK/dV accumulators (fp32)
        out["ring"]["send"] += blocks * ((1 + again) * (r - 1) * kv * a + (r - 1) * kv * a + r * kv * _F32)
    full = b * dims.cp * vc * D * a
    out["cp_exit"]["all_gather"] += full  # final gather (forward)
    out["cp_exit"]["reduce_scatter"] += full  # its adjoint (backward)
    return out


def layout_bytes(cfg, units: dict, dims, w: Workload) -> dict[str, dict[str, int]]:
    """Predicted {part: {kind: bytes per rank}} for one forward + backward of a DiT of config `cfg` whose FSDP units
    are `units` (fsdp_units) under `dims`: parts "fsdp" (dp_shard x cp, and dp_replicate's all-reduce), "tp",
    "ulysses", "ring" and "cp_exit" (see _cp_bytes)."""
    fsdp = _fsdp_bytes(units, dims.tp, dims.dp_shard * dims.cp, dims.dp_replicate, w)
    return {"fsdp": fsdp, "tp": _tp_bytes(cfg, dims, w), **_cp_bytes(cfg, dims, w)}


def wire_bytes(payload: dict[str, int], group: int) -> float:
    """Bytes on the wire per rank for a {kind: payload} table in a group of `group` ranks (the module's convention)."""
    g = (group - 1) / group
    factor = {"send": 1.0, "all_reduce": 2 * g, "broadcast": 1.0}
    return sum(n * factor.get(kind, g) for kind, n in payload.items())


def analytic_bytes(model, dims, w: Workload) -> dict[str, int]:
    """Predicted {kind: bytes per rank} for one forward + backward of `model` (a DiT, any device incl. meta) under
    `dims`, FSDP sharding over dp_shard x cp as in parallelize.py."""
    total: dict[str, int] = defaultdict(int)
    units = fsdp_units((n, p.shape) for n, p in model.named_parameters())
    for part in layout_bytes(model.config, units, dims, w).values():
        for kind, n in part.items():
            total[kind] += n
    return {k: total[k] for k in KINDS if total.get(k)}
