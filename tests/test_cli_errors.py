"""Bad input: one clear line naming the field, the value and the fix; exit code 2; nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vidtron.launch import data as data_cli
from vidtron.launch import train as train_cli

TRAIN_CASES = [
    (["recipe=video_gan"], "recipe='video_gan'", "dit_t2v"),
    (["model.flavor=dit-huge"], "model.flavor='dit-huge'", "dit-tiny"),
    (["data.frames=8"], "data.frames=8", "4k+1"),
    (["data.height=100"], "data.height=100", "multiple of 16"),
    (["trainer.steps=many"], "trainer.steps='many'", "Integer"),
    (["trainer.stepz=3"], "trainer.stepz", "unknown key"),
    (["parallel.tp=3"], "parallel", "processes"),
    (["parallel.zero.engine=deepspeed", "parallel.tp=2"], "parallel.tp=2", "without tensor parallelism"),
]


@pytest.mark.parametrize("overrides,field,fix", TRAIN_CASES)
def test_train_config_errors(overrides, field, fix, synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = train_cli.main([f"data.root={synth_data}", f"run_dir={run}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vidtron-train: error:"), err
    assert field in err[0] and fix in err[0], err[0]
    assert not run.exists()  # nothing written


def test_missing_data_dir(tmp_path, capsys):
    rc = train_cli.main([f"data.root={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.root=" in err and "vidtron-data synth" in err


def test_corrupt_shard(synth_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in synth_data.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:30000])  # truncated mid-sample
    rc = train_cli.main([f"data.root={bad}", f"run_dir={tmp_path / 'run'}", "metrics.wandb=false", "trainer.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and str(shard) in err[0] and ("corrupt" in err[0] or "unreadable" in err[0]), err


@pytest.mark.parametrize(
    "args,field",
    [(["--frames", "10"], "--frames=10"), (["--height", "40"], "--height=40"), (["--clips", "0"], "--clips=0")],
)
def test_synth_errors_write_nothing(args, field, tmp_path, capsys):
    out = tmp_path / "out"
    rc = data_cli.main(["synth", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and not out.exists()
    assert not list(tmp_path.iterdir())


def test_real_exit_code_from_the_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vidtron.launch.train", "model.flavor=nope", f"data.root={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert "model.flavor='nope'" in proc.stderr or "data.root" in proc.stderr
