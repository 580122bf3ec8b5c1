"""launcher=ray: a SIGKILLed Ray Train worker restarts the group, which resumes from our committed checkpoint.

Ray is started privately by the command under test (`ray.init(address="local")`, no dashboard). The driver
runs in a session of its own and with a tag in its environment; every process of that session or with that
tag still alive afterwards is SIGKILLed by PID (never `ray stop`, which would stop other users' clusters).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.test_faults import (
    STEPS,
    assert_matches_reference,
    assert_nothing_outside,
    assert_resumed_from,
    events,
    reference,
    sandbox,
    train_cmd,
)

pytest.importorskip("ray", reason="launcher=ray needs ray[train] (pip install 'ray[train]')")

RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _session(pid: str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp session


def run_pids(tag: str, sessions: set[int]) -> list[int]:
    """Live processes of a run under test: the tag in their environment, or in a driver's session (Ray renames
    its daemons, which overwrites the environment /proc shows, but they stay in the driver's session)."""
    needle = f"VIDTRON_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _session(entry.name) in sessions or needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def kill_run(tag: str, sessions: set[int], timeout_s: float = 20) -> list[int]:
    """SIGKILL (by PID) every live process of the run and wait until none is left; returns those killed."""
    killed = set()
    deadline = time.time() + timeout_s
    while (pids := run_pids(tag, sessions)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return sorted(killed)


class RaySandbox:
    """cwd, env and a short run_dir (Ray keeps its session, with AF_UNIX sockets, in it); drivers started through
    `start()` get a session of their own, so `cleanup()` finds everything they started."""

    def __init__(self, tmp_path: Path):
        self.cwd, self.env = sandbox(tmp_path)
        self.short = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
        self.run_dir = self.short / "run"
        self.tag = uuid.uuid4().hex
        self.sessions: set[int] = set()
        self.env.update(RAY_TEST_ENV, VIDTRON_TEST_TAG=self.tag)
        self.env.pop("RAY_ADDRESS", None)

    def start(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, start_new_session=True, text=True, **kwargs)
        self.sessions.add(proc.pid)
        return proc

    def run(self, cmd: list[str], timeout: float = 600) -> None:
        proc = self.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:] + err[-8000:]

    def cleanup(self) -> list[int]:
        return kill_run(self.tag, self.sessions)


@pytest.fixture
def ray_sandbox(tmp_path):
    box = RaySandbox(tmp_path)
    yield box
    box.cleanup()
    shutil.rmtree(box.short, ignore_errors=True)


@pytest.fixture(scope="module")
def ref(synth_data, tmp_path_factory):
    return reference(synth_data, tmp_path_factory)


def test_sigkilled_worker_restarts_the_group_from_our_checkpoint(synth_data, ref, ray_sandbox, tmp_path):
    box = ray_sandbox
    extra = ["faults.kill_rank=1", "faults.kill_at_step=5", "launcher.max_failures=2"]
    box.run(train_cmd(synth_data, box.run_dir, *extra, launcher="ray"))
    ev = assert_resumed_from(box.run_dir, 4)
    assert [e["attempts"] for e in ev if e["event"] == "restart"] == [{"ray": 1}]
    assert_matches_reference(box.run_dir, ref)
    placement = json.loads((box.run_dir / "ray" / "placement.json").read_text())  # the restarted group's record
    assert (placement["attempt"], placement["world"], list(placement["nodes"].values())) == (1, 2, [[0, 1]])
    assert (box.run_dir / "ray" / "tmp").is_dir()  # Ray's own session files stayed in the run dir
    assert_nothing_outside(tmp_path)
    assert box.cleanup() == []  # ray.shutdown() left no process behind


@pytest.mark.slow
def test_rerun_after_the_driver_dies_resumes(synth_data, ref, ray_sandbox, tmp_path):
    """SIGKILL the driver mid-run, clean its orphans by PID, run the same command again: it resumes and finishes."""
    box = ray_sandbox
    cmd = train_cmd(synth_data, box.run_dir, "faults.step_delay_s=1", launcher="ray")
    driver = box.start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not (box.run_dir / "checkpoints" / "step_000004").exists():
            assert driver.poll() is None and time.time() - t0 < 300
            time.sleep(0.2)
    finally:
        driver.kill()
        driver.wait()
    assert box.cleanup()  # the orphans of the dead driver (Ray's daemons and workers)
    box.run(cmd)
    resumes = [e["step"] for e in events(box.run_dir) if e["event"] == "resume"]
    assert len(resumes) == 1 and 4 <= resumes[0] < STEPS
    assert_matches_reference(box.run_dir, ref)
    assert_nothing_outside(tmp_path)


RAY_DRILLS = {
    # fault overrides -> the step the run must resume from (or roll back to)
    "corrupt-then-kill": (["faults.corrupt_checkpoint=6", "faults.kill_rank=1", "faults.kill_at_step=7"], 4),
    "kill-during-async-save": (
        ["trainer.async_checkpoint=true", "faults.kill_rank=0", "faults.kill_during_checkpoint=6"],
        4,
    ),
    "hung-rank": (["faults.hang_rank=1", "faults.hang_at_step=5", "trainer.collective_timeout_s=12"], 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("drill", sorted(RAY_DRILLS))
def test_fault_drills_under_ray(drill, synth_data, ref, ray_sandbox, tmp_path):
    """The torchrun drills of tests/test_faults.py, under Ray Train: the group restarts and resumes from the last
    good committed checkpoint, and the final parameters equal the uninterrupted run's."""
    box = ray_sandbox
    extra, resume_step = RAY_DRILLS[drill]
    box.run(train_cmd(synth_data, box.run_dir, *extra, "launcher.max_failures=2", launcher="ray"))
    ev = assert_resumed_from(box.run_dir, resume_step)
    assert [e["attempts"] for e in ev if e["event"] == "restart"] == [{"ray": 1}]
    assert_matches_reference(box.run_dir, ref)
    assert_nothing_outside(tmp_path)
    assert box.cleanup() == []


@pytest.mark.slow
def test_nan_rollback_under_ray(synth_data, ref, ray_sandbox, tmp_path):
    box = ray_sandbox
    extra = ["faults.nan_at_step=5", "faults.nan_steps=2", "trainer.max_bad_steps=2", "trainer.skip_bad_batches=false"]
    box.run(train_cmd(synth_data, box.run_dir, *extra, launcher="ray"))
    rollbacks = [e for e in events(box.run_dir) if e["event"] == "rollback"]
    assert [(e["from_step"], e["to_step"]) for e in rollbacks] == [(6, 4)]
    assert_matches_reference(box.run_dir, ref)
    assert box.cleanup() == []
