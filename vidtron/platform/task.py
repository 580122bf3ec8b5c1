"""The task contract: what a recipe gives the trainer, in one place.

The trainer (trainer.py) owns the run: layout, resume, the data cursor, the update step, checkpoints, metrics. A
recipe's task owns the model and the data: it builds the single-device model, lays it out, produces each step's
local batch and computes the loss terms. The trainer applies, for every optimizer of every recipe alike: the LR
schedule, autocast (trainer.precision=bf16), fault injection (faults.nan_at_step poisons every phase), backward, gradient
averaging over data-parallel ranks where FSDP does not, clipping, the NaN/inf skip, the optimizer step and the
metrics (averaged over ranks).

Required hooks (`Task`):
    tokens_per_sample: int                        tokens of one sample (throughput metrics)
    build_model() -> nn.Module                    the single-device model (initialised from the run seed, or on meta)
    validate_layout(dims)                         refuse layouts the model cannot use (ConfigError)
    parallelize(model, dims, opts) -> nn.Module   apply the layout from outside (the model's own parallelize_*)
    local_batch(step, cursor, dp_rank, dp) -> dict   this data-parallel rank's slice of global batch `step`
    phases(model, batch, step, device) -> Iterator[Phase]
        yields one Phase per optimizer update, in order; the trainer runs backward + step on each phase before it
        resumes the generator, so a later phase can use the updated state of an earlier one (a GAN's critic sees
        the generator's output after the generator's update). Every forward runs under the trainer's autocast.

Optional hooks (`OptionalHooks`, found by `hooks()`; absent ones take the defaults given):
    materialize(model, device) -> nn.Module      for a model built on the meta device: allocate and initialise the
                                                  local shards after `parallelize` (vidtron/parallel/materialize.py);
                                                  required when build_model returns meta parameters
    optimizer_groups(model) -> dict[str, list[dict]]   param groups per optimizer name (each group may carry
                                                  `lr_scale` and AdamW settings `betas`); default {"model": all}
    next_cursor(cursor) -> int                    data position after a step; default cursor + data.batch_size
    cursor_unit: str                              what the cursor counts ("samples" by default)
    flops_per_sample: float                       training FLOPs (forward + backward) of one sample, for MFU; 0

Step numbers count completed optimizer steps: checkpoint `step_N` holds the state after N steps, and a resumed run
continues with step N + 1 at the saved data position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions


class Phase(NamedTuple):
    """One optimizer update of a step: `loss` is backpropagated into the parameters of optimizer `optimizer`."""

    optimizer: str  # a name from optimizer_groups(model) ("model" for single-optimizer tasks)
    loss: torch.Tensor  # scalar; this rank's share of the global mean loss
    metrics: dict[str, torch.Tensor] = {}  # extra scalars to log (averaged over ranks by the trainer)


@runtime_checkable
class Task(Protocol):
    """The required hooks (see the module doc)."""

    tokens_per_sample: int

    def build_model(self) -> nn.Module: ...

    def validate_layout(self, dims: ParallelDims) -> None: ...

    def parallelize(self, model: nn.Module, dims: ParallelDims, opts: ParallelizeOptions) -> nn.Module: ...

    def local_batch(self, step: int, cursor: int, dp_rank: int, dp: int) -> dict: ...

    def phases(self, model: nn.Module, batch: dict, step: int, device: torch.device) -> Iterator[Phase]: ...


@dataclass
class OptionalHooks:
    """The optional hooks of a task, with their defaults filled in (see the module doc)."""

    materialize: Any = None  # callable(model, device) -> model, for meta-built models
    optimizer_groups: Any = None  # callable(model) -> {name: [param group dict]}; None = {"model": all params}
    next_cursor: Any = None  # callable(cursor) -> cursor; None = + data.batch_size
    cursor_unit: str = "samples"
    flops_per_sample: float = 0.0


REQUIRED = ("tokens_per_sample", "build_model", "validate_layout", "parallelize", "local_batch", "phases")
OPTIONAL = ("materialize", "optimizer_groups", "next_cursor", "cursor_unit", "flops_per_sample")


def hooks(task: Any) -> OptionalHooks:
    """Check `task` against the contract (one clear TypeError naming what is missing) and collect its optional
    hooks; the only place that looks at a task's attributes."""
    missing = [name for name in REQUIRED if not hasattr(task, name)]
    if missing:
        raise TypeError(
            f"{type(task).__name__} is not a vidtron Task: it lacks {missing} (see vidtron/platform/task.py)"
        )
    found = {name: getattr(task, name) for name in OPTIONAL if hasattr(task, name)}
    return OptionalHooks(**found)
