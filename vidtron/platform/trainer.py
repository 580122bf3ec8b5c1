"""The training loop shared by every recipe: layout, resume, steps, metrics, checkpoints.

A recipe task provides `build_model()`, `validate_layout(dims)`, `parallelize(model, dims, opts)`,
`local_batch(step, cursor, dp_rank, dp)`, `loss(model, batch, device)` and `tokens_per_sample`, optionally
`next_cursor(cursor)` (the data position after a step; default: + batch_size samples). Step numbers count
completed optimizer steps: the checkpoint `step_N` holds the state after N steps, and a resumed run continues
with step N + 1 at the saved data position.
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

from vidtron.models.dit.parallelize import ParallelizeOptions
from vidtron.parallel.dims import ParallelDims
from vidtron.platform import checkpoint as ckpt
from vidtron.platform.compose import to_dict
from vidtron.platform.config import OptimConfig, ParallelConfig, TrainConfig
from vidtron.platform.distributed import DistContext
from vidtron.platform.errors import ConfigError
from vidtron.platform.faults import FaultInjector
from vidtron.platform.metrics import MetricsLogger, log_event

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


def _mean_over_world(x: torch.Tensor, ctx: DistContext) -> float:
    """Mean of per-rank values: TP ranks repeat a value, CP/DP ranks' means average to the global mean."""
    x = x.detach().clone()
    if ctx.distributed:
        dist.all_reduce(x)
        x /= ctx.world_size
    return float(x)


def _grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def setup_model(task, cfg: TrainConfig, dims: ParallelDims, ctx: DistContext) -> torch.nn.Module:
    model = task.build_model()
    if ctx.distributed:
        dims.build_mesh(ctx.device.type, cfg.trainer.collective_timeout_s)
    opts = ParallelizeOptions(
        zero_stage=cfg.parallel.zero.stage, zero_engine=cfg.parallel.zero.engine, memory=cfg.memory
    )
    return task.parallelize(model, dims, opts).to(ctx.device)


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )


def maybe_resume(cfg: TrainConfig, model, optimizer, ctx: DistContext) -> TrainState:
    if cfg.trainer.resume == "never":
        return TrainState()
    if cfg.trainer.resume == "auto":
        path = ckpt.latest_valid_checkpoint(
            cfg.run_dir,
            ctx,
            on_skip=lambda p, why: log_event(cfg.run_dir, "checkpoint-skipped", path=str(p), reason=why),
        )
    else:
        path = ckpt.Path(cfg.trainer.resume)
        if not (path / ckpt.MANIFEST).exists():
            raise ConfigError(
                "trainer.resume",
                cfg.trainer.resume,
                "not a committed checkpoint folder; use auto, never or a step_N path",
            )
    if path is None:
        return TrainState()
    manifest = ckpt.load_checkpoint(path, model, optimizer, ctx)
    if ctx.is_main:
        log_event(cfg.run_dir, "resume", step=manifest["step"], path=str(path))
    return TrainState(step=manifest["step"], cursor=manifest["data"]["cursor"])


def _checkpoint_meta(cfg: TrainConfig, dims: ParallelDims, state: TrainState, task) -> dict:
    return {
        "layout": {
            "name": dims.layout_name,
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "cp": dims.cp,
            "tp": dims.tp,
        },
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "data": _data_position(cfg, state, task),
    }


def _data_position(cfg: TrainConfig, state: TrainState, task) -> dict:
    """The manifest's data position: the cursor and its unit (a task's `cursor_unit`: samples of the global
    stream, or global batches for bucketed streams, whose batch size varies by bucket)."""
    unit = getattr(task, "cursor_unit", "samples")
    return {
        "cursor": state.cursor,
        "cursor_unit": unit,
        **({"global_batch": cfg.data.batch_size} if unit == "samples" else {}),
    }


