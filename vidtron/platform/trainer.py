"""The training loop shared by every recipe: layout, resume, steps, the update, metrics, checkpoints.

`Trainer(cfg, task, ctx).fit()` runs (or continues) a run to cfg.trainer.steps on every rank. The task contract is
vidtron/platform/task.py; the update step every recipe shares is vidtron/platform/update.py. Step numbers count
completed optimizer steps: the checkpoint `step_N` holds the state after N steps, and a resumed run continues with
step N + 1 at the saved data position.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vidtron.errors import ConfigError
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.materialize import on_meta
from vidtron.parallel.options import ParallelizeOptions
from vidtron.platform import checkpoint as ckpt
from vidtron.platform.compose import to_dict
from vidtron.platform.config import OptimConfig, ParallelConfig, TrainConfig
from vidtron.platform.distributed import DistContext
from vidtron.platform.ema import CHECKPOINT_KEY as EMA_KEY
from vidtron.platform.ema import EMA
from vidtron.platform.faults import FaultInjector
from vidtron.platform.heartbeat import Heartbeat, stragglers
from vidtron.platform.metrics import MetricsLogger, log_event
from vidtron.platform.perf import mfu, peak_memory_gib, peak_tflops
from vidtron.platform.prefetch import Prefetcher
from vidtron.platform.task import OptionalHooks, hooks
from vidtron.platform.update import StepResult, UpdatePolicy, run_accumulated, run_phases

# restart counters the launchers set: torchrun (in-job restarts), SLURM (requeues), Ray (worker-group restarts)
RESTART_COUNTERS = {
    "torchrun": "TORCHELASTIC_RESTART_COUNT",
    "slurm": "SLURM_RESTART_COUNT",
    "ray": "VIDTRON_RAY_ATTEMPT",
}


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    cursor: int = 0  # data position: samples of the global stream consumed (bucketed streams: global batches)
    losses: list[float] = field(default_factory=list)  # this process's logged losses, for tests and summaries
    bad_in_row: int = 0  # NaN/inf steps in a row (skipped, no optimizer update)
    skipped_steps: int = 0  # NaN/inf steps skipped by this process
    rollbacks: int = 0  # rollbacks to the last checkpoint by this process
    bad_window: list[tuple[int, list]] = field(default_factory=list)  # (cursor, sample keys) of the NaN streak
    skip: set[int] = field(default_factory=set)  # data cursors never trained again (bad batches; checkpointed)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the (parallelized) model after training


def build_dims(p: ParallelConfig, world_size: int) -> ParallelDims:
    """ParallelDims from the config; dp_shard=-1 takes whatever the world size leaves."""
    rest = p.dp_replicate * p.cp * p.tp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % rest:
            raise ConfigError("parallel", f"dp_replicate*cp*tp={rest}", f"must divide the {world_size} processes")
        dp_shard = world_size // rest
    dims = ParallelDims(
        dp_replicate=p.dp_replicate, dp_shard=dp_shard, cp=p.cp, tp=p.tp, cp_mode=p.cp_mode, ulysses=p.ulysses
    )
    dims.validate_world(world_size)
    return dims


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warmup to o.lr, then cosine down to o.lr * o.min_lr_ratio at total_steps (step is 1-based)."""
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    span = max(total_steps - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / span, 1.0)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _dp_coords(dims: ParallelDims, ctx: DistContext) -> tuple[int, int]:
    if not ctx.distributed:
        return 0, 1
    return dims.mesh["dp"].get_local_rank(), dims.dp


def build_optimizers(groups: dict[str, list[dict]], o: OptimConfig) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per name from its param groups; a group may carry `lr_scale` (times the scheduled LR) and its own
    AdamW settings (e.g. `betas`), which override optim.*."""
    out = {}
    for name, param_groups in groups.items():
        scaled = [{**g, "lr": o.lr * g.get("lr_scale", 1.0)} for g in param_groups]
        out[name] = torch.optim.AdamW(scaled, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    return out


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The single AdamW of a task without optimizer_groups."""
    return build_optimizers({"model": [{"params": list(model.parameters())}]}, o)["model"]


