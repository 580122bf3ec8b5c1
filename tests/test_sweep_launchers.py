"""The sweep under launcher=ray and launcher=slurm: the same results table as launcher=local (each run is
deterministic, so the losses match exactly), DONE-marker resumability, and the sbatch scripts of a dry run.

The Ray sweep runs as a `vidtron-sweep` subprocess in a session of its own (tests/test_ray.py's RaySandbox),
so every Ray process it leaves is found and SIGKILLed by PID. The SLURM sweep uses the real one-node cluster
of tests/slurm_cluster.py and skips, with the reason, where slurmctld / munge are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest

from tests.slurm_cluster import SlurmCluster, missing_reason
from vidtron.launch import sweep_launchers
from vidtron.launch.sweep import parse_args
from vidtron.recipes.scaling.grid import build_points
from vidtron.recipes.scaling.sweep import run_sweep

SIZES = ["w16-d1", "w32-d1"]
# 384 video tokens a step: budgets read at steps 1, 2, 4; each run trains 5 steps
ARGS = ["sizes=16x1,32x1", "budgets=384:1536:3", "checkpoint_every=2", "drop_edges=false", "n_boot=0"]


def _argv(out, data_root, *extra: str) -> list[str]:
    return [f"out={out}", f"data.root={data_root}", *ARGS, "max_parallel=2", *extra]


def _losses(out) -> list[tuple]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [(r["size"], r["step"], r["loss"], r["loss_raw"]) for r in rows]


def _logs(out) -> dict[str, str]:
    return {s: (out / "runs" / s / "events.jsonl").read_text() for s in SIZES}


@pytest.fixture(scope="module")
def local(synth_data, tmp_path_factory):
    """The tiny sweep under launcher=local: its out folder."""
    out = tmp_path_factory.mktemp("local") / "out"
    status = run_sweep(parse_args(_argv(out, synth_data)), sweep_launchers)
    assert sorted(status["ran"]) == SIZES and status["failed"] == []
    return out


def _ray_sweep(box, data_root, out) -> str:
    cmd = [sys.executable, "-m", "vidtron.launch.sweep", *_argv(out, data_root, "launcher=ray")]
    proc = box.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, 1), text[-4000:]  # 1: the two-size fit may refuse to make a report
    assert "failed []" in text, text[-4000:]
    return text


@pytest.mark.slow  # ~80 s: a private Ray instance; make test keeps launcher=ray's kill drill (test_ray.py)
def test_ray_sweep_matches_local_and_resumes(local, synth_data, tmp_path):
    pytest.importorskip("ray", reason="launcher=ray needs ray (pip install 'ray[default]')")
    from tests.test_ray import RaySandbox

    box = RaySandbox(tmp_path)
    out = box.short / "o"  # short: Ray keeps its AF_UNIX sockets under out/ray/tmp
    try:
        text = _ray_sweep(box, synth_data, out)
        assert "skipped (finished) []" in text and all(f"'{s}'" in text.split("skipped")[-2] for s in SIZES)
        assert _losses(out) == _losses(local)
        assert (out / "ray" / "tmp").is_dir()  # Ray's session stayed in the sweep folder
        assert box.cleanup() == []  # ray.shutdown() left no process behind

        (out / "runs" / "w32-d1" / "DONE").unlink()  # as after a crashed task; w16-d1 stays finished
        before = _logs(out)
        text = _ray_sweep(box, synth_data, out)
        assert "ran ['w32-d1'], skipped (finished) ['w16-d1']" in text
        assert _logs(out)["w16-d1"] == before["w16-d1"]  # the finished point was not started
        assert (out / "runs" / "w32-d1" / "DONE").exists() and _losses(out) == _losses(local)
    finally:
        box.cleanup()
        shutil.rmtree(box.short, ignore_errors=True)


def test_slurm_dry_run_prints_one_script_per_point(synth_data, tmp_path, capsys):
    out = tmp_path / "out"
    status = run_sweep(
        parse_args(_argv(out, synth_data, "launcher=slurm", "cluster=local_cpu", "dry_run=true")), sweep_launchers
    )
    printed = capsys.readouterr().out
    assert sorted(status["scripts"]) == SIZES and printed.count("#!/bin/bash") == 2
    for name, script in status["scripts"].items():
        assert script in printed
        assert "-m vidtron.launch.train" in script and f"run_dir={out}/runs/{name}" in script
        assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --time=00:30:00" in script
        assert "export OMP_NUM_THREADS=1" in script and f"--job-name=vidtron-sweep-{name}" in script
    assert not (out / "runs").exists()  # nothing submitted or written


def test_slurm_cluster_name_is_required(synth_data, tmp_path):
    with pytest.raises(ValueError, match="cluster"):
        parse_args(_argv(tmp_path / "o", synth_data, "launcher=slurm"))
    with pytest.raises(ValueError, match="launcher.cluster"):
        parse_args(_argv(tmp_path / "o", synth_data, "launcher=slurm", "cluster=no_such_cluster"))


@pytest.fixture
def slurm(tmp_path_factory, monkeypatch):
    reason = missing_reason()
    if reason:
        warnings.warn(f"SLURM sweep test skipped: {reason}", stacklevel=1)
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    monkeypatch.setenv("SLURM_CONF", str(c.conf))
    monkeypatch.setattr(sweep_launchers, "POLL_S", 0.5)
    yield c
    c.stop()


def test_slurm_sweep_matches_local(slurm, local, synth_data, tmp_path):
    out = tmp_path / "out"
    status = run_sweep(parse_args(_argv(out, synth_data, "launcher=slurm", "cluster=local_cpu")), sweep_launchers)
    assert sorted(status["ran"]) == SIZES and status["failed"] == [], status
    assert _losses(out) == _losses(local)
    for name, job in status["jobs"].items():
        assert slurm.job_state(job) == "COMPLETED"
        assert (out / "runs" / name / "slurm" / f"exit-{job}").read_text().startswith("0 ")
    cfg = parse_args(_argv(out, synth_data, "launcher=slurm", "cluster=local_cpu"))
    status = sweep_launchers.run_points_slurm(build_points(cfg), cfg)  # a rerun, without the report
    assert status["ran"] == [] and sorted(status["skipped"]) == SIZES and status["jobs"] == {}
