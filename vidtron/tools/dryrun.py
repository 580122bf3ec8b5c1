"""`vidtron-train launcher=dryrun launcher.world_size=N ...`: one training step of N ranks, simulated in this process.

torchtitan's fake-backend dry run, taken to fake memory as well: this process is rank 0 of torch's fake process group
(every collective returns at once and moves nothing), the DeviceMesh is ParallelDims', the DiT is built on the meta
device and laid out by the trainer's own `setup_model` (parallelize_dit: TP/SP -> CP -> recompute / offload -> FSDP2),
then materialised as FakeTensors (shapes, dtypes and strides, no storage). One step runs under FakeTensorMode: the
recipe's own loss (autocast with trainer.precision=bf16, whose FSDP2 param_dtype setup_model sets) -> backward ->
gradient clipping -> AdamW, with AdamW's state created first so the step is a steady-state one. Nothing is computed
and no data is read; the bytes are those of rank 0 (with FSDP's dim-0 padding and CP's end padding, no rank holds
more).

Measured, per rank:
- model states: the local shards (`DTensor.to_local()`) of parameters, gradients and AdamW state, dtype-aware;
- memory over forward + backward: torch's FSDPMemTracker (live storages by kind; the peak and what is live after
  forward); clipping and AdamW run untracked (see `clip_and_step`), their temporaries being small;
- collectives: payload bytes per mesh dimension and kind (a dispatch mode reading each collective's process group),
  and the bytes on the wire: (g-1)/g of the payload for gathers / scatters / all-to-all, 2(g-1)/g for all-reduce;
- checkpoint: what DCP would write from this rank: the local plan of its DefaultSavePlanner over the state dict the
  checkpointer saves ({"model", "optim"} from get_state_dict), without I/O.
Next to them `plan` holds vidtron-plan's figures for the same layout and policy (vidtron/tools/memory_model.py).

What a simulation on CPU cannot see: CPU autocast's op list (CUDA's keeps a few more ops in fp32), the CPU attention
kernels' temporaries (flash kernels on GPU hold less), foreach AdamW's temporaries (CUDA's default; not at the peak),
the CUDA caching allocator (fragmentation) and the CUDA context and NCCL buffers (vidtron-plan's 5% and 3 GiB), other
ranks' differences (rank 0 is simulated) and further trainer.grad_accum micro-batches (one is simulated; the peak is
the same). The EMA copy (platform/ema.py, trainer.ema_decay > 0) is made after the step and its bytes added to the
peak.

Shape legend: B local batch (data.batch_size / dp), C latent channels, F, H, W latent frames / height / width,
T text tokens, Dt text width, Dp pooled text width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import dit_config, latent_shape
from vidtron.models.text.encoders import TextBatch
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.distributed import DistContext
from vidtron.platform.ema import CHECKPOINT_KEY as EMA_KEY
from vidtron.platform.ema import EMA
from vidtron.platform.trainer import build_dims, build_optimizer, setup_model
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.tools.comm_accounting import KINDS, CollectiveBytes, wire_bytes
from vidtron.tools.memory_accounting import model_state_bytes, tensor_bytes
from vidtron.tools.memory_model import GIB, Layout, Policy, Workload, estimate, param_shapes
from vidtron.tools.planner import comm_bytes

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp")  # ParallelDims.build_mesh's named dims


# --------------------------------------------------------------------------------------------------------------
# the layout and the fake world
# --------------------------------------------------------------------------------------------------------------
def check_dryrun(cfg) -> ParallelDims:
    """The layout of `cfg` for launcher.world_size ranks, checked as preflight would (heads, MLP, tokens, batch),
    except that no data shards are needed."""
    if cfg.recipe != "dit_t2v":
        raise ConfigError("recipe", cfg.recipe, "launcher=dryrun simulates recipe=dit_t2v; train others for real")
    if cfg.parallel.zero.engine != "fsdp2":
        raise ConfigError("parallel.zero.engine", cfg.parallel.zero.engine, "launcher=dryrun simulates fsdp2 only")
    if cfg.data.buckets:
        fix = "launcher=dryrun simulates one clip shape: drop data.buckets, set data.frames/height/width to the largest"
        raise ConfigError("data.buckets", f"{len(cfg.data.buckets)} buckets", fix)
    p = cfg.parallel
    world = cfg.launcher.world_size or p.dp_replicate * max(p.dp_shard, 1) * p.cp * p.tp
    if p.dp_shard == -1:  # dp_shard takes what the world size leaves
        dims = build_dims(p, world)
    else:
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.cp_mode, p.ulysses)
    if dims.world_size != world:
        fix = f"dp_replicate*dp_shard*cp*tp = {dims.world_size} ({dims.layout_name}); set launcher.world_size="
        raise ConfigError("launcher.world_size", world, fix + f"{dims.world_size} or change parallel.*")
    task = DryRunTask(cfg, None)
    task.validate_layout(dims)  # the recipe's own check: heads, MLP hidden, video tokens over cp x tp
    parts = dims.dp * cfg.trainer.grad_accum
    if cfg.data.batch_size % parts:
        fix = f"must be divisible by the data-parallel size {dims.dp} x trainer.grad_accum {cfg.trainer.grad_accum}"
        raise ConfigError("data.batch_size", cfg.data.batch_size, f"{fix} (e.g. data.batch_size={parts})")
    return dims


def micro_batch(cfg, dims: ParallelDims) -> int:
    """B: samples per rank per forward (one of trainer.grad_accum micro-batches; the dry run simulates one)."""
    return cfg.data.batch_size // (dims.dp * cfg.trainer.grad_accum)


@contextlib.contextmanager
def fake_world(world_size: int):
    """This process as rank 0 of a fake process group of `world_size` ranks (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("launcher=dryrun needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def text_tokens(cfg) -> int:
    """T: text tokens per caption the DiT sees (the encoder pads / truncates to this)."""
    return cfg.text.llm_max_tokens if cfg.text.encoder == "hf" else cfg.text.max_tokens


class DryRunTask(DiTTextToVideo):
    """The dit_t2v task without data: the same model, layout, loss and phases; a FakeTensor batch of the configured
    clip shape; materialize allocates FakeTensors instead of initialising weights."""

    def __init__(self, cfg, mode: FakeTensorMode | None):
        self.cfg, self.mode, self.stream = cfg, mode, None
        self.dit_cfg = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
        self.tokens_per_sample = self.dit_cfg.video_tokens(cfg.data.frames, cfg.data.height, cfg.data.width)

    def materialize(self, model, device):
        with self.mode:
            return model.to_empty(device=device)

    def local_batch(self, step: int, cursor: int, dp_rank: int, dp: int) -> dict:
        c, B, T = self.dit_cfg, self.cfg.data.batch_size // (dp * self.cfg.trainer.grad_accum), text_tokens(self.cfg)
        f, h, w = latent_shape(self.cfg.data.frames, self.cfg.data.height, self.cfg.data.width)
        with self.mode:
            text = TextBatch(
                states=torch.randn(B, T, c.text_dim),  # [B, T, Dt]
                mask=torch.ones(B, T, dtype=torch.bool),  # [B, T]
                pooled=torch.randn(B, c.pooled_dim),  # [B, Dp]
            )
            return {
                "latents": torch.randn(B, c.in_channels, f, h, w),  # [B, C, F, H, W]
                "noise": torch.randn(B, c.in_channels, f, h, w),  # [B, C, F, H, W]
                "sigma": torch.rand(B),  # [B]
                "guidance": torch.full((B,), 6000.0),  # [B]
                "text": text,
            }


# --------------------------------------------------------------------------------------------------------------
# collectives per mesh dimension
# --------------------------------------------------------------------------------------------------------------
class MeshCollectives(CollectiveBytes):
    """`by_dim[dim][kind]` / `counts_by_dim[dim][kind]`: payload bytes per rank of every collective (comm_accounting's
    convention), keyed by the mesh dimension whose process group ran it ("world" for the default group)."""

    def __init__(self, dims: ParallelDims):
        super().__init__()
        self.names = {dims.mesh[n].get_group().group_name: n for n in MESH_DIMS}
        self.names.setdefault(dist.group.WORLD.group_name, "world")
        self.sizes = {n: dims.mesh[n].size() for n in MESH_DIMS} | {"world": dims.world_size}
        self.by_dim: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.counts_by_dim: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(self, kind: str, nbytes: int, args: tuple, kwargs: dict) -> None:
        super().record(kind, nbytes, args, kwargs)
        dim = self._dim(args, kwargs)
        self.by_dim[dim][kind] += nbytes
        self.counts_by_dim[dim][kind] += 1

    def _dim(self, args, kwargs) -> str:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.ScriptObject):  # a c10d op's boxed ProcessGroup (or ReduceOp: skipped)
                try:
                    a = dist.ProcessGroup.unbox(a)
                except RuntimeError:
                    continue
            name = a if isinstance(a, str) else getattr(a, "group_name", None)
            if name in self.names:
                return self.names[name]
            if isinstance(a, dist.ProcessGroup):  # a group outside the mesh's named dims (USP's ring / Ulysses)
                dim = f"other_{a.size()}"
                self.sizes[dim] = a.size()
                return dim
        return "other"

    def report(self) -> dict:
        """{dim: {"size", "payload": {kind: bytes}, "wire": bytes, "counts": {kind: n}}} for the dims that talked."""
        out = {}
        for dim, by_kind in sorted(self.by_dim.items()):
            g = self.sizes.get(dim, 0)
            payload = {k: by_kind[k] for k in KINDS if by_kind.get(k)}
            wire = wire_bytes(payload, g) if g else sum(payload.values())  # an unknown group: its whole payload
            out[dim] = {"size": g, "payload": payload, "wire": int(wire), "counts": dict(self.counts_by_dim[dim])}
        return out


# --------------------------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------------------------
class Clock:
    """Wall and CPU seconds per phase (on a shared machine the CPU seconds are what the simulation costs)."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.phases[name] = {"wall_s": round(now[0] - self._last[0], 1), "cpu_s": round(now[1] - self._last[1], 1)}
        self._last = now

    def total(self) -> dict[str, float]:
        return {k: round(sum(p[k] for p in self.phases.values()), 1) for k in ("wall_s", "cpu_s")}


def init_optimizer_state(model, optimizer) -> None:
    """Create AdamW's moments (a step on zero gradients), so the measured step is a steady-state one."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_backward(task: DryRunTask, model, batch: dict, tracker, clock: Clock) -> dict:
    """The recipe's loss under trainer.precision's autocast, then backward (run_phases' order, no values read back).
    Returns what is live right after the forward."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=task.cfg.trainer.precision == "bf16"):
        (phase,) = list(task.phases(model, batch, 1, torch.device("cpu")))
    after_forward = _snapshot(tracker.get_tracker_snapshot("current"))
    clock.lap("forward")
    phase.loss.backward()
    clock.lap("backward")
    return after_forward


def clip_and_step(cfg, model, optimizer, clock: Clock) -> None:
    """Gradient clipping and the AdamW step, outside the memory tracker: DTensor's sharding propagation of the
    per-parameter norms builds global-shape FakeTensors in our own FakeTensorMode, which the tracker would count as
    memory (the whole fp32 gradient at once); the real temporaries here are scalars and one parameter's AdamW update."""
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
    optimizer.step()
    clock.lap("clip_and_optimizer")


def _snapshot(snap: dict) -> dict[str, int]:
    """FSDPMemTracker's {device: {kind: bytes}} -> {kind name: bytes} (one device here)."""
    (per_kind,) = snap.values()
    return {getattr(k, "value", k): int(v) for k, v in per_kind.items()}


def checkpoint_bytes(model, optimizer, ema: EMA | None) -> dict[str, int]:
    """Bytes DCP's DefaultSavePlanner would write from this rank for "model", "optim" (and "ema"): its local plan of
    the checkpointer's state dict, without I/O."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    out = {}
    parts = {"model": model_sd, "optim": optim_sd} | ({EMA_KEY: ema.state_dict()} if ema is not None else {})
    for key, sd in parts.items():
        planner = DefaultSavePlanner()
        planner.set_up_planner({key: sd}, is_coordinator=True)
        total = 0
        for item in planner.create_local_plan().items:
            if item.type == WriteItemType.BYTE_IO:
                continue  # pickled scalars (param group settings): a few bytes each
            numel = torch.Size(item.tensor_data.chunk.sizes).numel()
            total += numel * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
        out[key] = total
    return out


def build(task: DryRunTask, cfg, dims: ParallelDims):
    """(model, optimizer) as the trainer sets them up, on FakeTensors, with AdamW's state already created."""
    dims.build_mesh("cpu")  # fake-backend groups; setup_model then finds the mesh built
    model = setup_model(task, cfg, dims, DistContext(0, dims.world_size, 0, torch.device("cpu")))
    with task.mode:
        optimizer = build_optimizer(model, cfg.optim)  # per-parameter AdamW (CPU default; foreach: 15x slower here)
        init_optimizer_state(model, optimizer)
    return model, optimizer


def simulate(cfg) -> dict:
    """One step of `cfg` on launcher.world_size simulated ranks; returns the dryrun.json record (rank 0's bytes)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    clock = Clock()
    dims = check_dryrun(cfg)
    with fake_world(dims.world_size):
        task = DryRunTask(cfg, FakeTensorMode(allow_non_fake_inputs=True))  # the mesh's own rank tensor is real
        model, optimizer = build(task, cfg, dims)
        clock.lap("setup")
        with task.mode:
            batch = task.local_batch(1, 0, 0, dims.dp)
            tracker, comms = FSDPMemTracker(model, optimizer), MeshCollectives(dims)
            with comms:
                with tracker:
                    after_forward = forward_backward(task, model, batch, tracker, clock)
                clip_and_step(cfg, model, optimizer, clock)
            states = model_state_bytes(model, optimizer)
            ema = EMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None  # made before the step
            states["ema"] = sum(tensor_bytes(t) for t in ema.shadow.values()) if ema is not None else 0
        ckpt = checkpoint_bytes(model, optimizer, ema)  # outside the mode: DTensor offsets read the (real) mesh
        clock.lap("checkpoint_plan")
    peak = _snapshot(tracker.get_tracker_snapshot("peak"))
    return _record(cfg, dims, states, after_forward, peak, comms.report(), ckpt, clock)


# --------------------------------------------------------------------------------------------------------------
# the record
# --------------------------------------------------------------------------------------------------------------
def plan_figures(cfg, dims: ParallelDims) -> dict:
    """vidtron-plan's per-rank estimate (memory_model.estimate) for this layout, policy and clip, in bytes."""
    dit = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
    act = 2 if cfg.trainer.precision == "bf16" else 4
    grid = latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
    w = Workload(grid, text_tokens(cfg), micro_batch(cfg, dims), act, act)
    z = cfg.parallel.zero.stage
    lay = Layout(dims.tp, dims.cp, dims.cp_mode, dims.ulysses, dims.dp_shard, dims.dp_replicate, z)
    m = cfg.memory
    pol = Policy(m.recompute, m.selective, m.recompute_blocks, m.offload_blocks)
    est = estimate(dit, w, lay, pol, param_shapes(dit))
    s = est.states
    return {
        "layout": lay.name,
        "param_bytes_assumed": w.param_bytes,
        "params": s.params,
        "grads": s.grads,
        "optimizer": s.optimizer,
        "unsharded_params": s.unsharded,
        "grad_buffers": s.grad_buffers,
        "activations": est.acts.device,
        "working": est.working,
        "comm_buffers": est.comm_buffers,
        "peak": est.peak,
        "peak_before_slack": int((est.peak - est.reserve) / (1 + est.fragmentation)),  # without slack and reserve
        "comm_wire": {k: int(v) for k, v in comm_bytes(dit, w, lay, pol).items()},  # fsdp, tp, ring, ulysses
    }


def _record(cfg, dims, states, after_forward, peak, comms, ckpt, clock: Clock) -> dict:
    return {
        "layout": {"world_size": dims.world_size, "name": dims.layout_name, "zero_stage": cfg.parallel.zero.stage}
        | {k: getattr(dims, k) for k in ("dp_replicate", "dp_shard", "cp", "tp", "cp_mode", "ulysses")},
        "workload": {k: getattr(cfg.data, k) for k in ("frames", "height", "width")}
        | {"flavor": cfg.model.flavor, "micro_batch": micro_batch(cfg, dims), "text_tokens": text_tokens(cfg)}
        | {"precision": cfg.trainer.precision, "memory": dataclasses.asdict(cfg.memory)},
        "per_rank_bytes": {
            "params": states["params"],
            "grads": states["grads"],
            "optimizer": states["optimizer"],
            "activations": after_forward.get("Activation", 0),  # live after forward (saved for backward + outputs)
            "peak_activations": peak.get("Activation", 0),  # at the step's peak
            "ema": states["ema"],  # trainer.ema_decay > 0: a copy of the params, sharded like them (not tracked)
            "peak_total": peak["Total"] + states["ema"],
        },
        "after_forward": after_forward,  # FSDPMemTracker's kinds, live right after the loss
        "at_peak": peak,  # the same at the step's peak
        "collectives_per_step": comms,
        "checkpoint_bytes_per_rank": ckpt,
        "plan": plan_figures(cfg, dims),
        "seconds": clock.total() | {"phases": clock.phases},
    }


def format_summary(rec: dict) -> str:
    """A few lines: ours next to vidtron-plan's per rank (GiB, or MiB for small models); wire GB per mesh dimension."""
    ours, plan = rec["per_rank_bytes"], rec["plan"]
    rows = [("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"), ("activations", "activations")]
    rows += [("peak_total", "peak_before_slack")]
    unit, size = ("GiB", GIB) if ours["peak_total"] >= GIB else ("MiB", 2**20)
    lay, t = rec["layout"], rec["seconds"]
    lines = [f"dry run {lay['name']} (world {lay['world_size']}): {t['wall_s']} s ({t['cpu_s']} s CPU); {unit}/rank:"]
    lines += [f"  {a:<12} {ours[a] / size:9.3f}   plan {plan[b] / size:9.3f}" for a, b in rows]
    lines.append(
        f"  (plan's peak_total: its terms before 5% slack + 3 GiB reserve; with them {plan['peak'] / GIB:.2f} GiB)"
    )
    for dim, c in rec["collectives_per_step"].items():
        lines.append(f"  {dim:<12} group {c['size']:>3}: {c['wire'] / 1e9:8.2f} GB on the wire ({c['payload']})")
    planned = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan["comm_wire"].items() if v)
    lines.append(f"  plan's wire GB: {planned}")
    return "\n".join(lines)


def dryrun(cfg) -> int:
    """launcher=dryrun: simulate, write <run_dir>/dryrun.json, print the summary."""
    rec = simulate(cfg)
    out = Path(cfg.run_dir) / "dryrun.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    print(format_summary(rec))
    print(f"wrote {out}")
    return 0
