"""Scaling-law sweep: a DiT family crossed with token budgets (`grid.py`), trained by `vidtron-train`, collected
into a results table and fitted into a report (Hoffmann et al. approach 1, as in the HunyuanVideo report).

Loss. The value read at budget step s is the mean training loss over the centred window
[s (1 - smooth), s (1 + smooth)] of logged steps; each run trains `smooth` past its last budget so that
its last point is centred too. The flow-matching loss of one step is noisy (a fresh time, noise and
batch per sample); a centred window averages that out with only second-order bias on a curve that falls
like log(step), where a trailing window or an EMA would lag and favour the small models (read later
in their runs at equal compute). Every step draws fresh noise and times, so with a data set of a few
thousand clips the training loss tracks the held-out loss; a separate eval pass would need the trainer's
checkpoints at every budget and a second data set, which a CPU sweep cannot afford.

Runs. Each size trains in `OUT/runs/<size>/` through `python -m vidtron.launch.train` as a subprocess,
`max_parallel` at a time (longest first), each with `threads_per_run` threads. A run is finished when its
`DONE` marker (written after exit code 0 and metrics reaching the target step) says so; finished runs are
skipped, others (crashed, killed, DONE deleted) rerun and resume from their own newest checkpoint
(`trainer.resume=auto`). `point.json` holds each run's trainer overrides; reusing `out` with different
settings is refused. `launcher=ray` runs the same command as one Ray task per run and `launcher=slurm` as one
sbatch job per run (vidtron/launch/sweep_launchers.py), with the same DONE bookkeeping.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vidtron.errors import ConfigError
from vidtron.platform.metrics import read_metrics
from vidtron.recipes.scaling.grid import POINT, Point, SweepConfig, build_points, check_out_folder
from vidtron.recipes.scaling.report import write_report

DONE = "DONE"  # per-run marker of a finished run: {"steps", "wall_s", "cpu_s", "finished"}


# ----------------------------------------------------------------------------- running


def say(message: str) -> None:
    """One progress line on stdout, flushed (sweeps run for minutes, often with stdout in a file)."""
    print(f"[sweep] {message}", flush=True)


def is_done(p: Point) -> bool:
    """True when DONE says the run reached at least `p.steps` and its metrics agree."""
    marker = p.run_dir / DONE
    if not marker.exists():
        return False
    try:
        done_steps = json.loads(marker.read_text())["steps"]
    except (ValueError, KeyError):
        return False
    records = read_metrics(p.run_dir)
    return done_steps >= p.steps and bool(records) and records[-1]["step"] >= p.steps


def train_command(p: Point) -> list[str]:
    """The subprocess that trains one point (the same trainer as `vidtron-train`)."""
    return [sys.executable, "-m", "vidtron.launch.train", *p.train_args]


def prepare_point(p: Point) -> None:
    """Before (re)starting a point on any launcher: its folder, no DONE, and `point.json` with its overrides."""
    p.run_dir.mkdir(parents=True, exist_ok=True)
    (p.run_dir / DONE).unlink(missing_ok=True)
    (p.run_dir / POINT).write_text(json.dumps({"size": asdict(p.size), "train_args": p.train_args}, indent=1))


def train_env(threads: int) -> dict[str, str]:
    """The environment variables a run sets on top of its launcher's: its thread count, offline wandb by default."""
    return {"OMP_NUM_THREADS": str(threads), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}


def _start(p: Point, threads: int) -> subprocess.Popen:
    """Launch a point's trainer with its output in `run_dir/train.log`."""
    prepare_point(p)
    with open(p.run_dir / "train.log", "ab") as log:
        env = {**os.environ, **train_env(threads)}
        return subprocess.Popen(train_command(p), stdout=log, stderr=subprocess.STDOUT, env=env)


def finish_point(p: Point, rc: int, wall_s: float, cpu_s: float) -> bool:
    """Write DONE after a clean exit whose metrics reach the target step; False for a failed run."""
    records = read_metrics(p.run_dir)
    reached = records[-1]["step"] if records else 0
    if rc != 0 or reached < p.steps:
        say(f"{p.name}: FAILED (exit {rc}, step {reached}/{p.steps}); see {p.run_dir / 'train.log'}")
        return False
    marker = {"steps": p.steps, "wall_s": round(wall_s, 2), "cpu_s": round(cpu_s, 2), "finished": time.time()}
    (p.run_dir / DONE).write_text(json.dumps(marker))
    loss = records[-1]["loss"]
    say(f"{p.name}: done in {wall_s:.1f} s wall, {cpu_s:.1f} s CPU ({p.steps} steps, last loss {loss:.4f})")
    return True


