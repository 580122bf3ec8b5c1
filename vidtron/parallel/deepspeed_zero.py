"""DeepSpeed ZeRO 1/2/3: the second data-parallel engine behind the same trainer (`parallel.zero.engine=deepspeed`).

    model, optimizer = initialize(model, adamw, cfg, dims)   # model: the DeepSpeed engine (forward = the DiT's)
    loss = task.loss(model, batch, device)                    # ZeRO-3 gathers each block's parameters on the fly
    grad_norm = optimizer.update(loss)                        # backward, reduce, clip, AdamW step (or skip)

Who does what. DeepSpeed partitions the optimizer state (stage 1), + the gradients (2), + the parameters (3) over
every rank: with tp = 1 its data-parallel group is dp_shard x cp, which is also the group FSDP2 averages over
(CP ranks' gradients sum to cp x the gradient, see context_wrap.py). It averages and clips the gradients
(optim.grad_clip as `gradient_clipping`), skips a step whose gradients are not finite, and runs our torch AdamW on
its flat fp32 partitions. Ours: the model (parallelize_dit's CP and recompute/offload, no FSDP), bf16 autocast over
fp32 master weights (trainer.precision=bf16, as with FSDP2), the LR schedule, and checkpoints.

Checkpoints. DeepSpeed's own `save_checkpoint` writes pickles (loading them would run an unrestricted unpickler)
and needs `ds_to_universal` before a run can change its world size, so it is not used. `checkpoint_state()`
returns the state dicts FSDP2's `get_state_dict` gives, by parameter name and in each parameter's shape, but every
trainable tensor (fp32 master weight, exp_avg, exp_avg_sq) is a ShardedTensor whose local shards are views of this
rank's own slice of DeepSpeed's flat fp32 partition and Adam moments: the rank's contiguous range of the flattened
parameter, cut into at most 2 ndim - 1 boxes that are contiguous in memory (`_boxes`). Nothing is gathered (one
small all_gather_object of who owns which range); DCP writes each rank's slices and records them as chunks of the
named tensor, so the checkpoint reshards by name like FSDP2's. `load_checkpoint_state` receives the same views,
filled in place by DCP from any layout (DeepSpeed at any world size or stage, FSDP2, one process), and refreshes
the working weights. Frozen parameters (no fp32 partition) are gathered one at a time.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

from vidtron.errors import ConfigError
from vidtron.parallel.dims import ParallelDims

INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation -c constraints.txt 'vidtron[deepspeed]'"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def import_deepspeed():
    """`deepspeed`, set up for this machine (CPU accelerator without CUDA); ConfigError when it is absent."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401 - the attribute `deepspeed.comm.torch` is torch itself
    except ImportError as err:
        raise ConfigError("parallel.zero.engine", "deepspeed", f"DeepSpeed is not installed; run {INSTALL}") from err
    if not torch.cuda.is_available():  # else every start JIT-builds a CPU shm op (~30 s, g++, 1.6 GB)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # DeepSpeed still calls the deprecated names
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)
    return deepspeed


