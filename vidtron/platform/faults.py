"""Fault injection (`faults.*`): kill, hang, NaN and checkpoint corruption at chosen steps, for drills and tests.

Each fault fires at most once per run dir: the rank that fires it first writes `<run_dir>/faults/<name>`, and a
restarted (or rolled-back) run that finds the marker does not fire it again, so a drill ends like a clean run.
The trainer calls the hooks; with no fault configured every hook is a no-op.

    hook                 where in the trainer                        faults
    poison(loss, step)   after the forward, before backward          nan_at_step (+ nan_steps)
    after_step(step)     right after optimizer step N                kill_at_step, hang_at_step, step_delay_s
    before_commit(step)  checkpoint files written, not yet committed kill_during_checkpoint
    after_commit(step)   checkpoint committed (manifest + rename)    corrupt_checkpoint
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.platform.config import FaultsConfig
from vidtron.platform.metrics import log_event


class FaultInjector:
    """The fault hooks of one rank; construct it before the first step (markers are read then)."""

    def __init__(self, cfg: FaultsConfig, run_dir: str | Path, rank: int, world_size: int):
        check_ranks(cfg, world_size)
        self.cfg, self.rank = cfg, rank
        self.run_dir = Path(run_dir)
        names = ("kill_at_step", "kill_during_checkpoint", "corrupt_checkpoint", "nan_at_step", "hang_at_step")
        self._armed = {n for n in names if getattr(cfg, n) > 0 and not self._marker(n).exists()}
        self._last_poisoned: int | None = None  # the step being poisoned (until after_step)

    def _marker(self, name: str) -> Path:
        return self.run_dir / "faults" / name

    def _fire(self, name: str, step: int, **fields) -> None:
        """Disarm `name` for good (marker fsynced first) and record the injection."""
        self._armed.discard(name)
        marker = self._marker(name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"rank {self.rank} step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        log_event(self.run_dir, "fault-injected", fault=name, rank=self.rank, step=step, **fields)

    def _due(self, name: str, step: int, rank: int | None = None) -> bool:
        return name in self._armed and getattr(self.cfg, name) == step and (rank is None or rank == self.rank)

    def poison(self, loss: torch.Tensor, step: int, sample_keys=()) -> torch.Tensor:
        """NaN loss on every rank for steps nan_at_step .. nan_at_step + nan_steps - 1 (first attempt only); every
        loss of a poisoned step (each update phase of a multi-optimizer task) is NaN. A batch holding sample
        `nan_sample` gives a NaN loss on the rank that holds it, every time (a persistently bad sample)."""
        if self.cfg.nan_sample >= 0 and self.cfg.nan_sample in sample_keys:
            return loss + float("nan")
        first = self.cfg.nan_at_step
        if step == self._last_poisoned:
            return loss + float("nan")
        if "nan_at_step" not in self._armed or not first <= step < first + self.cfg.nan_steps:
            return loss
        self._last_poisoned = step
        if step == first + self.cfg.nan_steps - 1 and self.rank == 0:
            self._fire("nan_at_step", step)
        elif step == first + self.cfg.nan_steps - 1:
            self._armed.discard("nan_at_step")
        return loss + float("nan")

    def after_step(self, step: int) -> None:
        self._last_poisoned = None
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)
        if self._due("kill_at_step", step, self.cfg.kill_rank):
            self._fire("kill_at_step", step)
            _sigkill_self()
        if self._due("hang_at_step", step, self.cfg.hang_rank):
            self._fire("hang_at_step", step)
            while True:  # peers block in their next collective until trainer.collective_timeout_s
                time.sleep(3600)

    def before_commit(self, step: int) -> None:
        if self._due("kill_during_checkpoint", step, self.cfg.kill_rank):
            self._fire("kill_during_checkpoint", step)
            _sigkill_self()

    def after_commit(self, step: int, path: Path) -> None:
        """Rank 0 only (the committing rank): flip one byte in the middle of the checkpoint's first shard."""
        if not self._due("corrupt_checkpoint", step) or self.rank != 0:
            return
        shard = sorted(Path(path).glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        self._fire("corrupt_checkpoint", step, file=str(shard))


def check_ranks(cfg: FaultsConfig, world_size: int) -> None:
    """faults.kill_rank / hang_rank must name a rank of this world (checked before any process starts)."""
    for name, value in (("kill_rank", cfg.kill_rank), ("hang_rank", cfg.hang_rank)):
        if value >= world_size:
            raise ConfigError(f"faults.{name}", value, f"must name one of the {world_size} ranks (0..{world_size - 1})")


def _sigkill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