def _children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (a child's time is added when it is reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_points(points: list[Point], max_parallel: int = 1, threads: int = 1, poll_s: float = 0.2) -> dict:
    """Train every unfinished point, `max_parallel` at a time, most compute first.

    Returns ``{"ran", "skipped", "failed"}`` (point names) and ``wall_s``, ``cpu_s`` per run that ended.
    """
    skipped = [p.name for p in points if is_done(p)]
    todo = sorted((p for p in points if p.name not in skipped), key=lambda p: -p.steps * p.flops["total"])
    running: dict[str, tuple[Point, subprocess.Popen, float]] = {}
    status = {"ran": [], "skipped": skipped, "failed": [], "wall_s": {}, "cpu_s": {}}
    try:
        while todo or running:
            while todo and len(running) < max_parallel:
                p = todo.pop(0)
                say(f"{p.name}: training {p.steps} steps in {p.run_dir}")
                running[p.name] = (p, _start(p, threads), time.perf_counter())
            time.sleep(poll_s)
            for name, (p, proc, t0) in list(running.items()):
                cpu0 = _children_cpu_s()
                if proc.poll() is None:
                    continue
                del running[name]
                wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0  # poll() reaped exactly this child
                status["wall_s"][name], status["cpu_s"][name] = wall, cpu
                status["ran" if finish_point(p, proc.returncode, wall, cpu) else "failed"].append(name)
    finally:
        for _, proc, _ in running.values():  # interrupted: stop only the runs this sweep started
            proc.terminate()
            proc.wait()
    return status


# ----------------------------------------------------------------------------- collecting


def smoothed_loss(losses: dict[int, float], step: int, smooth: float) -> tuple[float, int]:
    """Mean loss over logged steps in [step (1 - smooth), step (1 + smooth)]; returns (mean, steps averaged)."""
    lo, hi = math.floor(step * (1 - smooth)), math.ceil(step * (1 + smooth))
    window = [v for s, v in losses.items() if lo <= s <= hi] or [losses[step]]
    return sum(window) / len(window), len(window)


def collect(points: list[Point], smooth: float) -> list[dict]:
    """One row per (size, budget) of the finished points: size, params, step, tokens, flops, loss."""
    rows = []
    for p in points:
        losses = {r["step"]: r["loss"] for r in read_metrics(p.run_dir)}
        for budget, step in sorted(p.budget_steps.items()):
            if step not in losses:
                continue
            loss, n = smoothed_loss(losses, step, smooth)
            rows.append(
                {
                    "size": p.name,
                    "width": p.size.width,
                    "depth": p.size.depth,
                    **p.size.overrides(),
                    "params": p.flops["params"],
                    "params_non_embedding": p.flops["params_non_embedding"],
                    "budget_tokens": budget,
                    "step": step,
                    "tokens": step * p.tokens_per_step,
                    "flops": step * p.flops["total"],
                    "flops_6nd": step * p.flops["flops_6nd"],
                    "loss": loss,
                    "loss_raw": losses[step],
                    "loss_window_steps": n,
                }
            )
    return rows


def to_curves(rows: list[dict], fit_params: str = "non_embedding") -> list[dict]:
    """Rows -> one `fit_envelope` curve per size: params N, cumulative flops, tokens and loss per read step."""
    key = "params_non_embedding" if fit_params == "non_embedding" else "params"
    curves: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["size"], r["step"])):
        c = curves.setdefault(r["size"], {"size": r["size"], "params": r[key], "flops": [], "tokens": [], "loss": []})
        if c["flops"] and r["flops"] <= c["flops"][-1]:
            continue  # two budgets read at the same step
        for k in ("flops", "tokens", "loss"):
            c[k].append(r[k])
    return sorted(curves.values(), key=lambda c: c["params"])


def write_results(rows: list[dict], points: list[Point], cfg: SweepConfig, out: Path) -> None:
    """`results.csv` (the rows) and `results.json` (config, per-size accounting, rows, curves)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.csv").unlink(missing_ok=True)
    if rows:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    sizes = [
        {"size": p.name, **p.size.overrides(), "steps": p.steps, "tokens_per_step": p.tokens_per_step}
        | {k: v for k, v in p.flops.items() if k != "breakdown"}
        | {"forward_breakdown": p.flops["breakdown"]}
        for p in points
    ]
    summary = {"config": asdict(cfg), "sizes": sizes, "rows": rows, "curves": to_curves(rows, cfg.fit_params)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------- entry point


def run_sweep(cfg: SweepConfig, launchers=None) -> dict:
    """Build the grid, train what is unfinished, collect `results.*` and write the report into `cfg.out`.

    Returns ``{"ran", "skipped", "failed", "wall_s", "cpu_s", "rows", "report"}``; ``report`` is the
    `write_report` summary, or None when a run failed (rerun the same command to retry) or the fit
    raised (its message is in ``report_error``). With ``dry_run`` (launcher=slurm) it prints the pending
    runs' sbatch scripts and returns ``{"dry_run": True, "scripts": {name: script}, ...}`` without training.
    `launchers` is the module with `dry_run_slurm`, `run_points_ray` and `run_points_slurm` (vidtron-sweep passes
    vidtron/launch/sweep_launchers.py); without it only the local launcher runs.
    """
    sweep_launchers = launchers
    if sweep_launchers is None and (cfg.dry_run or cfg.launcher != "local"):
        raise ConfigError(
            "launcher", cfg.launcher, "run it through vidtron-sweep (the launchers live in vidtron.launch)"
        )
    points = build_points(cfg)
    check_out_folder(points)
    if cfg.dry_run:
        return sweep_launchers.dry_run_slurm(points, cfg)
    if cfg.launcher == "ray":
        status = sweep_launchers.run_points_ray(points, cfg)
    elif cfg.launcher == "slurm":
        status = sweep_launchers.run_points_slurm(points, cfg)
    else:
        status = run_points(points, cfg.max_parallel, cfg.threads_per_run)
    out = Path(cfg.out)
    rows = collect([p for p in points if is_done(p)], cfg.smooth)
    write_results(rows, points, cfg, out)
    status |= {"rows": rows, "report": None}
    if status["failed"]:
        return status
    options = {"drop_edges": cfg.drop_edges, "n_boot": cfg.n_boot}
    budget = cfg.budget_pflops or None
    try:
        status["report"] = write_report(to_curves(rows, cfg.fit_params), out, budget, title=cfg.title, **options)
    except ValueError as err:
        status["report_error"] = str(err)
    return status
