"""The trainer: loss falls, resume is exact, torn and damaged checkpoints are never resumed, 2 processes run."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from tests.helpers import full_params, run_training
from vidtron.platform.checkpoint import committed_checkpoints, verify
from vidtron.platform.metrics import read_metrics


def test_loss_falls_on_generated_data(synth_data_64, tmp_path):
    """dit-tiny, fixed seed, 200 steps: mean of the last 10 losses < 0.8 x the mean of the first 10."""
    state = run_training(synth_data_64, tmp_path / "run", "trainer.steps=200", "seed=0")
    first, last = statistics.mean(state.losses[:10]), statistics.mean(state.losses[-10:])
    assert last < 0.8 * first, (first, last)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 201))
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(records[0])


def test_resume_is_exact(synth_data, tmp_path):
    """10 steps, a fresh process state, 10 more == 20 uninterrupted (losses and parameters bitwise)."""
    common = ["trainer.steps=20", "seed=3", "optim.warmup_steps=5"]
    whole = run_training(synth_data, tmp_path / "whole", *common)
    first = run_training(synth_data, tmp_path / "split", *common, "trainer.stop_after_steps=10")
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    second = run_training(synth_data, tmp_path / "split", *common, "trainer.resume=auto")
    assert first.losses + second.losses == whole.losses
    a, b = full_params(whole.model), full_params(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(x)["event"] for x in (tmp_path / "split" / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "resume", "start"]


def test_torn_and_damaged_checkpoints_are_skipped(synth_data, tmp_path):
    run = tmp_path / "run"
    run_training(synth_data, run, "trainer.steps=6", "trainer.checkpoint_every=3", "trainer.keep_last=5")
    ckpts = committed_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_000003", "step_000006"]
    # a torn save (crash before the rename) must never be resumed
    shutil.copytree(ckpts[-1], run / "checkpoints" / "step_000009.tmp")
    # one byte flipped in the newest committed checkpoint: its sha256 check fails -> the previous one is used
    shard = next(ckpts[-1].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sha256" in verify(ckpts[-1])
    with pytest.warns(UserWarning, match="damaged"):
        state = run_training(synth_data, run, "trainer.steps=8", "trainer.checkpoint_every=3", "trainer.keep_last=5")
    assert len(state.losses) == 5  # resumed from step 3, ran 4..8
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint-skipped" for e in events)
    assert [e["step"] for e in events if e["event"] == "resume"] == [3]
    assert not (run / "checkpoints" / "step_000009.tmp").exists()  # cleaned by the next save


def test_two_processes_via_launcher(synth_data, tmp_path):
    """`launcher.nproc_per_node=2` spawns torchrun; the data-parallel run tracks one process closely."""
    args = [f"data.root={synth_data}", "trainer.steps=4", "metrics.wandb=false", "seed=1"]
    cmd = [sys.executable, "-m", "vidtron.launch.train", *args]
    subprocess.run([*cmd, f"run_dir={tmp_path / 'two'}", "launcher.nproc_per_node=2"], check=True, timeout=300)
    single = run_training(synth_data, tmp_path / "one", "trainer.steps=4", "seed=1")
    two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(two) == 4
    assert max(abs(x - y) for x, y in zip(two, single.losses)) < 1e-5
    manifest = json.loads((committed_checkpoints(tmp_path / "two")[-1] / "manifest.json").read_text())
    assert manifest["layout"]["dp_shard"] == 2 and manifest["data"] == {
        "cursor": 32,
        "skip": [],
        "cursor_unit": "samples",
        "global_batch": 8,
    }


def test_wandb_offline_run_is_written(synth_data, tmp_path, monkeypatch):
    """Real wandb in offline mode: a run folder with the logged history appears under run_dir/wandb."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    run_training(synth_data, run, "trainer.steps=2", "metrics.wandb=true")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (run / "wandb_run_id").read_text().strip() in runs[0].name
