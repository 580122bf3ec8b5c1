"""Shared fixtures: generated data (made once per session), quiet wandb, one CPU thread per process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _synth(out, clips: int = 32, frames: int = 9, size: int = 64, seed: int = 0):
    from vidtron.launch.data import main

    args = ["synth", "--out", str(out), "--clips", str(clips), "--frames", str(frames)]
    args += ["--height", str(size), "--width", str(size), "--seed", str(seed), "--shard-size", "16"]
    assert main(args) == 0
    return out


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (steadier timings on a shared machine), then restore the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """32 generated 9x64x64 clips in 2 shards, plus the fitted stand-in autoencoder."""
    return _synth(tmp_path_factory.mktemp("data") / "synth")


@pytest.fixture(scope="session")
def synth_data_64(tmp_path_factory):
    """64 generated clips (the demo's size) for the convergence test."""
    return _synth(tmp_path_factory.mktemp("data64") / "synth", clips=64)


@pytest.fixture(scope="session")
def pad_data(tmp_path_factory):
    """The parity data (tests/test_parallel_parity.py, test_deepspeed.py): 32 clips of 9 x 48 x 80, so every CP and
    SP layout pads its 45 video tokens."""
    from vidtron.launch.data import main

    out = tmp_path_factory.mktemp("parity") / "data"
    args = ["synth", "--out", str(out), "--clips", "32", "--frames", "9", "--height", "48", "--width", "80"]
    assert main(args) == 0
    return out
