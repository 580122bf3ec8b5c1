"""The update step every recipe shares: a task's phases -> autocast, faults, backward, DP averaging, clipping,
NaN/inf skip, optimizer step, metrics. The trainer calls `run_phases` once per step; tools and tests that drive a
task by hand (e.g. `make vae-demo`) call the same function, so there is one update path.

A phase (vidtron/platform/task.py) names its optimizer. Its loss is poisoned when a fault drill says so, then
backpropagated; plain (non-DTensor) gradients are averaged over `dp_group` (replicated data parallel: FSDP2 and
DeepSpeed average their own), clipped to `grad_clip` (0 = no clipping; the norm is still measured), and the optimizer
steps unless the rank-mean loss or the gradient norm is NaN/inf (every rank sees the same values, so all skip
together). An optimizer that updates itself (the DeepSpeed engine wrapper: `update(loss) -> grad norm`) gets the
loss instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vidtron.platform.task import Phase

Poison = Callable[[torch.Tensor, int], torch.Tensor]  # (loss, step) -> loss (fault drills)


@dataclass
class UpdatePolicy:
    """How `run_phases` updates: the same for every optimizer of a task."""

    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 = no clipping
    bf16: bool = False  # bf16 autocast around the task's forward code
    dp_group: object = None  # process group that plain gradients are averaged over (replicated DP); None = none
    mean_group: object = None  # metrics are averaged over this group (None: the world when distributed)
    poison: Poison | None = None  # fault injection on every phase's loss


@dataclass
class StepResult:
    loss: float  # the first phase's rank-mean loss
    grad_norm: float  # the first phase's pre-clip gradient norm
    metrics: dict[str, float] = field(default_factory=dict)  # every phase's extra metrics, rank means

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Scheduled LR times each param group's `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def run_phases(
    phases: Iterator[Phase],
    optimizers: dict[str, torch.optim.Optimizer],
    lr: float,
    step: int,
    policy: UpdatePolicy,
    device_type: str = "cpu",
) -> StepResult:
    """Drive one step of a task: each phase's forward (under autocast) then its update, in the task's order."""
    for opt in optimizers.values():
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
    results: list[tuple[str, float, float, dict[str, float]]] = []
    while True:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=policy.bf16):
            phase = next(phases, None)
        if phase is None:
            break
        if phase.optimizer not in optimizers:
            raise KeyError(f"phase optimizer {phase.optimizer!r} is not one of {sorted(optimizers)}")
        results.append(_update(phase, optimizers[phase.optimizer], step, policy))
    if not results:
        raise RuntimeError("the task's phases() yielded nothing: a step needs at least one Phase")
    return _result(results)


def run_accumulated(
    micro_phases: list[Iterator[Phase]],
    optimizers: dict[str, torch.optim.Optimizer],
    lr: float,
    step: int,
    policy: UpdatePolicy,
    device_type: str = "cpu",
    model: torch.nn.Module | None = None,
) -> StepResult:
    """One optimizer step over K micro-batches (trainer.grad_accum = K): each micro-batch's single phase is
    backpropagated with its loss / K, gradients accumulate, and FSDP2 (`model`, when it is an FSDP module) neither
    reduce-scatters nor reshards until the last micro-batch; then one clip + step, as `run_phases` does. The mean
    of micro-batch means is the mean over the whole (equal-sized) batch, so K micro-batches of b equal one of K*b."""
    for opt in optimizers.values():
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
    if any(hasattr(opt, "accumulate") for opt in optimizers.values()):
        return _accumulate_engine(micro_phases, optimizers, step, policy, device_type)
    k_total, losses, metrics, name = len(micro_phases), [], [], None
    for k, phases in enumerate(micro_phases):
        _set_sync(model, k == k_total - 1)
        phase, loss = _micro_phase(phases, name, step, policy, device_type)
        name = phase.optimizer
        (loss / k_total).backward()
        losses.append(loss.detach())
        metrics.append(torch.stack([m.detach().float().reshape(()) for m in phase.metrics.values()] or [loss * 0]))
    opt = optimizers[name]
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    _average_plain_grads(params, policy.dp_group)
    norm = _clip(params, policy.grad_clip)
    values = _rank_mean([torch.stack(losses).mean(), *torch.stack(metrics).mean(0)], policy.mean_group)
    if math.isfinite(values[0]) and math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(loss=values[0], grad_norm=norm, metrics=dict(zip(phase.metrics, values[1:])))


def _accumulate_engine(
    micro_phases: list[Iterator[Phase]], optimizers: dict, step: int, policy: UpdatePolicy, device_type: str
) -> StepResult:
    """`run_accumulated` for an engine that accumulates itself (DeepSpeed: `accumulate(loss, k, K, discard)`). Each
    micro-batch's rank-mean loss is checked as it comes (one scalar all-reduce), so a non-finite one anywhere in the
    window makes every rank discard the whole window together."""
    k_total, values, bad, name = len(micro_phases), [], False, None
    for k, phases in enumerate(micro_phases):
        phase, loss = _micro_phase(phases, name, step, policy, device_type)
        name = phase.optimizer
        values.append(_rank_mean([loss, *phase.metrics.values()], policy.mean_group))
        bad = bad or not math.isfinite(values[-1][0])
        norm = optimizers[name].accumulate(loss, k, k_total, bad)
    means = [sum(v[i] for v in values) / k_total for i in range(len(values[0]))]
    return StepResult(loss=means[0], grad_norm=norm, metrics=dict(zip(phase.metrics, means[1:])))


def _micro_phase(phases: Iterator[Phase], name, step: int, policy: UpdatePolicy, device_type: str):
    """(phase, its loss after fault poisoning) of one micro-batch: exactly one phase, of optimizer `name` when given."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=policy.bf16):
        phase = next(phases)
    if next(phases, None) is not None or (name is not None and phase.optimizer != name):
        raise ValueError("gradient accumulation needs a task with one phase (one optimizer) per step")
    return phase, phase.loss if policy.poison is None else policy.poison(phase.loss, step)


