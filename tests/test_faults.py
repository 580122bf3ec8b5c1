"""Fault drills on 2 CPU processes under torchrun: every run ends with the parameters of an uninterrupted run.

Each drill trains the same 10 steps (checkpoints every 2) as the reference run, with one fault injected
(`faults.*`); the final checkpoint must match the reference bitwise (2-rank gloo FSDP is deterministic, and
resume restores model, optimizer, LR step, data position and RNG), the per-step losses too, no torn
checkpoint may be resumed, and nothing may be written outside the run dir (the command runs in an empty
working folder with an empty HOME and TMPDIR). `test_ray.py` and `test_slurm.py` reuse these helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import full_params, run_training
from vidtron.errors import ConfigError
from vidtron.launch.train import main as train_main
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.platform.checkpoint import committed_checkpoints, load_model_weights
from vidtron.platform.metrics import read_metrics
from vidtron.recipes.registry import compose_config

STEPS = 10
COMMON = [
    f"trainer.steps={STEPS}",
    "trainer.checkpoint_every=2",
    "trainer.keep_last=10",
    "seed=3",
    "optim.warmup_steps=3",
    "metrics.wandb=false",
    "trainer.progress=false",
]


def sandbox(tmp_path: Path) -> tuple[Path, dict]:
    """An empty working folder plus an environment whose HOME and TMPDIR are empty folders of their own."""
    for name in ("cwd", "home", "tmp"):
        (tmp_path / name).mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set in this process by `import torch._dynamo`; children pick their own
    return tmp_path / "cwd", env


def assert_nothing_outside(tmp_path: Path) -> None:
    """The working folder and HOME stay empty; the temp dir holds only the folder `import torch._dynamo` makes."""
    leftovers = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("cwd", "home", "tmp")}
    leftovers["tmp"] = [n for n in leftovers["tmp"] if not n.startswith("torchinductor_")]
    assert leftovers == {"cwd": [], "home": [], "tmp": []}, leftovers


def train_cmd(data, run_dir, *extra: str, launcher: str = "torchrun") -> list[str]:
    return [sys.executable, "-m", "vidtron.launch.train", f"launcher={launcher}", f"data.root={data}"] + [
        f"run_dir={run_dir}",
        *COMMON,
        *extra,
    ]


def run_torchrun(data, tmp_path: Path, *extra: str, timeout: float = 400) -> Path:
    """Train the drill config under `launcher=torchrun` (2 processes, 3 restarts); return the run dir."""
    cwd, env = sandbox(tmp_path)
    run_dir = tmp_path / "run"
    res = subprocess.run(
        train_cmd(data, run_dir, *extra), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return run_dir


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest committed checkpoint's weights, gathered into one unsharded model."""
    model = DiT(dit_config("dit-tiny"))
    path = committed_checkpoints(run_dir)[-1]
    assert path.name == f"step_{STEPS:06d}", path
    load_model_weights(path, model)
    return full_params(model)


def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted 2-process run (computed once per session, kept under pytest's base temp)."""
    base = tmp_path_factory.getbasetemp() / "fault_reference"
    if not (base / "run" / "checkpoints" / f"step_{STEPS:06d}").exists():
        base.mkdir(exist_ok=True)
        run_torchrun(data, base)
    run_dir = base / "run"
    return {"params": final_params(run_dir), "losses": [r["loss"] for r in read_metrics(run_dir)]}


def assert_matches_reference(run_dir: Path, ref: dict) -> None:
    """Bitwise-equal final parameters and per-step losses (the last record of each step)."""
    params = final_params(run_dir)
    worst = max((params[k] - ref["params"][k]).abs().max().item() for k in params)
    assert all(torch.equal(params[k], ref["params"][k]) for k in params), f"max |diff| {worst:.3g}"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == ref["losses"]


def assert_resumed_from(run_dir: Path, step: int) -> list[dict]:
    ev = events(run_dir)
    kinds = [e["event"] for e in ev]
    # a surviving rank logs "failure" only if its collective errors before torchrun stops it: a race, not asserted
    assert "restart" in kinds and "fault-injected" in kinds, kinds
    resumes = [e for e in ev if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [step], resumes
    assert all(not e["path"].endswith(".tmp") for e in resumes)  # a torn save is never resumed
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    return ev


@pytest.fixture(scope="module")
def ref(synth_data, tmp_path_factory):
    return reference(synth_data, tmp_path_factory)


# ---- fast checks in this process ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("faults.kill_at_step=-1", "faults.kill_at_step"),
        ("faults.nan_steps=0", "faults.nan_steps"),
        ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
        ("trainer.collective_timeout_s=0", "trainer.collective_timeout_s"),
        ("launcher=slurm", "launcher.cluster"),
    ],
)
def test_bad_fault_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compose_config(["data.root=x", override])