def ds_config(cfg, dims: ParallelDims) -> dict:
    """The DeepSpeed config for a TrainConfig: ZeRO stage and buckets, clipping, fp32 (autocast is ours)."""
    z = cfg.parallel.zero
    accum = cfg.trainer.grad_accum
    micro = max(1, cfg.data.batch_size // (dims.dp * accum))  # DeepSpeed's bookkeeping only: batches come from the task
    zero = {
        "stage": z.stage,
        "contiguous_gradients": True,
        "overlap_comm": torch.cuda.is_available(),
        "reduce_bucket_size": z.ds_bucket_elements,
        "allgather_bucket_size": z.ds_bucket_elements,
    }
    if z.stage == 3:  # release each block's gathered parameters after use, as FSDP2's ZeRO-3 does (DeepSpeed's
        # default keeps up to 1e9 elements gathered between forward and backward, i.e. ZeRO-2 memory for small models)
        zero.update(
            stage3_param_persistence_threshold=z.ds_persist_below,
            stage3_max_live_parameters=z.ds_bucket_elements,
            stage3_max_reuse_distance=0,
            stage3_prefetch_bucket_size=0,
        )
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,  # engine.backward scales each micro-batch's loss by 1 / accum
        "train_batch_size": micro * accum * dims.dp * dims.cp,  # DeepSpeed's data-parallel world is every rank (tp = 1)
        "gradient_clipping": max(cfg.optim.grad_clip, 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: exactly what FSDP2 runs
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, dims: ParallelDims):
    """(engine, DeepSpeedZeRO) for a model already parallelized without FSDP; collective. A lone process (no
    process group) gets a one-rank gloo group, which DeepSpeed needs even then."""
    deepspeed = import_deepspeed()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, dims))
    return engine, DeepSpeedZeRO(engine)


def is_engine(model) -> bool:
    """True for a DeepSpeed engine (what the trainer returns as the model under parallel.zero.engine=deepspeed)."""
    return hasattr(model, "zero_optimization_stage") and hasattr(model, "optimizer")


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter of a DeepSpeed engine's model, whole (fp32 master values); collective."""
    return DeepSpeedZeRO(engine).full_parameters()