def _set_sync(model: torch.nn.Module | None, last: bool) -> None:
    """FSDP2: reduce gradients and reshard parameters only after the last micro-batch's backward."""
    if model is not None and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def _update(phase: Phase, opt, step: int, policy: UpdatePolicy) -> tuple[str, float, float, dict[str, float]]:
    loss = phase.loss if policy.poison is None else policy.poison(phase.loss, step)
    if hasattr(opt, "update"):  # the DeepSpeed engine: backward, reduce, clip and step in one call
        values = _rank_mean([loss, *phase.metrics.values()], policy.mean_group)
        norm = opt.update(loss) if math.isfinite(values[0]) else float("nan")  # NaN + x has finite grads: skip here
        return phase.optimizer, values[0], norm, dict(zip(phase.metrics, values[1:]))
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    _average_plain_grads(params, policy.dp_group)
    norm = _clip(params, policy.grad_clip)
    values = _rank_mean([loss, *phase.metrics.values()], policy.mean_group)
    if math.isfinite(values[0]) and math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return phase.optimizer, values[0], norm, dict(zip(phase.metrics, values[1:]))


def _average_plain_grads(params: list[torch.Tensor], group) -> None:
    """Mean of plain gradients over `group` in one all-reduce (DTensor gradients were averaged by FSDP2)."""
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    if group is None or not plain:
        return
    flat = torch.cat([p.grad.flatten() for p in plain])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for p, g in zip(plain, flat.split([p.numel() for p in plain])):
        p.grad.copy_(g.view_as(p))


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _rank_mean(values: list[torch.Tensor], group) -> list[float]:
    """Means over ranks of scalars in one all-reduce: TP ranks repeat a value, CP/DP ranks' means average to the
    global mean."""
    x = torch.stack([v.detach().float().reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, group=group)
        x /= dist.get_world_size(group)
    return x.tolist()


def _result(results: list[tuple[str, float, float, dict[str, float]]]) -> StepResult:
    _, loss, norm, metrics = results[0]
    out = StepResult(loss=loss, grad_norm=norm, metrics=dict(metrics))
    for name, _, other_norm, other in results[1:]:
        out.metrics.update(other)
        out.metrics[f"{name}_grad_norm"] = other_norm
    return out