def test_kill_rank_must_exist_before_anything_starts(synth_data, tmp_path, capsys):
    argv = [f"data.root={synth_data}", f"run_dir={tmp_path / 'run'}", "faults.kill_rank=2", "faults.kill_at_step=1"]
    assert train_main([*argv, "launcher=torchrun"]) == 2
    assert "faults.kill_rank=2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_nan_step_is_skipped_and_counted(synth_data, tmp_path):
    """A NaN loss below trainer.max_bad_steps: no optimizer update, the step is counted, the run goes on."""
    common = ["trainer.steps=10", "seed=3", "trainer.progress=false"]
    before = run_training(synth_data, tmp_path / "two", *common, "trainer.stop_after_steps=2")
    state = run_training(synth_data, tmp_path / "nan", *common, "trainer.stop_after_steps=3", "faults.nan_at_step=3")
    assert state.skipped_steps == 1 and state.step == 3
    a, b = full_params(before.model), full_params(state.model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 changed nothing
    rec = read_metrics(tmp_path / "nan")[-1]
    assert rec["step"] == 3 and rec["skipped"] and rec["skipped_steps"] == 1
    again = run_training(synth_data, tmp_path / "nan", *common)  # the fault does not fire twice
    assert again.skipped_steps == 0 and again.step == 10


def test_nan_streak_without_a_checkpoint_fails_with_advice(synth_data, tmp_path):
    args = ["trainer.steps=6", "faults.nan_at_step=1", "faults.nan_steps=3", "trainer.max_bad_steps=2"]
    with pytest.raises(RuntimeError, match="no committed checkpoint to roll back to"):
        run_training(synth_data, tmp_path / "run", *args)


def test_async_checkpoints_equal_sync_ones(synth_data, tmp_path):
    """trainer.async_checkpoint: same committed checkpoints, exact resume from them."""
    common = ["trainer.steps=6", "trainer.checkpoint_every=2", "seed=5", "trainer.progress=false"]
    sync = run_training(synth_data, tmp_path / "sync", *common)
    run_training(synth_data, tmp_path / "async", *common, "trainer.async_checkpoint=true", "trainer.stop_after_steps=4")
    assert [p.name for p in committed_checkpoints(tmp_path / "async")] == ["step_000002", "step_000004"]
    resumed = run_training(synth_data, tmp_path / "async", *common, "trainer.async_checkpoint=true")
    assert not list((tmp_path / "async" / "checkpoints").glob("*.tmp"))
    a, b = full_params(sync.model), full_params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- drills: 2 processes under torchrun ------------------------------------------------------------------------


def test_nan_streak_rolls_back_to_the_last_checkpoint(synth_data, ref, tmp_path):
    """NaN at steps 5, 6 with trainer.max_bad_steps=2: both skipped, then a rollback to step 4 and a clean redo (a
    transient fault: trainer.skip_bad_batches=false replays the same batches; tests/test_bad_batches.py covers the
    default, which moves past them)."""
    extra = ["faults.nan_at_step=5", "faults.nan_steps=2", "trainer.max_bad_steps=2", "trainer.skip_bad_batches=false"]
    run = run_torchrun(synth_data, tmp_path, *extra)
    rollbacks = [e for e in events(run) if e["event"] == "rollback"]
    assert [(e["from_step"], e["to_step"]) for e in rollbacks] == [(6, 4)]
    assert_matches_reference(run, ref)
    assert_nothing_outside(tmp_path)


def test_sigkill_after_a_corrupted_checkpoint_resumes_from_the_one_before(synth_data, ref, tmp_path):
    """Step 6's checkpoint gets a flipped byte, rank 1 is SIGKILLed after step 7: torchrun restarts the group,
    the checksum check rejects step 6 (with a warning) and the run resumes from step 4."""
    extra = ["faults.corrupt_checkpoint=6", "faults.kill_rank=1", "faults.kill_at_step=7"]
    run = run_torchrun(synth_data, tmp_path, *extra)
    ev = assert_resumed_from(run, 4)
    skipped = [e for e in ev if e["event"] == "checkpoint-skipped"]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("step_000006") and "sha256" in skipped[0]["reason"]
    fired = {e["fault"]: e["step"] for e in ev if e["event"] == "fault-injected"}
    assert fired == {"corrupt_checkpoint": 6, "kill_at_step": 7}
    assert_matches_reference(run, ref)
    assert_nothing_outside(tmp_path)


def test_sigkill_inside_an_async_checkpoint_write_leaves_it_torn(synth_data, ref, tmp_path):
    """Rank 0 dies while step 6's async save is in flight: step_000006.tmp is never resumed; step 4 is."""
    extra = ["trainer.async_checkpoint=true", "faults.kill_rank=0", "faults.kill_during_checkpoint=6"]
    run = run_torchrun(synth_data, tmp_path, *extra)
    ev = assert_resumed_from(run, 4)
    assert [e["step"] for e in ev if e["event"] == "fault-injected"] == [6]
    assert_matches_reference(run, ref)
    assert_nothing_outside(tmp_path)


@pytest.mark.slow  # make test keeps the heartbeat drill below, which restarts the same hang sooner
def test_a_hung_rank_times_out_and_the_group_restarts(synth_data, ref, tmp_path):
    """Rank 1 stops after step 5 and heartbeats are off; rank 0's next collective times out
    (trainer.collective_timeout_s), the process fails, torchrun restarts the group, and the run resumes from step 4."""
    extra = ["faults.hang_rank=1", "faults.hang_at_step=5", "trainer.collective_timeout_s=12"]
    run = run_torchrun(synth_data, tmp_path, *extra)
    ev = assert_resumed_from(run, 4)
    failures = [e for e in ev if e["event"] == "failure"]
    assert any(e["rank"] == 0 and "timed out" in e["error"].lower() for e in failures), failures
    assert_matches_reference(run, ref)
    assert_nothing_outside(tmp_path)


def test_a_hung_rank_is_named_by_its_heartbeat_long_before_the_collective_timeout(synth_data, ref, tmp_path):
    """Rank 1 stops after step 5 with the collective timeout at 600 s: its heartbeat watchdog (trainer.hang_timeout_s)
    reports it with rank and host and exits, torchrun restarts the group, and the run resumes from step 4."""
    extra = ["faults.hang_rank=1", "faults.hang_at_step=5", "trainer.collective_timeout_s=600"]
    run = run_torchrun(synth_data, tmp_path, *extra, "trainer.hang_timeout_s=6")
    ev = events(run)
    assert "restart" in [e["event"] for e in ev]
    assert [e["step"] for e in ev if e["event"] == "resume"] == [4]
    hangs = [e for e in ev if e["event"] == "hang"]
    assert any(e["rank"] == 1 and e["host"] and e["step"] == 5 for e in hangs), hangs
    assert not any("timed out" in e.get("error", "").lower() for e in ev if e["event"] == "failure")
    beats = {p.name: json.loads(p.read_text()) for p in (run / "heartbeats").glob("rank_*.json")}
    assert set(beats) == {"rank_0.json", "rank_1.json"} and all(b["step"] == 10 for b in beats.values())
    assert_matches_reference(run, ref)
    assert_nothing_outside(tmp_path)