class DeepSpeedZeRO:
    """The trainer's optimizer handle for a DeepSpeed engine: LR groups, the update, full state in and out."""

    def __init__(self, engine):
        self.engine = engine
        self.zero = engine.optimizer  # DeepSpeed's ZeRO optimizer (stage 1/2 or 3)
        self.base: torch.optim.Optimizer = self.zero.optimizer  # our AdamW over the flat fp32 partitions
        self.stage = engine.zero_optimization_stage()
        self.params = dict(engine.module.named_parameters())

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def update(self, loss: torch.Tensor) -> float:
        """backward -> reduce (-scatter) -> clip -> AdamW step; the global gradient norm (inf/NaN: step skipped)."""
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def accumulate(self, loss: torch.Tensor, micro: int, count: int, discard: bool) -> float | None:
        """Micro-batch `micro` of `count` (trainer.grad_accum): backward (DeepSpeed scales by 1 / count); the last one
        reduces, clips and steps, returning the global gradient norm. We own the boundary
        (`set_gradient_accumulation_boundary`), so the engine's micro-step counter never decides. `discard`: the
        window had a non-finite loss (every rank agrees): its gradients are made NaN so that DeepSpeed's own overflow
        check drops the whole window's gradients and skips the step (NaN + x has finite gradients otherwise)."""
        last = micro == count - 1
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * float("nan") if discard else loss)
        if not last:
            return None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None or discard else float(norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    # ---- full state, by parameter name -----------------------------------------------------------------------

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, fp32 master values; collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.params.items():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            out[name] = self._gathered(p) if full is None else full.reshape(self._shape(p)).detach().cpu().clone()
        return out

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts shaped like FSDP2's `get_state_dict`, by parameter name; each trainable
        tensor a ShardedTensor over views of this rank's own partition (nothing gathered). Collective."""
        self._ensure_optimizer_state()
        local = {name: self._local_views(p) for name, p in self.params.items() if self._sliceable(p)}
        owners, devices = _owners({name: (start, views[0]) for name, (start, views) in local.items()})
        model_sd, state, step = {}, {}, self._step_count()
        for name, p in self.params.items():
            if name not in local:  # frozen (or 0-d): no fp32 partition; gathered whole, one parameter at a time
                model_sd[name] = self._gathered(p)
                continue
            boxes = [_boxes(s, s + n, self._shape(p)) for s, n in owners[name]]
            fp32, *moments = (_sharded(v, local[name][0], self._shape(p), boxes, devices) for v in local[name][1])
            model_sd[name] = fp32
            state[name] = {"step": torch.tensor(step), **dict(zip(ADAM_MOMENTS, moments))}
        model_sd.update(self._buffers())
        trainable = [n for n, p in self.params.items() if p.requires_grad]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": trainable} for g in self.base.param_groups
        ]
        return model_sd, {"state": state, "param_groups": groups}

    def load_checkpoint_state(self, model_sd: dict, optim_sd: dict) -> None:
        """After DCP filled `checkpoint_state()`'s tensors in place (from any engine and world size): the AdamW step,
        the buffers and the working weights. Full tensors (from an older caller) are scattered instead. Collective."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        steps = set()
        for name, p in self.params.items():
            if not p.requires_grad:
                continue
            if not isinstance(model_sd[name], ShardedTensor):
                safe_set_full_fp32_param(p, model_sd[name].to(torch.float32))
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(p, optim_sd["state"][name][key].to(torch.float32), key)
            steps.add(float(optim_sd["state"][name]["step"]))
        for flat in self._flat_partitions():
            self.base.state[flat]["step"] = torch.tensor(max(steps, default=0.0))
        buffers = dict(self.engine.module.named_buffers())
        for name in self._buffers():
            buffers[name].copy_(model_sd[name])
        self._refresh_working_weights()

    # ---- internals --------------------------------------------------------------------------------------------

    def _sliceable(self, p: nn.Parameter) -> bool:
        return p.requires_grad and len(self._shape(p)) > 0

    def _local_views(self, p: nn.Parameter) -> tuple[int, list[torch.Tensor]]:
        """(start, [fp32, exp_avg, exp_avg_sq]): this rank's range of the flattened parameter, as views of
        DeepSpeed's flat fp32 partition and of AdamW's state over it (writing them writes the partition)."""
        if self.stage < 3:
            frag = getattr(p, "_hp_mapping", None)
            if frag is None:  # this rank's partition holds none of it
                return 0, [torch.empty(0, dtype=torch.float32) for _ in range(1 + len(ADAM_MOMENTS))]
            start, n = frag.lp_fragment_address.start, frag.lp_fragment_address.numel
            flat = self.zero.single_partition_of_fp32_groups[frag.param_group_index]
            moments = [self.base.state[flat][k].narrow(0, frag.hp_fragment_address.start, n) for k in ADAM_MOMENTS]
            return start, [frag.hp_fragment, *moments]
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        full = safe_get_local_fp32_param(p)  # ceil(numel / world) elements; the last rank's end is padding
        start = full.numel() * self.zero._get_param_partition_rank(p)
        n = max(0, min(full.numel(), math.prod(self._shape(p)) - start))
        views = [full, *(safe_get_local_optimizer_state(p, k) for k in ADAM_MOMENTS)]
        return start, [v.narrow(0, 0, n) for v in views]

    @staticmethod
    def _shape(p: nn.Parameter) -> torch.Size:
        return getattr(p, "ds_shape", p.shape)

    def _gathered(self, p: nn.Parameter) -> torch.Tensor:
        """A frozen parameter, whole (ZeRO-3 holds only a partition of it)."""
        if self.stage < 3:
            return p.detach().cpu().clone()
        from deepspeed.zero import GatheredParameters

        with GatheredParameters([p]):
            return p.detach().cpu().clone()

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (whole on every rank under every stage)."""
        keys = set(self.engine.module.state_dict().keys()) - set(self.params)
        return {n: b.detach().cpu().clone() for n, b in self.engine.module.named_buffers() if n in keys}

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions, the tensors AdamW steps (and keys its state by). ZeRO-3 puts each
        into the AdamW's param group only for its own step, so they are read from the ZeRO optimizer."""
        if self.stage < 3:
            return list(self.zero.single_partition_of_fp32_groups)
        return list(self.zero.fp32_partitioned_groups_flat)

    def _step_count(self) -> float:
        steps = {float(self.base.state[flat]["step"]) for flat in self._flat_partitions() if self.base.state[flat]}
        if len(steps) > 1:
            raise RuntimeError(f"DeepSpeed partitions disagree on the AdamW step count: {sorted(steps)}")
        return steps.pop() if steps else 0.0

    def _ensure_optimizer_state(self) -> None:
        """AdamW creates its state at the first step; create it (zeros, step 0: what that step would) so the
        fragment API has something to read and write before then."""
        fresh = False
        for flat in self._flat_partitions():
            if not self.base.state[flat]:
                zeros = {k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in ADAM_MOMENTS}
                self.base.state[flat] = {"step": torch.tensor(0.0), **zeros}
                fresh = True
        if fresh and self.stage < 3:  # stage 1/2 link each parameter's fragment to the moments lazily
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()

    def _refresh_working_weights(self) -> None:
        """Copy the fp32 master partitions into the weights the forward uses."""
        if self.stage < 3:
            self.zero.update_lp_params()  # copy + all-gather the full parameters
        else:
            # as DeepSpeed's step does: release every gathered parameter, the persistent ones (ds_persist_below)
            # included, write the partitions, then gather the persistent ones again (else the next forward uses
            # their values from before the load)
            self.zero.checkpoint_event_prologue()
            for i in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
            self.zero.checkpoint_event_epilogue()


