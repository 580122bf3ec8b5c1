"""Metrics: `<run_dir>/metrics.jsonl` (one JSON object per logged step), wandb, a progress bar; events.

Only rank 0 writes. A resumed run appends; a step logged twice (work redone after a crash) keeps both
lines, and readers take the last line per step (`read_metrics` does).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import warnings
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The last record per step, in step order."""
    by_step: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def log_event(run_dir: str | Path, kind: str, **fields) -> None:
    """One line in `<run_dir>/events.jsonl`: start, resume, checkpoint, failure, restart, rollback."""
    append_jsonl(Path(run_dir) / "events.jsonl", {"event": kind, "time": time.time(), "pid": os.getpid(), **fields})


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        config: dict,
        use_wandb: bool,
        project: str,
        progress: bool,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = self._init_wandb(run_dir, config, project) if enabled and use_wandb else None
        self._bar = None
        if enabled and progress and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @staticmethod
    def _init_wandb(run_dir, config: dict, project: str):
        try:
            import wandb

            id_file = Path(run_dir) / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            return wandb.init(
                project=project,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                config=config,
                mode=os.environ.get("WANDB_MODE", "offline"),
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as err:  # metrics must never take a training run down
            warnings.warn(f"wandb disabled: {type(err).__name__}: {err}", stacklevel=2)
            return None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            extra = {"tok/s": f"{record['tokens_per_s']:.0f}"} if "tokens_per_s" in record else {}
            extra |= {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", **extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