def setup_model(task, cfg: TrainConfig, dims: ParallelDims, ctx: DistContext) -> torch.nn.Module:
    """The task's model, laid out by `dims` (the mesh is built here when distributed), on this rank's device. A model
    built on the meta device is laid out first and then materialised: each rank allocates only its shards."""
    model = task.build_model()
    if ctx.distributed:
        dims.build_mesh(ctx.device.type, cfg.trainer.collective_timeout_s)
    zero = cfg.parallel.zero
    param_dtype = "bfloat16" if cfg.trainer.bf16 else "float32"
    opts = ParallelizeOptions(zero.stage, zero.engine, param_dtype, cfg.memory, compile=cfg.trainer.compile)
    model = task.parallelize(model, dims, opts)
    if not on_meta(model):
        return model.to(ctx.device)
    materialize = hooks(task).materialize
    if materialize is None:
        raise TypeError(f"{type(task).__name__}.build_model returned meta parameters but the task has no materialize")
    return materialize(model, ctx.device)


class Trainer:
    """One run on this rank: the laid-out model, its optimizers, the run state and the loop."""

    def __init__(self, cfg: TrainConfig, task, ctx: DistContext):
        self.cfg, self.task, self.ctx = cfg, task, ctx
        self.hooks: OptionalHooks = hooks(task)
        self.dims = build_dims(cfg.parallel, ctx.world_size)
        task.validate_layout(self.dims)
        self.model = self._setup_model()
        self.optimizers = self._setup_optimizers()
        self.faults = FaultInjector(cfg.faults, cfg.run_dir, ctx.rank, ctx.world_size)
        self.dp_rank, self.dp = _dp_coords(self.dims, ctx)
        self.policy = UpdatePolicy(
            grad_clip=cfg.optim.grad_clip,
            bf16=cfg.trainer.bf16,
            dp_group=self.dims.mesh["dp"].get_group() if ctx.distributed and self.dp > 1 else None,
            poison=self.faults.poison,
        )
        self.ema = EMA(self.model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
        self.peak_tflops = peak_tflops(cfg.trainer.peak_tflops, cfg.trainer.bf16)
        self.prefetcher = (
            Prefetcher(self._batches, self._advance, cfg.trainer.prefetch) if cfg.trainer.prefetch else None
        )
        self.state = TrainState(skip=set(cfg.trainer.skip_batches))
        self._last_step_time = 0.0

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _setup_model(self) -> torch.nn.Module:
        return setup_model(self.task, self.cfg, self.dims, self.ctx)

    def _setup_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        groups_of = self.hooks.optimizer_groups
        groups = groups_of(self.model) if groups_of else {"model": [{"params": list(self.model.parameters())}]}
        optimizers = build_optimizers(groups, self.cfg.optim)
        if self.cfg.parallel.zero.engine != "deepspeed":
            return optimizers
        if len(optimizers) > 1:
            raise ConfigError(
                "parallel.zero.engine",
                "deepspeed",
                f"recipe={self.cfg.recipe} trains several optimizers, which the deepspeed engine does not; use fsdp2",
            )
        from vidtron.parallel import deepspeed_zero

        ((name, optimizer),) = optimizers.items()
        self.model, engine = deepspeed_zero.initialize(self.model, optimizer, self.cfg, self.dims)
        return {name: engine}

    @property
    def checkpointed_optimizer(self):
        """What checkpoints hold: the one optimizer, or the list of them (state flattened by parameter name)."""
        opts = list(self.optimizers.values())
        return opts[0] if len(opts) == 1 else opts

    # ---- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Run (or continue) training to cfg.trainer.steps."""
        cfg, ctx, state = self.cfg, self.ctx, self.state
        self._resume()
        if ctx.is_main:
            _log_start(cfg, state, self.dims, ctx)
        logger = MetricsLogger(
            cfg.run_dir, ctx.is_main, cfg.trainer.steps, state.step, to_dict(cfg), cfg.metrics.wandb,
            cfg.metrics.wandb_project, cfg.trainer.progress,
        )  # fmt: skip
        saver = ckpt.Checkpointer(cfg.run_dir, ctx, cfg.trainer.keep_last, cfg.trainer.async_checkpoint, self.faults)
        heart = None
        try:
            end = _last_step(cfg, state.step)
            while state.step < end:
                self.train_step(logger)
                heart = heart or Heartbeat(cfg.run_dir, ctx.rank, cfg.trainer.hang_timeout_s)  # after step 1 (compile)
                heart.beat(state.step, self._last_step_time)
                self.faults.after_step(state.step)
                saver.poll()
                if state.bad_in_row >= cfg.trainer.max_bad_steps:
                    saver.wait()
                    self._rollback()
                elif state.step == end or (_checkpoint_due(cfg, state.step) and not state.bad_in_row):
                    meta, extra = self._checkpoint_meta(), self._extra_state()
                    saver.save(state.step, self.model, self.checkpointed_optimizer, meta, extra=extra)
                heart.beat(state.step, self._last_step_time)
            saver.wait()
        except Exception as err:  # recorded for the restart history; the launcher restarts the group
            why = f"{type(err).__name__}: {err}"[:500]
            log_event(cfg.run_dir, "failure", rank=ctx.rank, step=state.step, error=why)
            raise
        finally:
            logger.close()
            if heart is not None:
                heart.stop()
            if self.prefetcher is not None:
                self.prefetcher.close()
        state.model = self.model
        return state

    def train_step(self, logger: MetricsLogger | None = None) -> StepResult:
        """One optimizer step of every optimizer; a NaN/inf loss or gradient norm skips the update (counted in
        state.bad_in_row) and the data position moves on either way."""
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        step = state.step + 1
        lr = lr_at(step, cfg.optim, cfg.trainer.steps)
        while state.cursor in state.skip:  # a batch that failed before: move past it, do not train it again
            state.cursor = self._advance(state.cursor)
        micro, data_wait = self._get_batches(step, state.cursor)
        self.policy.poison = self._poison([k for b in micro for k in b.get("indices", ())])
        result = self._update(micro, step, lr)
        if self.ema is not None and result.finite:
            self.ema.update(self.model)
        state.bad_in_row = 0 if result.finite else state.bad_in_row + 1
        state.skipped_steps += not result.finite
        if result.finite:
            state.bad_window.clear()
        else:
            state.bad_window.append((state.cursor, [k for b in micro for k in b.get("indices", ())]))
        state.step, state.cursor = step, self._advance(state.cursor)
        state.losses.append(result.loss)
        self._last_step_time = time.perf_counter() - t0
        if logger is not None and (step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps):
            logger.log(self._record(step, lr, result, micro[0], time.perf_counter() - t0, data_wait))
        return result

    def _poison(self, keys: list):
        """The fault drills' loss poisoning for this step's samples (`faults.nan_at_step`, `faults.nan_sample`)."""
        return lambda loss, step: self.faults.poison(loss, step, keys)

    def _advance(self, cursor: int) -> int:
        advance = self.hooks.next_cursor
        return advance(cursor) if advance else cursor + self.cfg.data.batch_size

    def _batches(self, step: int, cursor: int) -> list[dict]:
        """This rank's batch of `step`, as trainer.grad_accum micro-batches (each a 1/K share: the data order is the
        same as without accumulation)."""
        k = self.cfg.trainer.grad_accum
        return [self.task.local_batch(step, cursor, self.dp_rank * k + i, self.dp * k) for i in range(k)]

    def _get_batches(self, step: int, cursor: int) -> tuple[list[dict], float]:
        """(micro-batches, seconds waited for them): from the prefetch thread, or made here."""
        if self.prefetcher is not None:
            return self.prefetcher.get(step, cursor)
        t0 = time.perf_counter()
        return self._batches(step, cursor), time.perf_counter() - t0

    def _update(self, micro: list[dict], step: int, lr: float) -> StepResult:
        device = self.ctx.device
        phases = [self.task.phases(self.model, b, step, device) for b in micro]
        if len(phases) == 1:
            return run_phases(phases[0], self.optimizers, lr, step, self.policy, device.type)
        return run_accumulated(phases, self.optimizers, lr, step, self.policy, device.type, self.model)

    def _record(self, step: int, lr: float, result: StepResult, batch: dict, dt: float, data_wait: float) -> dict:
        samples = batch.get("global_samples", self.cfg.data.batch_size)  # buckets: this step's global batch
        tokens = batch.get("global_tokens", samples * self.task.tokens_per_sample)
        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm}
        record |= {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "step_time_s": dt}
        record |= {"data_wait_s": data_wait, **peak_memory_gib(self.ctx.device), **result.metrics}
        flops = samples * self.hooks.flops_per_sample
        if (util := mfu(flops, dt, self.ctx.world_size, self.peak_tflops)) is not None:
            record["mfu"] = util
        if self.ctx.distributed:
            record |= self._straggler_fields(step, dt)
        if not result.finite:
            record |= {"skipped": True, "skipped_steps": self.state.skipped_steps}
        return record

    def _straggler_fields(self, step: int, dt: float) -> dict:
        """Every rank's step time (one small all-gather); ranks over trainer.straggler_ratio x the median are logged
        (metrics: the slowest rank and its time; events.jsonl: a `straggler` line)."""
        times = torch.zeros(self.ctx.world_size)
        dist.all_gather_into_tensor(times, torch.tensor([dt]))
        slow = stragglers(times.tolist(), self.cfg.trainer.straggler_ratio)
        if slow and self.ctx.is_main:
            log_event(
                self.cfg.run_dir, "straggler", step=step, ranks=slow, step_times=[round(t, 4) for t in times.tolist()]
            )
        return {"step_time_max_s": float(times.max()), "step_time_max_rank": int(times.argmax())}

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = _resume_path(self.cfg, self.ctx)
        if path is None:
            return
        manifest = self._load(path)
        if self.ctx.is_main:
            log_event(self.cfg.run_dir, "resume", step=manifest["step"], path=str(path))
        self.state.step, self.state.cursor = manifest["step"], manifest["data"]["cursor"]
        self.state.skip |= set(manifest["data"].get("skip", ()))

    def _rollback(self) -> None:
        """trainer.max_bad_steps NaN/inf steps in a row: reload the newest valid checkpoint (model, optimizer, RNG,
        data position) and continue from there."""
        cfg, state = self.cfg, self.state
        bad_step = state.step
        path = ckpt.latest_valid_checkpoint(cfg.run_dir, self.ctx)
        if path is None or state.rollbacks >= cfg.trainer.max_rollbacks:
            why = "no committed checkpoint to roll back to" if path is None else f"{state.rollbacks} rollbacks already"
            raise RuntimeError(
                f"{state.bad_in_row} NaN/inf steps in a row at step {bad_step} and {why}; lower optim.lr, "
                "checkpoint more often (trainer.checkpoint_every) or raise trainer.max_bad_steps / trainer.max_rollbacks"
            )
        manifest = self._load(path)
        state.step, state.cursor = manifest["step"], manifest["data"]["cursor"]
        state.bad_in_row, state.rollbacks = 0, state.rollbacks + 1
        skipped, state.bad_window = state.bad_window, []
        if cfg.trainer.skip_bad_batches:  # the replay moves past these batches: a bad sample cannot loop
            state.skip |= {cursor for cursor, _ in skipped}
            keys = [{"cursor": c, "samples": [str(k) for k in ks]} for c, ks in skipped]
            log_event(cfg.run_dir, "batches-skipped", rank=self.ctx.rank, step=bad_step, batches=keys)
        if self.ctx.is_main:
            log_event(cfg.run_dir, "rollback", from_step=bad_step, to_step=state.step, path=str(path))

    def _extra_state(self) -> dict | None:
        """Checkpointed beside model and optimizer: the EMA weights, when trainer.ema_decay > 0."""
        return {EMA_KEY: self.ema.state_dict()} if self.ema is not None else None

    def _load(self, path) -> dict:
        """Model, optimizer, RNG (and the EMA: a checkpoint written without one starts it from the loaded weights)."""
        extra = self._extra_state()
        manifest = ckpt.load_checkpoint(
            path, self.model, self.checkpointed_optimizer, self.ctx, extra=extra, extra_optional=True
        )
        if self.ema is not None and EMA_KEY in manifest.get("extra_missing", ()):
            self.ema = EMA(self.model, self.cfg.trainer.ema_decay)
        return manifest

    def _checkpoint_meta(self) -> dict:
        d = self.dims
        layout = {"name": d.layout_name, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "cp": d.cp, "tp": d.tp}
        return {
            "layout": layout,
            "config": to_dict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "data": self._data_position(),
        }

    def _data_position(self) -> dict:
        """The manifest's data position: the cursor and its unit (samples of the global stream, or global batches
        for bucketed streams, whose batch size varies by bucket)."""
        unit = self.hooks.cursor_unit
        return {
            "cursor": self.state.cursor,
            "skip": sorted(self.state.skip),  # bad batches (data cursors) a resumed run must not train again
            "cursor_unit": unit,
            **({"global_batch": self.cfg.data.batch_size} if unit == "samples" else {}),
        }