def train(cfg: TrainConfig, task, ctx: DistContext) -> TrainState:
    """Run (or continue) training to cfg.trainer.steps; every rank calls this."""
    dims = build_dims(cfg.parallel, ctx.world_size)
    task.validate_layout(dims)
    model = setup_model(task, cfg, dims, ctx)
    optimizer = _build_optimizers(task, model, cfg)
    if cfg.parallel.zero.engine == "deepspeed":
        model, optimizer = _deepspeed(task, model, optimizer, cfg, dims)
    faults = FaultInjector(cfg.faults, cfg.run_dir, ctx.rank, ctx.world_size)
    state = maybe_resume(cfg, model, optimizer, ctx)
    if ctx.is_main:
        _log_start(cfg, state, dims, ctx)
    logger = MetricsLogger(
        cfg.run_dir,
        ctx.is_main,
        cfg.trainer.steps,
        state.step,
        to_dict(cfg),
        cfg.metrics.wandb,
        cfg.metrics.wandb_project,
        cfg.trainer.progress,
    )
    dp_rank, dp = _dp_coords(dims, ctx)
    saver = ckpt.Checkpointer(cfg.run_dir, ctx, cfg.trainer.keep_last, cfg.trainer.async_checkpoint, faults)
    try:
        end = _last_step(cfg, state.step)
        while state.step < end:
            _train_step(cfg, task, model, optimizer, state, dp_rank, dp, ctx, logger, faults)
            faults.after_step(state.step)
            saver.poll()
            if state.bad_in_row >= cfg.trainer.max_bad_steps:
                saver.wait()
                _rollback(cfg, model, optimizer, state, ctx)
            elif (_checkpoint_due(cfg, state.step) and not state.bad_in_row) or state.step == end:
                saver.save(state.step, model, optimizer, _checkpoint_meta(cfg, dims, state, task))
        saver.wait()
    except Exception as err:  # recorded for the restart history; the launcher restarts the group
        log_event(cfg.run_dir, "failure", rank=ctx.rank, step=state.step, error=f"{type(err).__name__}: {err}"[:500])
        raise
    finally:
        logger.close()
    state.model = model
    return state


def _log_start(cfg: TrainConfig, state: TrainState, dims: ParallelDims, ctx: DistContext) -> None:
    """`start`, preceded by `restart` when a launcher restarted this run (its counters say which attempt)."""
    attempts = {k: int(os.environ[v]) for k, v in RESTART_COUNTERS.items() if os.environ.get(v, "0") not in ("", "0")}
    if attempts:
        log_event(cfg.run_dir, "restart", step=state.step, launcher=cfg.launcher.kind, attempts=attempts)
    log_event(cfg.run_dir, "start", step=state.step, layout=dims.layout_name, world=ctx.world_size)


def _rollback(cfg: TrainConfig, model, optimizer, state: TrainState, ctx: DistContext) -> None:
    """trainer.max_bad_steps NaN/inf steps in a row: reload the newest valid checkpoint (model, optimizer, RNG,
    data position) and continue from there."""
    bad_step = state.step
    path = ckpt.latest_valid_checkpoint(cfg.run_dir, ctx)
    if path is None or state.rollbacks >= cfg.trainer.max_rollbacks:
        why = "no committed checkpoint to roll back to" if path is None else f"{state.rollbacks} rollbacks already"
        raise RuntimeError(
            f"{state.bad_in_row} NaN/inf steps in a row at step {bad_step} and {why}; lower optim.lr, "
            "checkpoint more often (trainer.checkpoint_every) or raise trainer.max_bad_steps / trainer.max_rollbacks"
        )
    manifest = ckpt.load_checkpoint(path, model, optimizer, ctx)
    state.step, state.cursor = manifest["step"], manifest["data"]["cursor"]
    state.bad_in_row, state.rollbacks = 0, state.rollbacks + 1
    if ctx.is_main:
        log_event(cfg.run_dir, "rollback", from_step=bad_step, to_step=state.step, path=str(path))


