"""The training planner: ranks the 5D layouts and activation policies that fit a DiT job on a GPU budget.

Memory comes from vidtron/tools/memory_model.py, FLOPs from vidtron/tools/flops.py (the one FLOP model, also used by
the scaling sweeps), communication from the layout. `vidtron-plan` (vidtron/launch/plan.py) is its command line.
    vidtron-plan --flavor dit-13b --frames 129 --height 720 --width 1280 --gpus 64 --gpu-mem 80GiB

Every (tp, cp, cp_mode, ulysses, dp_shard, dp_replicate, ZeRO stage) that `ParallelDims.validate_for` accepts, times
a set of policies (recompute none / selective / full, on all or some blocks; offload none / all), is priced by
`vidtron.tools.memory_model` (peak bytes per rank). For each layout the fastest policy that fits is kept; rows are
ranked by estimated video tokens per second per GPU from a simple step-time model: compute (FLOPs / --tflops, plus the
recomputed forward) overlapped with FSDP and ring traffic, TP/SP and Ulysses traffic exposed, offload copies exposed
when they outlast the forward of the blocks they follow (--pcie-gbps). Layouts that fit nowhere are listed with the
reason. Legend: tp tensor parallel, cp context parallel (r ring, u Ulysses, s USP with its Ulysses degree), fs FSDP
shard, dr replicate, z ZeRO stage.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import DiTConfig
from vidtron.parallel.dims import ParallelDims
from vidtron.tools.comm_accounting import Workload as CommWorkload
from vidtron.tools.comm_accounting import fsdp_units, layout_bytes, wire_bytes
from vidtron.tools.flops import forward_flops
from vidtron.tools.memory_model import (
    GIB,
    Layout,
    Policy,
    Workload,
    estimate,
    model_state_bytes,
    param_shapes,
)
from vidtron.tools.memory_model import video_tokens as count_video_tokens


@dataclass
class Hardware:
    gpus: int
    gpu_mem: int  # bytes
    gpus_per_node: int = 8
    host_mem: int = 128 * GIB  # host memory per GPU for offloaded activations
    tflops: float = 400.0  # sustained bf16 TFLOP/s per GPU
    nvlink_gbps: float = 300.0  # GB/s per GPU inside a node
    ib_gbps: float = 40.0  # GB/s per GPU across nodes
    pcie_gbps: float = 25.0  # GB/s per GPU host <-> device


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '80G', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g|tib|tb|t|mib|mb)?\s*", text.lower())
    if not m:
        raise ConfigError("--gpu-mem", text, "give a size such as 80GiB or 141GB")
    unit = {"gib": GIB, "g": GIB, None: GIB, "gb": 10**9, "tib": 1024 * GIB, "tb": 10**12, "t": 1024 * GIB}
    unit |= {"mib": 1024**2, "mb": 10**6}
    return int(float(m.group(1)) * unit[m.group(2)])


# --------------------------------------------------------------------------------------------------------------
# what to try
# --------------------------------------------------------------------------------------------------------------
def layouts(gpus: int, zero_stages: tuple[int, ...] = (3, 2)) -> list[Layout]:
    out = []
    for tp in _divisors(gpus):
        for cp in _divisors(gpus // tp):
            dp = gpus // (tp * cp)
            modes = [("ring", 1)] if cp == 1 else [("ring", 1), ("ulysses", cp)]
            modes += [("usp", u) for u in _divisors(cp) if 1 < u < cp]
            for mode, u in modes:
                for dr in _divisors(dp):
                    out += [Layout(tp, cp, mode, u, dp // dr, dr, z) for z in zero_stages]
    return out


def policies(cfg: DiTConfig) -> list[Policy]:
    n = cfg.num_double_blocks + cfg.num_single_blocks
    half, most = f"0-{n // 2 - 1}", f"0-{3 * n // 4 - 1}"
    base = [Policy(), Policy("selective", "attn"), Policy("selective", "mlp")]
    base += [Policy("full", recompute_blocks=b) for b in (half, most, "all")]
    return base + [Policy(p.recompute, p.selective, p.recompute_blocks, "all") for p in base]


def invalid_reason(cfg: DiTConfig, lay: Layout, video_tokens: int, hw: Hardware) -> str | None:
    if lay.tp > hw.gpus_per_node:
        return f"parallel.tp={lay.tp}: spans nodes; keep tp <= {hw.gpus_per_node} (GPUs per node)"
    try:
        dims = ParallelDims(lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp, lay.cp_mode, lay.ulysses)
        dims.validate_for(cfg.num_heads, video_tokens, cfg.mlp_hidden)
    except ConfigError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------------------------
# communication and time
# --------------------------------------------------------------------------------------------------------------
def _span(lay: Layout, inner: int, size: int, hw: Hardware) -> float:
    """Bandwidth of a group of `size` ranks at mesh stride `inner` (NVLink when it fits in a node)."""
    return hw.nvlink_gbps if inner * size <= hw.gpus_per_node else hw.ib_gbps


def comm_bytes(cfg: DiTConfig, w: Workload, lay: Layout, pol: Policy, shapes=None) -> dict[str, float]:
    """Bytes each rank sends per step, by kind (fsdp, tp, ring, ulysses): the analytic collective model of
    vidtron/tools/comm_accounting.py (the one the dry run and the gloo benches measure against), in the workload's
    dtypes, on the wire ((g-1)/g x payload for gathers / scatters / all-to-all, 2(g-1)/g for all-reduce)."""
    shapes = shapes if shapes is not None else param_shapes(cfg)
    dims = ParallelDims(lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp, lay.cp_mode, lay.ulysses)
    aw = CommWorkload(
        batch=w.batch,
        video_tokens=count_video_tokens(cfg, w.video_grid),
        text_tokens=w.text_tokens,
        zero_stage=lay.zero_stage,
        act_bytes=w.act_bytes,
        param_bytes=w.param_bytes,
        recompute_blocks=pol.recompute == "full",
        recompute_attention=pol.recompute == "selective" and pol.selective == "attn",
    )
    parts = layout_bytes(cfg, fsdp_units(shapes), dims, aw)
    fsdp = parts["fsdp"]
    out = {"fsdp": wire_bytes({k: v for k, v in fsdp.items() if k != "all_reduce"}, lay.shard)}
    out["fsdp"] += wire_bytes({"all_reduce": fsdp.get("all_reduce", 0)}, lay.dp_replicate)
    out["tp"] = wire_bytes(parts["tp"], lay.tp)
    exit_gather = wire_bytes(parts["cp_exit"], lay.cp)  # counted with the attention exchange it belongs to
    out["ring"] = wire_bytes(parts["ring"], lay.cp // lay.ulysses) + (exit_gather if lay.ulysses == 1 else 0)
    out["ulysses"] = wire_bytes(parts["ulysses"], lay.ulysses) + (exit_gather if lay.ulysses > 1 else 0)
    return out


BLOCK_PARTS = ("double_linear", "double_attention", "single_linear", "single_attention")


def step_flops(cfg: DiTConfig, w: Workload, pol: Policy, shapes=None) -> tuple[float, float]:
    """(training FLOPs of one step for one data-parallel rank's batch, forward FLOPs of the blocks), from
    vidtron/tools/flops.py: backward 2x forward, plus the recomputed forward of the policy."""
    parts = forward_flops(cfg, w.video_grid, w.text_tokens, w.batch)
    blocks_fwd = sum(parts[k] for k in BLOCK_PARTS)
    extra = {"full": 1.0, "selective": 0.5 if pol.selective == "attn" else 0.3}.get(pol.recompute, 0.0)
    return 3 * sum(parts.values()) + extra * blocks_fwd, blocks_fwd


def step_seconds(cfg, w: Workload, lay: Layout, pol: Policy, est, shapes, hw: Hardware) -> tuple[float, float]:
    """(estimated step time, communication bytes per rank)."""
    comm = comm_bytes(cfg, w, lay, pol, shapes)
    flops, blocks_fwd = step_flops(cfg, w, pol, shapes)
    compute = flops / (lay.tp * lay.cp) / (hw.tflops * 1e12)
    gb = 1e9
    overlapped = comm["fsdp"] / (gb * _span(lay, lay.tp, lay.shard, hw))
    overlapped += comm["ring"] / (gb * _span(lay, lay.tp * lay.ulysses, lay.cp // lay.ulysses, hw))
    exposed = comm["tp"] / (gb * _span(lay, 1, lay.tp, hw)) + comm["ulysses"] / (gb * _span(lay, lay.tp, lay.cp, hw))
    offload = 0.0
    if est.acts.host:
        copy = est.acts.host / (hw.pcie_gbps * gb)
        offload = 2 * max(0.0, copy - blocks_fwd / (lay.tp * lay.cp) / (hw.tflops * 1e12))
    return max(compute, overlapped) + exposed + offload, sum(comm.values())


# --------------------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    layout: Layout
    policy: Policy | None
    peak: int
    host: int
    acts: int
    states: int
    comm: float
    seconds: float
    tokens_per_gpu_s: float
    reason: str = ""


def plan(cfg: DiTConfig, w: Workload, hw: Hardware, zero_stages=(3, 2)) -> tuple[list[Row], list[Row]]:
    """(fitting layouts with their best policy, fastest first; rejected layouts with the reason)."""
    shapes = param_shapes(cfg)
    V = count_video_tokens(cfg, w.video_grid)
    fits, rejected = [], []
    for lay in layouts(hw.gpus, zero_stages):
        reason = invalid_reason(cfg, lay, V, hw)
        if reason:
            rejected.append(Row(lay, None, 0, 0, 0, 0, 0.0, 0.0, 0.0, reason))
            continue
        best, leanest = None, None
        states = model_state_bytes(shapes, w, lay)
        for pol in policies(cfg):
            est = estimate(cfg, w, lay, pol, states=states)
            if leanest is None or est.peak < leanest.peak:
                leanest = est
            if est.peak > hw.gpu_mem or est.acts.host > hw.host_mem:
                continue
            seconds, comm = step_seconds(cfg, w, lay, pol, est, shapes, hw)
            tps = w.batch * lay.dp_shard * lay.dp_replicate * V / seconds / hw.gpus
            row = Row(lay, pol, est.peak, est.acts.host, est.acts.device, est.model_states, comm, seconds, tps)
            if best is None or row.seconds < best.seconds:
                best = row
        if best is not None:
            fits.append(best)
        else:
            why = f"needs {leanest.peak / GIB:.0f} GiB per GPU even with {leanest.policy.name}"
            rejected.append(Row(lay, None, leanest.peak, leanest.acts.host, 0, 0, 0.0, 0.0, 0.0, why))
    fits.sort(key=lambda r: (-round(r.tokens_per_gpu_s), r.comm, r.peak))
    return fits, rejected


def collapse(rows: list[Row]) -> list[Row]:
    """Keep the best row per (tp, cp, cp_mode, ulysses): the FSDP / replicate / ZeRO variants rank just below it."""
    seen, out = set(), []
    for r in rows:
        key = (r.layout.tp, r.layout.cp, r.layout.cp_mode, r.layout.ulysses)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def format_table(fits: list[Row], rejected: list[Row], top: int, hw: Hardware, collapsed: bool = True) -> str:
    shown = collapse(fits) if collapsed else fits
    head = f"{'#':>3} {'layout':<26} {'policy':<18} {'mem/GPU':>8} {'acts':>7} {'host':>7} {'comm/step':>10}"
    head += f" {'step':>7} {'tok/s/GPU':>9}"
    note = f"; best of each tp x cp shown, {len(shown)} of them (--all lists every variant)" if collapsed else ""
    lines = [f"{len(fits)} layouts fit in {hw.gpu_mem / GIB:.0f} GiB on {hw.gpus} GPUs (best policy each{note}):", head]
    for i, r in enumerate(shown[:top], 1):
        lines.append(
            f"{i:>3} {r.layout.name:<26} {r.policy.name:<18} {r.peak / GIB:>6.1f}Gi {r.acts / GIB:>5.1f}Gi"
            f" {r.host / GIB:>5.1f}Gi {r.comm / 1e9:>8.1f}GB {r.seconds:>6.1f}s {r.tokens_per_gpu_s:>9.0f}"
        )
    lines.append(f"\n{len(rejected)} layouts do not fit or are invalid:")
    kinds = Counter(_reason_kind(r.reason) for r in rejected)
    for kind, count in kinds.most_common():
        example = min((r for r in rejected if _reason_kind(r.reason) == kind), key=lambda r: r.peak)
        lines.append(f"  {count:>4} x {kind}, e.g. {example.layout.name}: {example.reason}")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    if reason.startswith("needs"):
        return "out of memory with every policy"
    return reason.split("=")[0].strip()


# --------------------------------------------------------------------------------------------------------------
# one layout (vidtron-plan --layout)
# --------------------------------------------------------------------------------------------------------------
_LAYOUT_KEYS = ("tp", "cp", "dp_shard", "dp_replicate", "cp_mode", "ulysses", "zero")


def parse_layout(text: str, gpus: int) -> Layout:
    """'tp=8,cp=4,dp_shard=8' (+ dp_replicate, cp_mode, ulysses, zero; dp_shard defaults to what --gpus leaves)."""
    fields: dict[str, str] = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in _LAYOUT_KEYS:
            raise ConfigError("--layout", text, f"give key=value pairs with keys from {list(_LAYOUT_KEYS)}")
        fields[key] = value
    try:
        num = {k: int(v) for k, v in fields.items() if k != "cp_mode"}
    except ValueError:
        raise ConfigError("--layout", text, "tp, cp, dp_shard, dp_replicate, ulysses and zero are integers") from None
    tp, cp, dr = num.get("tp", 1), num.get("cp", 1), num.get("dp_replicate", 1)
    fs = num.get("dp_shard", max(gpus // (tp * cp * dr), 1))
    dims = ParallelDims(dr, fs, cp, tp, fields.get("cp_mode", "ring"), num.get("ulysses", 0))
    if dims.world_size != gpus:
        raise ConfigError("--layout", text, f"dp_replicate*dp_shard*cp*tp = {dims.world_size}, not --gpus {gpus}")
    return Layout(tp, cp, dims.cp_mode, dims.ulysses, dims.dp_shard, dr, num.get("zero", 3))


def layout_report(cfg: DiTConfig, w: Workload, lay: Layout, hw: Hardware) -> str:
    """Every policy's per-rank memory for one layout: model states once, then the policy-dependent terms (GiB)."""
    reason = invalid_reason(cfg, lay, count_video_tokens(cfg, w.video_grid), hw)
    if reason:
        raise ConfigError("--layout", lay.name, reason)
    states = model_state_bytes(param_shapes(cfg), w, lay)
    g = GIB
    lines = [f"{lay.name}: per rank, GiB (params {states.params / g:.2f}, grads {states.grads / g:.2f}, "
             f"optimizer {states.optimizer / g:.2f}; all-gathered params {w.param_bytes} bytes/element)"]  # fmt: skip
    lines.append(f"{'policy':<18} {'unsharded':>9} {'gradbuf':>8} {'acts':>7} {'host':>7} {'working':>8} "
                 f"{'comm':>6} {'sum':>7} {'peak':>7}")  # fmt: skip
    for pol in policies(cfg):
        e = estimate(cfg, w, lay, pol, states=states)
        s, a = e.states, e.acts
        raw = e.model_states + s.unsharded + s.grad_buffers + a.device + e.working + e.comm_buffers
        lines.append(
            f"{pol.name:<18} {s.unsharded / g:>9.2f} {s.grad_buffers / g:>8.2f} {a.device / g:>7.2f} {a.host / g:>7.2f}"
            f" {e.working / g:>8.2f} {e.comm_buffers / g:>6.2f} {raw / g:>7.2f} {e.peak / g:>7.2f}"
        )
    lines.append("sum: every term; peak: sum + 5% fragmentation + 3 GiB reserve (CUDA context, NCCL)")
    return "\n".join(lines)
