"""Checkpoint stall per save, synchronous vs asynchronous (DCP async_save), one process.

A DiT of ~32M parameters with AdamW state (~0.4 GB per checkpoint) trains on random data; every few steps
it saves through the trainer's `Checkpointer`. The stall is the time the step loop spends inside the save
call: the whole write for sync; for async the staging copy plus any wait for the previous write (also reported
apart). Both modes alternate twice in one process so machine noise hits both; medians per save are compared.
Run: python -m bench.bench_checkpoint
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from vidtron.models.dit import DiT
from vidtron.platform.checkpoint import Checkpointer, checkpoint_dir
from vidtron.platform.distributed import DistContext
from vidtron.recipes.dit_t2v.task import dit_config

ARCH = {"num_heads": 8, "head_dim": 64, "num_double_blocks": 2, "num_single_blocks": 2}
SAVES = 4
STEPS_BETWEEN = 6  # enough work for a background write to finish before the next save
CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _fake_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """An optimizer step on random gradients (stands in for forward + backward)."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)


def _one_mode(async_save: bool, root: Path, model, opt) -> dict:
    saver = Checkpointer(root, CTX, keep_last=2, async_save=async_save)
    step_times, waits = [], []
    for save in range(1, SAVES + 1):
        for _ in range(STEPS_BETWEEN):
            t0 = time.perf_counter()
            _fake_step(model, opt)
            step_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        saver.wait()  # async: the previous write, if still running (part of the stall, timed apart)
        waits.append(time.perf_counter() - t0)
        saver.save(save, model, opt, {"data": {"cursor": 0}})
    saver.wait()
    stalls = [w + s for w, s in zip(waits, saver.stalls_s)]
    size = sum(f.stat().st_size for f in checkpoint_dir(root).rglob("*") if f.is_file()) / 2
    return {"stalls_s": stalls, "waits_s": waits, "step_s": step_times, "bytes": size}


def run(out_dir: str | Path | None = None) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DiT(dit_config("dit-tiny", ARCH))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _fake_step(model, opt)  # materialize the optimizer state
    stalls = {"sync": [], "async": []}
    steps = {"sync": [], "async": []}
    waits = []
    size = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(2):
            for mode in ("sync", "async"):
                res = _one_mode(mode == "async", Path(tmp) / f"{mode}{rep}", model, opt)
                shutil.rmtree(Path(tmp) / f"{mode}{rep}")
                stalls[mode] += res["stalls_s"][1:]  # the first save of a mode pays one-off set-up
                waits += res["waits_s"][1:] if mode == "async" else []
                steps[mode] += res["step_s"]
                size = res["bytes"]
    sync_med, async_med = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(size / 2**20, 1),
        "saves_per_mode": len(stalls["sync"]),
        "sync_stall_s_median": sync_med,
        "async_stall_s_median": async_med,
        "stall_ratio_async_over_sync": async_med / sync_med,
        "async_wait_for_previous_write_s_median": statistics.median(waits),
        "sync_stalls_s": stalls["sync"],
        "async_stalls_s": stalls["async"],
        "step_s_median_sync_mode": statistics.median(steps["sync"]),
        "step_s_median_async_mode": statistics.median(steps["async"]),  # includes contention with the writer thread
    }
    write_result("checkpoint", result, out_dir)
    return result


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else None))
