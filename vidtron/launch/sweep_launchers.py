"""The sweep's other launchers: each pending point as a Ray task or as a SLURM job, running the same trainer
command as `launcher=local` (`sweep.train_command`), with the same bookkeeping (`prepare_point` before,
`finish_point` after: DONE only for a clean exit whose metrics reach the target step).

    vidtron-sweep launcher=ray out=... data.root=... --max-parallel 4               # a private local Ray
    vidtron-sweep launcher=ray ray_address=head:6379 out=... data.root=...          # a running Ray cluster
    vidtron-sweep launcher=slurm cluster=local_cpu out=... data.root=... [dry_run=true]

Ray: one `@ray.remote(num_cpus=threads_per_run)` task per point, at most `max_parallel` in flight, so a local
instance with `max_parallel * threads_per_run` CPUs never oversubscribes the cores. The task runs the trainer
as a subprocess in the driver's working directory and returns its exit code; a task that dies (worker killed,
node lost) counts as a failed point and reruns, resuming from its checkpoint, at the next sweep.

SLURM: one sbatch job per point (one task, `threads_per_run` CPUs), from the cluster yaml's partition, account,
qos, time limit, memory, env, setup lines, interpreter and container. The script writes the trainer's exit code
and CPU time to `run_dir/slurm/exit-<job>`; the driver polls `squeue` until the jobs have left the queue, then
finishes each point from that file (a job killed before writing it is a failed point). The sweep folder must be
on a file system the nodes share.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vidtron.errors import ConfigError
from vidtron.launch.cluster import ClusterConfig, init_local_ray, load_cluster, sbatch_options
from vidtron.recipes.scaling.grid import Point, SweepConfig
from vidtron.recipes.scaling.sweep import finish_point, is_done, prepare_point, say, train_command
from vidtron.recipes.scaling.sweep import train_env as _train_env

POLL_S = 2.0  # seconds between squeue polls


def _pending(points: list[Point]) -> tuple[list[Point], list[str]]:
    """(points to train, most compute first; names of finished points)."""
    skipped = [p.name for p in points if is_done(p)]
    todo = sorted((p for p in points if p.name not in skipped), key=lambda p: -p.steps * p.flops["total"])
    return todo, skipped


# ----------------------------------------------------------------------------- ray


def _train_task():
    """The Ray task's function. Defined in here so that Ray pickles it by value: a worker then imports only the
    standard library, not vidtron and torch (seconds per worker)."""

    def train_task(cmd: list[str], cwd: str, env: dict[str, str], log_path: str) -> tuple[int, float, float]:
        """Runs in a Ray worker: the trainer subprocess, output appended to log_path; (exit code, wall s, CPU s)."""
        import os
        import resource
        import subprocess
        import time

        def children_cpu() -> float:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            return usage.ru_utime + usage.ru_stime

        t0, cpu0 = time.perf_counter(), children_cpu()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait()
            finally:  # cancelled (KeyboardInterrupt in the task): stop the trainer too
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        return rc, time.perf_counter() - t0, children_cpu() - cpu0

    return train_task


def _init_ray(cfg: SweepConfig) -> bool:
    """Connect to cfg.ray_address or start a private local instance sized to the core budget; True if we did."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
        return True
    init_local_ray(cfg.max_parallel * cfg.threads_per_run, Path(cfg.out).resolve(), log_to_driver=False)
    return True


