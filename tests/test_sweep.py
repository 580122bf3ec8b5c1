"""The scaling sweep: a tiny real sweep through vidtron-train subprocesses, resumability, and argument errors.

One sweep (3 sizes x 4 budgets, 11 steps a run) is trained once per module; tests that rerun parts of it work
on a copy, so each starts from the finished sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from vidtron.errors import ConfigError
from vidtron.launch.sweep import main, parse_args
from vidtron.recipes.scaling import sweep
from vidtron.recipes.scaling.grid import SweepConfig, family, parse_budgets
from vidtron.recipes.scaling.sweep import run_sweep, smoothed_loss, to_curves

SIZES = ["w16-d1", "w32-d1", "w32-d2"]
# 384 video tokens a step (batch 8 x 3x4x4 tokens): budgets read at steps 1, 3, 5, 10; runs train 11 steps
ARGS = ["sizes=16x1,32x1,32x2", "budgets=384:3840:4", "checkpoint_every=4", "drop_edges=false", "n_boot=20"]
PARALLEL = min(2, os.cpu_count() or 1)


def _config(out, data_root, *extra: str) -> SweepConfig:
    return parse_args([f"out={out}", f"data.root={data_root}", *ARGS, f"max_parallel={PARALLEL}", *extra])


@pytest.fixture(scope="module")
def finished(synth_data, tmp_path_factory):
    """A finished tiny sweep: (out folder, run_sweep status)."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    return out, run_sweep(_config(out, synth_data))


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished sweep folder."""
    dst = tmp_path / "out"
    shutil.copytree(finished[0], dst)
    return dst


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_sweep_writes_results_and_report(finished):
    out, status = finished
    assert sorted(status["ran"]) == SIZES and status["failed"] == [] and status["skipped"] == []
    assert all((out / "runs" / s / "DONE").exists() for s in SIZES)
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 3 * 4 and (out / "results.csv").read_text().count("\n") == 1 + 12
    row = results["rows"][-1]
    assert row["tokens"] == row["step"] * 384 and row["flops"] > row["step"]  # cumulative accounting
    curves = results["curves"]
    assert [len(c["loss"]) for c in curves] == [4, 4, 4]
    assert [c["params"] for c in curves] == sorted(c["params"] for c in curves)
    for name in ("report.md", "report.json", "loss_vs_compute.png", "optimal_allocation.png"):
        assert (out / name).exists(), name
    assert set(status["report"]["approach1"]) >= {"a1", "b1", "a2", "b2"}


def test_rerun_skips_finished_points(copy, synth_data):
    before = {s: (copy / "runs" / s / "events.jsonl").read_text() for s in SIZES}
    status = run_sweep(_config(copy, synth_data))
    assert status["ran"] == [] and sorted(status["skipped"]) == SIZES
    assert {s: (copy / "runs" / s / "events.jsonl").read_text() for s in SIZES} == before  # no process started
    assert status["report"] is not None


def test_deleted_done_reruns_only_that_point(copy, synth_data):
    run = copy / "runs" / "w32-d1"
    (run / "DONE").unlink()
    seen = len(_events(run))
    others = {s: (copy / "runs" / s / "events.jsonl").read_text() for s in ("w16-d1", "w32-d2")}
    status = run_sweep(_config(copy, synth_data))
    assert status["ran"] == ["w32-d1"] and sorted(status["skipped"]) == ["w16-d1", "w32-d2"]
    assert {s: (copy / "runs" / s / "events.jsonl").read_text() for s in others} == others
    new = _events(run)[seen:]  # resumed from its final checkpoint: nothing left to train
    assert [(e["event"], e["step"]) for e in new if e["event"] in ("resume", "start")] == [
        ("resume", 11),
        ("start", 11),
    ]
    assert (run / "DONE").exists()


def test_crashed_point_resumes_from_its_checkpoint(copy, synth_data):
    """A run killed after its step-8 checkpoint (no DONE, no step-11 checkpoint) continues from step 8."""
    run = copy / "runs" / "w16-d1"
    (run / "DONE").unlink()
    shutil.rmtree(run / "checkpoints" / "step_000011")
    status = run_sweep(_config(copy, synth_data))
    assert status["ran"] == ["w16-d1"]
    resumes = [e for e in _events(run) if e["event"] == "resume"]
    assert resumes[-1]["step"] == 8
    assert (run / "checkpoints" / "step_000011").exists() and (run / "DONE").exists()


def test_failed_point_is_reported_and_rerun(copy, synth_data, monkeypatch):
    (copy / "runs" / "w32-d2" / "DONE").unlink()
    real = sweep.train_command

    def crashing(point):
        return [sys.executable, "-c", "raise SystemExit(3)"] if point.name == "w32-d2" else real(point)

    monkeypatch.setattr(sweep, "train_command", crashing)
    status = run_sweep(_config(copy, synth_data))
    assert status["failed"] == ["w32-d2"] and status["report"] is None
    assert not (copy / "runs" / "w32-d2" / "DONE").exists()
    monkeypatch.setattr(sweep, "train_command", real)
    status = run_sweep(_config(copy, synth_data))
    assert status["ran"] == ["w32-d2"] and status["failed"] == [] and status["report"] is not None


def test_other_settings_in_the_same_folder_are_refused(copy, synth_data):
    with pytest.raises(ConfigError, match="optim.lr"):
        run_sweep(_config(copy, synth_data, "optim.lr=1e-4"))


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["launcher=slurm"], "launcher"),
        (["sizes=1"], "sizes"),
        (["sizes=6"], "sizes"),  # the 6-member family repeats a width x depth
        (["sizes=24x1,32x1"], "sizes"),
        (["budgets=5e4:1e4:3"], "budgets"),
        (["budgets=1,2"], "budgets"),  # both read at step 1
        (["schedule=linear"], "schedule"),
        (["smooth=1.5"], "smooth"),
        (["max_parallel=-1"], "max_parallel"),
        (["trainer.steps=5"], "trainer.steps"),
        (["optim.lrr=1"], "optim.lrr"),
        (["data.format=video"], "data.format"),  # FLOPs are counted for fixed-shape clips
        (["bogus=1"], "bogus"),
        (["recipe=dit_t2v"], "recipe"),
        (["head_dim=x"], "head_dim"),
        (["data.root=/nonexistent/folder"], "data.root"),
        (["out="], "out"),
    ],
)
def test_bad_arguments_exit_2_naming_the_field(args, field, synth_data, tmp_path, capsys):
    argv = [f"out={tmp_path / 'o'}", f"data.root={synth_data}", "sizes=16x1,32x1", "budgets=1e3:1e4:3", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidtron-sweep: error:") and field in err
    assert not (tmp_path / "o" / "runs").exists()  # nothing started


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="data.root"):
        SweepConfig(out="x")
    with pytest.raises(ValueError, match="launcher"):
        SweepConfig(out="x", launcher="slurm", train={"data.root": "d"})


def test_family_grows_width_and_depth_together():
    sizes = family(5)
    assert [(s.width, s.depth) for s in sizes] == [(32, 1), (48, 2), (64, 2), (96, 3), (128, 4)]
    assert sizes[-1].overrides() == {"num_heads": 8, "head_dim": 16, "num_double_blocks": 4, "num_single_blocks": 4}
    assert family(2, single_ratio=2)[1].overrides()["num_single_blocks"] == 8


def test_budgets_and_smoothing():
    assert parse_budgets("1e4:1e6:3") == [10_000, 100_000, 1_000_000]
    assert parse_budgets("[3000, 1000]") == [1000, 3000]
    losses = {s: float(s) for s in range(1, 31)}
    assert smoothed_loss(losses, 20, 0.1) == (20.0, 5)  # steps 18..22, centred
    assert smoothed_loss(losses, 20, 0.0) == (20.0, 1)
    rows = [
        {"size": "a", "params": 2, "params_non_embedding": 1, "step": s, "flops": f, "tokens": s, "loss": 1.0}
        for s, f in ((1, 10), (1, 10), (2, 20))
    ]
    assert to_curves(rows) == [{"size": "a", "params": 1, "flops": [10, 20], "tokens": [1, 2], "loss": [1.0, 1.0]}]


def test_help_lists_every_key(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {key}=" in text for key in ("out", "sizes", "budgets", "max_parallel", "budget_pflops"))
