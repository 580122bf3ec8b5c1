"""Crash -> first resumed step, in seconds, under launcher=torchrun and launcher=ray (2 CPU processes).

The drill of tests/test_faults.py: 10 steps, a checkpoint every 2, rank 1 SIGKILLed right after step 5
(`faults.kill_at_step`). The kill time is the `fault-injected` event; a watcher polls metrics.jsonl and
stamps each new step record, so "first resumed step" is when the first step after the resume point was
logged. Also reported: kill -> `start` of the restarted group, and steps recomputed per crash.
Run: python -m bench.bench_restart
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import write_result
from vidtron.launch.data import main as data_main

KILL_AT = 5
DRILL = [
    "trainer.steps=10",
    "trainer.checkpoint_every=2",
    "seed=3",
    "metrics.wandb=false",
    "trainer.progress=false",
    "faults.kill_rank=1",
    f"faults.kill_at_step={KILL_AT}",
]
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _watch(path: Path, stamps: list[tuple[float, int]], stop: threading.Event) -> None:
    """Stamp each metrics line (wall time, step) as it appears."""
    seen = 0
    while not stop.is_set():
        if path.exists():
            lines = path.read_text().splitlines()
            now = time.time()
            for line in lines[seen:]:
                if line.endswith("}"):
                    stamps.append((now, json.loads(line)["step"]))
                    seen += 1
        time.sleep(0.02)


def _kill_leftovers(tag: str, session: int) -> None:
    """SIGKILL (by PID) what the drill left behind: processes in the driver's session (Ray renames its daemons,
    which hides their environment) or carrying the drill's tag."""
    needle = f"VIDTRON_BENCH_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            sid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
            if sid == session or needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def _drill(launcher: str, data: Path, run_dir: Path) -> dict:
    tag = uuid.uuid4().hex
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "VIDTRON_BENCH_TAG": tag}
    cmd = [sys.executable, "-m", "vidtron.launch.train", f"launcher={launcher}", f"data.root={data}"]
    cmd += [f"run_dir={run_dir}", *DRILL]
    stamps: list[tuple[float, int]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir / "metrics.jsonl", stamps, stop), daemon=True)
    watcher.start()
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        stop.set()
        watcher.join()
        _kill_leftovers(tag, proc.pid)
    if proc.returncode:
        raise RuntimeError(f"{launcher} drill failed:\n{err[-4000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    t_kill = next(e["time"] for e in events if e["event"] == "fault-injected")
    resume = next(e for e in events if e["event"] == "resume")
    restarted = next(e["time"] for e in events if e["event"] == "start" and e["time"] > t_kill)
    first = next(t for t, step in stamps if t > restarted and step == resume["step"] + 1)
    return {
        "crash_to_first_resumed_step_s": round(first - t_kill, 2),
        "crash_to_restarted_start_s": round(restarted - t_kill, 2),
        "restarted_start_to_first_step_s": round(first - restarted, 2),
        "resumed_from_step": resume["step"],
        "steps_recomputed": KILL_AT - resume["step"],
        "total_wall_s": round(time.time() - t0, 1),
    }


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run(out_dir: str | Path | None = None) -> dict:
    result: dict = {"kill_at_step": KILL_AT, "checkpoint_every": 2}
    short = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))  # short: Ray keeps its AF_UNIX sockets in the run dir
    try:
        data = short / "data"
        data_main(["synth", "--out", str(data), "--clips", "32", "--shard-size", "16"])
        result["torchrun"] = _drill("torchrun", data, short / "tr")
        result["ray"] = _drill("ray", data, short / "ray") if _has_ray() else "skipped: ray is not installed"
    finally:
        shutil.rmtree(short, ignore_errors=True)
    write_result("restart", result, out_dir)
    return result


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else None))