def _last_step(cfg: TrainConfig, start: int) -> int:
    """Where this process stops: the end of training, or earlier with trainer.stop_after_steps."""
    if cfg.trainer.stop_after_steps > 0:
        return min(cfg.trainer.steps, start + cfg.trainer.stop_after_steps)
    return cfg.trainer.steps


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    every = cfg.trainer.checkpoint_every
    return step == cfg.trainer.steps or (every > 0 and step % every == 0)


def _build_optimizers(task, model, cfg: TrainConfig):
    """One AdamW, or the list of a task's own optimizers (`task.build_optimizers` -> {name: optimizer}, kept
    on the task as `task.optimizers` for its `train_step`); checkpoints hold every optimizer's state."""
    build = getattr(task, "build_optimizers", None)
    if build is None:
        return build_optimizer(model, cfg.optim)
    task.optimizers = build(model, cfg.optim)
    return list(task.optimizers.values())


def _deepspeed(task, model, optimizer, cfg: TrainConfig, dims: ParallelDims):
    """(engine, DeepSpeedZeRO): parallel.zero.engine=deepspeed wraps the model and its one AdamW."""
    from vidtron.parallel import deepspeed_zero

    if isinstance(optimizer, list):
        raise ConfigError(
            "parallel.zero.engine",
            "deepspeed",
            f"recipe={cfg.recipe} trains several optimizers, which the deepspeed engine does not; use fsdp2",
        )
    return deepspeed_zero.initialize(model, optimizer, cfg, dims)


def _update(cfg, task, model, optimizer, batch, step: int, lr: float, ctx: DistContext, faults) -> tuple[float, float]:
    """loss -> backward -> clip -> AdamW step unless the loss or grad norm is NaN/inf; (loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = task.loss(model, batch, ctx.device)
    if faults is not None:
        loss = faults.poison(loss, step)
    if hasattr(optimizer, "update"):  # the DeepSpeed engine: backward, reduce, clip and step in one call
        loss_value = _mean_over_world(loss, ctx)  # NaN + x has finite gradients: a NaN loss must skip by itself
        return loss_value, optimizer.update(loss) if math.isfinite(loss_value) else float("nan")
    loss.backward()
    grad_norm = _grad_norm(model, cfg.optim.grad_clip)
    loss_value = _mean_over_world(loss, ctx)  # the same on every rank, so all ranks agree to skip
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def _train_step(
    cfg, task, model, optimizer, state: TrainState, dp_rank: int, dp: int, ctx: DistContext, logger, faults=None
) -> None:
    """One optimizer step; a NaN/inf loss or gradient norm skips the update (counted in state.bad_in_row)."""
    t0 = time.perf_counter()
    step = state.step + 1
    lr = lr_at(step, cfg.optim, cfg.trainer.steps)
    batch = task.local_batch(step, state.cursor, dp_rank, dp)
    custom = getattr(task, "train_step", None)  # tasks with several optimizers (the VAE's GAN) update themselves
    if custom is not None:
        extra = custom(model, task.optimizers, batch, step, lr, ctx.device)
        loss_value, grad_norm = extra.pop("loss"), extra.pop("grad_norm")
    else:
        loss_value, grad_norm = _update(cfg, task, model, optimizer, batch, step, lr, ctx, faults)
        extra = {}
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    state.bad_in_row = 0 if finite else state.bad_in_row + 1
    state.skipped_steps += not finite
    advance = getattr(task, "next_cursor", None)  # tasks with their own data position (bucketed streams)
    state.step, state.cursor = step, advance(state.cursor) if advance else state.cursor + cfg.data.batch_size
    state.losses.append(loss_value)
    if step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps:
        dt = time.perf_counter() - t0
        samples = batch.get("global_samples", cfg.data.batch_size)  # buckets: this step's global batch
        sps = samples / dt
        logger.log(
            {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": sps,
                "tokens_per_s": batch.get("global_tokens", samples * task.tokens_per_sample) / dt,
                "step_time_s": dt,
                **extra,
                **({"skipped": True, "skipped_steps": state.skipped_steps} if not finite else {}),
            }
        )