def _boxes(start: int, stop: int, shape: tuple[int, ...]) -> list[tuple[tuple, tuple, int]]:
    """The flat range [start, stop) of a row-major tensor of `shape` as boxes (offsets, sizes, flat start), each
    contiguous in memory: a partial first row, whole rows, a partial last row (recursively: <= 2 ndim - 1 boxes)."""
    if stop <= start:
        return []
    if not shape:
        return [((), (), start)]
    inner = math.prod(shape[1:])
    (row0, col0), (row1, col1) = divmod(start, inner), divmod(stop, inner)

    def within(row: int, lo: int, hi: int) -> list:
        return [((row, *o), (1, *s), row * inner + f) for o, s, f in _boxes(lo, hi, shape[1:])]

    if row0 == row1:
        return within(row0, col0, col1)
    out = within(row0, col0, inner) if col0 else []
    row0 += 1 if col0 else 0
    if row1 > row0:
        out.append(((row0, *[0] * (len(shape) - 1)), (row1 - row0, *shape[1:]), row0 * inner))
    return out + (within(row1, 0, col1) if col1 else [])


def _owners(mine: dict[str, tuple[int, torch.Tensor]]) -> tuple[dict[str, list[tuple[int, int]]], list[str]]:
    """({name: [(start, numel) of rank 0, rank 1, ...]}, [device of rank 0, ...]) from this rank's {name: (start,
    flat view)}: one all_gather_object of every rank's ranges (a few bytes per parameter)."""
    device = next((str(v.device) for _, v in mine.values() if v.numel()), "cpu")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ({name: (s, v.numel()) for name, (s, v) in mine.items()}, device))
    return {name: [ranges[name] for ranges, _ in everyone] for name in mine}, [d for _, d in everyone]


def _sharded(view: torch.Tensor, start: int, shape, boxes: list[list], devices: list[str]) -> ShardedTensor:
    """A ShardedTensor of `shape` whose shards are every rank's `boxes` (rank r's list at index r) and whose local
    shards are views of `view`, this rank's flat range starting at flat index `start` (no copy)."""
    rank, view = dist.get_rank(), view.detach()  # same storage: DCP's in-place load still lands in the partition
    metas, local = [], []
    for r, rank_boxes in enumerate(boxes):
        for offsets, sizes, flat_start in rank_boxes:
            meta = ShardMetadata(list(offsets), list(sizes), f"rank:{r}/{devices[r]}")
            metas.append(meta)
            if r == rank:
                local.append(Shard(view.narrow(0, flat_start - start, math.prod(sizes)).view(sizes), meta))
    props = TensorProperties(dtype=view.dtype)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, ShardedTensorMetadata(metas, torch.Size(shape), props)
    )