def run_points_ray(points: list[Point], cfg: SweepConfig) -> dict:
    """Train every unfinished point as a Ray task, `cfg.max_parallel` at a time; the same status as `run_points`."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError("launcher", "ray", "needs Ray: pip install 'ray[default]' (the vidtron[ray] extra)") from err
    todo, skipped = _pending(points)
    status = {"ran": [], "skipped": skipped, "failed": [], "wall_s": {}, "cpu_s": {}}
    if not todo:
        return status
    started = _init_ray(cfg)
    task = ray.remote(num_cpus=cfg.threads_per_run, max_retries=0)(_train_task())
    running: dict = {}  # ObjectRef -> Point
    try:
        while todo or running:
            while todo and len(running) < cfg.max_parallel:
                p = todo.pop(0)
                say(f"{p.name}: training {p.steps} steps in {p.run_dir} (Ray task)")
                prepare_point(p)
                log = str((p.run_dir / "train.log").resolve())
                env = _train_env(cfg.threads_per_run)
                running[task.remote(train_command(p), os.getcwd(), env, log)] = p
            ready, _ = ray.wait(list(running), num_returns=1)
            p = running.pop(ready[0])
            try:
                rc, wall, cpu = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # the task or its worker died
                say(f"{p.name}: Ray task failed: {type(err).__name__}: {str(err)[:500]}")
                rc, wall, cpu = -1, 0.0, 0.0
            status["wall_s"][p.name], status["cpu_s"][p.name] = wall, cpu
            status["ran" if finish_point(p, rc, wall, cpu) else "failed"].append(p.name)
    finally:
        for ref in running:  # interrupted: stop only this sweep's tasks (and, through them, their trainers)
            ray.cancel(ref)
        if started:
            ray.shutdown()
    return status


# ----------------------------------------------------------------------------- slurm


def _exit_path(p: Point) -> str:
    return shlex.quote(str(p.run_dir.resolve() / "slurm" / "exit-")) + '"$SLURM_JOB_ID"'


def _header(p: Point, c: ClusterConfig, threads: int) -> list[str]:
    log = p.run_dir.resolve() / "train.log"
    return sbatch_options(c, f"vidtron-sweep-{p.name}", log, ["--nodes=1", "--ntasks=1", f"--cpus-per-task={threads}"])


def sweep_script(p: Point, c: ClusterConfig, cluster_name: str, threads: int) -> str:
    """One point's job script: SBATCH header, the cluster's env and setup, the trainer, its exit code recorded."""
    python = c.python or sys.executable
    cmd = [python, *train_command(p)[1:]]
    run = " ".join(shlex.quote(a) for a in cmd)
    if c.container_image:
        container = [f"--container-image={shlex.quote(c.container_image)}", f"--container-workdir={Path.cwd()}"]
        container += [f"--container-mounts={shlex.quote(c.container_mounts)}"] if c.container_mounts else []
        run = " ".join(["srun", *container, run])
    lines = ["#!/bin/bash", f"# vidtron-sweep launcher=slurm point {p.name}, from cluster config {cluster_name!r}"]
    lines += _header(p, c, threads)
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in {**c.env, **_train_env(threads)}.items()]
    lines += list(c.setup)
    lines += [run, "status=$?", f'echo "$status $(times | tail -n 1)" > {_exit_path(p)}', 'exit "$status"']
    return "\n".join(lines) + "\n"


def dry_run_slurm(points: list[Point], cfg: SweepConfig) -> dict:
    """Print the sbatch script of every unfinished point; submit and write nothing."""
    cluster = load_cluster(cfg.cluster)
    todo, skipped = _pending(points)
    scripts = {p.name: sweep_script(p, cluster, cfg.cluster, cfg.threads_per_run) for p in todo}
    for name, script in scripts.items():
        print(f"# ---- {name}\n{script}", end="", flush=True)
    return {
        "dry_run": True,
        "scripts": scripts,
        "ran": [],
        "skipped": skipped,
        "failed": [],
        "rows": [],
        "report": None,
    }


def _submit(p: Point, script: str) -> str:
    """Write the script to run_dir/slurm/job.sbatch, sbatch it; the job id."""
    folder = p.run_dir.resolve() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.sbatch").write_text(script)
    res = subprocess.run(["sbatch", "--parsable", str(folder / "job.sbatch")], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"sbatch failed for {p.name}: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def _queued(job_ids: list[str]) -> set[str]:
    """The jobs among job_ids still pending or running (squeue lists only those; it forgets purged ids)."""
    res = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    if res.returncode and "invalid job id" not in res.stderr.lower():
        raise RuntimeError(f"squeue failed: {res.stderr.strip()}")
    return set(res.stdout.split()) & set(job_ids)


def _job_result(p: Point, job_id: str) -> tuple[int, float]:
    """(exit code, CPU s) from the script's exit file; (-1, 0) when the job ended before writing it."""
    path = p.run_dir / "slurm" / f"exit-{job_id}"
    if not path.exists():
        return -1, 0.0
    rc, *times = path.read_text().split()
    cpu = 0.0
    for t in times:  # bash `times`: children's user and system time, e.g. 0m12.345s 0m0.678s
        m = re.fullmatch(r"(\d+)m([\d.]+)s", t)
        cpu += int(m[1]) * 60 + float(m[2]) if m else 0.0
    return int(rc), cpu


def run_points_slurm(points: list[Point], cfg: SweepConfig, poll_s: float | None = None) -> dict:
    """Submit one job per unfinished point, wait until they have all left the queue, finish each point."""
    cluster = load_cluster(cfg.cluster)
    todo, skipped = _pending(points)
    status = {"ran": [], "skipped": skipped, "failed": [], "wall_s": {}, "cpu_s": {}, "jobs": {}}
    jobs: dict[str, Point] = {}
    t0 = time.perf_counter()
    try:
        for p in todo:
            prepare_point(p)
            job_id = _submit(p, sweep_script(p, cluster, cfg.cluster, cfg.threads_per_run))
            jobs[job_id], status["jobs"][p.name] = p, job_id
            say(f"{p.name}: submitted job {job_id} ({p.steps} steps in {p.run_dir})")
        waiting = set(jobs)
        while waiting:
            time.sleep(POLL_S if poll_s is None else poll_s)
            for job_id in sorted(waiting - _queued(sorted(waiting))):
                waiting.discard(job_id)
                p = jobs[job_id]
                rc, cpu = _job_result(p, job_id)
                wall = time.perf_counter() - t0  # from submission: queue time included
                status["wall_s"][p.name], status["cpu_s"][p.name] = wall, cpu
                status["ran" if finish_point(p, rc, wall, cpu) else "failed"].append(p.name)
    except BaseException:  # interrupted or sbatch failed: cancel only this sweep's jobs
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True)
        raise
    return status
