"""DeepSpeed ZeRO 1/2/3: the second data-parallel engine behind the same trainer (`parallel.zero.engine=deepspeed`).

    model, optimizer = initialize(model, adamw, cfg, dims)   # model: the DeepSpeed engine (forward = the DiT's)
    loss = task.loss(model, batch, device)                    # ZeRO-3 gathers each block's parameters on the fly
    grad_norm = optimizer.update(loss)                        # backward, reduce, clip, AdamW step (or skip)

Who does what. DeepSpeed partitions the optimizer state (stage 1), + the gradients (2), + the parameters (3) over
every rank: with tp = 1 its data-parallel group is dp_shard x cp, which is also the group FSDP2 averages over
(CP ranks' gradients sum to cp x the gradient, see context_wrap.py). It averages and clips the gradients
(optim.grad_clip as `gradient_clipping`), skips a step whose gradients are not finite, and runs our torch AdamW on
its flat fp32 partitions. Ours: the model (parallelize_dit's CP and recompute/offload, no FSDP), bf16 autocast over
fp32 master weights (trainer.bf16, as with FSDP2), the LR schedule, and checkpoints.

Checkpoints. DeepSpeed's own `save_checkpoint` writes pickles (loading them would run an unrestricted unpickler)
and needs `ds_to_universal` before a run can change its world size, so it is not used. `checkpoint_state()`
returns the state dicts FSDP2's `get_state_dict` gives, with full tensors by parameter name, gathered with
DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`: collectives, every
rank in the same order); DCP writes each tensor once. `load_checkpoint_state` scatters them back
(`safe_set_full_*`) and refreshes the working weights. So a DeepSpeed checkpoint resumes under any world size and
stage and under FSDP2, and the reverse. Cost: during a save every rank holds the full fp32 model and Adam moments.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from vidtron.parallel.dims import ParallelDims
from vidtron.platform.errors import ConfigError

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
    micro = max(1, cfg.data.batch_size // dims.dp)  # DeepSpeed's bookkeeping only: batches come from the task
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
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * dims.dp * dims.cp,  # DeepSpeed's data-parallel world is every rank (tp = 1)
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
        """(model, optimizer) state dicts shaped like FSDP2's full `get_state_dict`; collective."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        model_sd = {**self.full_parameters(), **self._buffers()}
        step = self._step_count()
        state = {}
        for name, p in self.params.items():
            if p.requires_grad:
                moments = {k: safe_get_full_optimizer_state(p, k).reshape(self._shape(p)).cpu() for k in ADAM_MOMENTS}
                state[name] = {"step": torch.tensor(step), **moments}
        trainable = [n for n, p in self.params.items() if p.requires_grad]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": trainable} for g in self.base.param_groups
        ]
        return model_sd, {"state": state, "param_groups": groups}

    def load_checkpoint_state(self, model_sd: dict, optim_sd: dict) -> None:
        """Scatter full state dicts (from any engine and world size) into the partitions; collective."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        steps = set()
        for name, p in self.params.items():
            if not p.requires_grad:
                continue
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
            for i in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