def train(cfg: TrainConfig, task, ctx: DistContext) -> TrainState:
    """Run (or continue) training to cfg.trainer.steps; every rank calls this."""
    return Trainer(cfg, task, ctx).fit()


def _resume_path(cfg: TrainConfig, ctx: DistContext):
    """The checkpoint to resume from (None: start fresh): trainer.resume = auto | never | a step_N folder."""
    if cfg.trainer.resume == "never":
        return None
    if cfg.trainer.resume != "auto":
        path = ckpt.Path(cfg.trainer.resume)
        if not (path / ckpt.MANIFEST).exists():
            fix = "not a committed checkpoint folder; use auto, never or a step_N path"
            raise ConfigError("trainer.resume", cfg.trainer.resume, fix)
        return path

    def skipped(p, why):
        log_event(cfg.run_dir, "checkpoint-skipped", path=str(p), reason=why)

    return ckpt.latest_valid_checkpoint(cfg.run_dir, ctx, on_skip=skipped)


def _log_start(cfg: TrainConfig, state: TrainState, dims: ParallelDims, ctx: DistContext) -> None:
    """`start`, preceded by `restart` when a launcher restarted this run (its counters say which attempt)."""
    attempts = {k: int(os.environ[v]) for k, v in RESTART_COUNTERS.items() if os.environ.get(v, "0") not in ("", "0")}
    if attempts:
        log_event(cfg.run_dir, "restart", step=state.step, launcher=cfg.launcher.kind, attempts=attempts)
    log_event(cfg.run_dir, "start", step=state.step, layout=dims.layout_name, world=ctx.world_size)


def _last_step(cfg: TrainConfig, start: int) -> int:
    """Where this process stops: the end of training, or earlier with trainer.stop_after_steps."""
    if cfg.trainer.stop_after_steps > 0:
        return min(cfg.trainer.steps, start + cfg.trainer.stop_after_steps)
    return cfg.trainer.steps


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    every = cfg.trainer.checkpoint_every
    return step == cfg.trainer.steps or (every > 0 and step % every == 0)
