"""Data prefetch and the per-step throughput metrics.

The prefetcher hands over exactly the batch of the asked-for (step, cursor): ahead-of-time batches are dropped when
the trainer jumps (resume, rollback), an error in the background thread reaches the trainer, and training with
prefetch is bitwise the same as without. Every metrics line has step_time_s, data_wait_s and peak memory; MFU
appears when a peak FLOP/s is known (trainer.peak_tflops on CPU).
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.test_parallel_parity import config
from vidtron.platform.distributed import DistContext
from vidtron.platform.metrics import read_metrics
from vidtron.platform.prefetch import Prefetcher
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo

ONE = DistContext(0, 1, 0, torch.device("cpu"))


def test_prefetcher_follows_the_positions_and_restarts_on_a_jump():
    made, threads = [], set()

    def make(step, cursor):
        made.append((step, cursor))
        threads.add(threading.current_thread().name)
        return f"{step}:{cursor}"

    pf = Prefetcher(make, lambda c: c + 4, depth=2)
    try:
        assert [pf.get(s, 4 * (s - 1))[0] for s in (1, 2, 3)] == ["1:0", "2:4", "3:8"]
        assert pf.get(2, 4)[0] == "2:4"  # a rollback: the queue is dropped, production restarts there
        assert pf.get(3, 8)[0] == "3:8"
        assert threads == {"vidtron-prefetch"}
    finally:
        pf.close()


def test_prefetcher_raises_the_producer_error_where_the_batch_is_wanted():
    def make(step, cursor):
        if step == 2:
            raise ValueError("shard 7 is corrupt")
        return step

    pf = Prefetcher(make, lambda c: c + 1)
    try:
        assert pf.get(1, 0)[0] == 1
        with pytest.raises(ValueError, match="shard 7"):
            pf.get(2, 1)
    finally:
        pf.close()


def test_prefetch_changes_nothing_and_metrics_have_wait_time_memory_and_mfu(pad_data, tmp_path):
    runs = {}
    for depth in (0, 2):
        extra = ["trainer.steps=4", f"trainer.prefetch={depth}", "trainer.peak_tflops=0.05"]
        cfg = config(pad_data, tmp_path / f"p{depth}", *extra)
        runs[depth] = train(cfg, DiTTextToVideo(cfg), ONE).losses
    assert runs[0] == runs[2]
    records = read_metrics(tmp_path / "p2")
    for rec in records:
        assert {"step_time_s", "data_wait_s", "peak_rss_gib", "mfu", "tokens_per_s"} <= rec.keys()
        assert 0 < rec["mfu"] < 1 and rec["data_wait_s"] >= 0
