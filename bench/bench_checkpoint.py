"""Checkpoint costs: the stall per save, sync vs async (one process), and what manifests cost at 2 and 4 ranks.

Stall: a DiT of ~32M parameters with AdamW state (~0.4 GB per checkpoint) trains on random data; every few steps
it saves through the trainer's `Checkpointer`. The stall is the time the step loop spends inside the save
call: the whole write for sync; for async the staging copy plus any wait for the previous write (also reported
apart). Both modes alternate twice in one process so machine noise hits both; medians per save are compared.

Scaling ("scaling" in the result): dit-small cut to 1 dual + 2 single blocks (114.8M parameters, fp32 + AdamW =
1.3 GiB per checkpoint; the full 461M flavor's 5.5 GiB does not fit this machine's time budget), FSDP2 over
2 and 4 gloo ranks. Per world size, medians of SCALE_REPS: plain `dcp.save`; our `save_checkpoint` (DCP + RNG +
per-rank manifests + commit), and its ratio to plain; the commit alone on the same files, old (rank 0 hashes every
file while the others wait) vs new (each rank hashes its own, rank 0 writes the manifest of manifests); resume
verification, old (rank 0 hashes every file) vs new (`latest_valid_checkpoint`: each rank its share). Files are
hashed right after they were written, so from the page cache: these are hashing (CPU) costs, not disk reads, and
on this 2-core machine 4 ranks can hash at most 2 files at once.
Run: python -m bench.bench_checkpoint
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench.common import write_result
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.platform.checkpoint import (
    Checkpointer,
    checkpoint_dir,
    committed_checkpoints,
    latest_valid_checkpoint,
    save_checkpoint,
    verify,
)
from vidtron.platform.distributed import DistContext, barrier, broadcast_object, init_distributed
from vidtron.platform.manifest import commit_manifest, rank_manifest_name, sha256_file, write_rank_manifest
from vidtron.testing.multirank import run_ranks

ARCH = {"num_heads": 8, "head_dim": 64, "num_double_blocks": 2, "num_single_blocks": 2}
SAVES = 4
STEPS_BETWEEN = 6  # enough work for a background write to finish before the next save
CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SCALE_ARCH = {"num_double_blocks": 1, "num_single_blocks": 2}  # dit-small, cut in depth
SCALE_WORLDS = (2, 4)
SCALE_REPS = 2


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
    result["scaling"] = {f"world_{w}": run_ranks(_scaling_rank, w, (SCALE_REPS, SCALE_ARCH))[0] for w in SCALE_WORLDS}
    write_result("checkpoint", result, out_dir)
    return result


def _timed(fn, ctx: DistContext) -> float:
    """Wall time of `fn` on every rank, from a barrier to the barrier after the slowest rank."""
    barrier(ctx)
    t0 = time.perf_counter()
    fn()
    barrier(ctx)
    return time.perf_counter() - t0


def _max_cpu(fn, ctx: DistContext) -> float:
    """CPU seconds `fn` took on the busiest rank (less sensitive than wall time to other jobs on the machine)."""
    t0 = time.process_time()
    fn()
    return max(all_gather(time.process_time() - t0, ctx))


def all_gather(value, ctx: DistContext) -> list:
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def _old_commit(folder: Path, ctx: DistContext) -> None:
    """What the commit cost before per-rank manifests: rank 0 hashes every file, serially (so does the old verify)."""
    if ctx.is_main:
        [sha256_file(f) for f in sorted(folder.rglob("*")) if f.is_file()]


def _new_commit(folder: Path, ctx: DistContext) -> None:
    write_rank_manifest(folder, ctx.rank)
    barrier(ctx)
    if ctx.is_main:
        commit_manifest(folder, 0, {}, ctx.world_size, [])


def _busiest_rank_gib(path: Path, ctx: DistContext) -> float:
    """GiB that the busiest rank hashes at commit and at a same-size resume (its own files); before, rank 0 hashed
    every file."""
    own = json.loads((path / rank_manifest_name(ctx.rank)).read_text())["files"]
    return max(all_gather(sum(f["bytes"] for f in own.values()), ctx)) / 2**30


def _plain_save(model, opt, folder: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)


def _one_rep(model, opt, plain: Path, run: Path, ctx: DistContext) -> dict[str, float]:
    out = {
        "plain_dcp_save_s": _timed(lambda: _plain_save(model, opt, plain), ctx),
        "commit_old_s": _timed(lambda: _old_commit(plain, ctx), ctx),
        "commit_new_s": _timed(lambda: _new_commit(plain, ctx), ctx),
        "save_s": _timed(lambda: save_checkpoint(run, 1, model, opt, {"data": {"cursor": 0}}, ctx), ctx),
    }
    path = committed_checkpoints(run)[-1]
    out["verify_old_s"] = _timed(lambda: ctx.is_main and verify(path), ctx)
    out["verify_new_s"] = _timed(lambda: latest_valid_checkpoint(run, ctx), ctx)
    out["commit_old_cpu_s"] = _max_cpu(lambda: _old_commit(path, ctx), ctx)
    out["commit_new_cpu_s"] = _max_cpu(lambda: write_rank_manifest(path, ctx.rank), ctx)
    out["checkpoint_gib"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
    out["hashed_by_busiest_rank_gib"] = _busiest_rank_gib(path, ctx)
    return out


def _scaling_rank(reps: int, arch: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ctx = init_distributed()
    torch.manual_seed(0)
    model = DiT(dit_config("dit-small", arch))
    fully_shard(model, mesh=init_device_mesh("cpu", (ctx.world_size,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _fake_step(model, opt)
    root = Path(broadcast_object(tempfile.mkdtemp(prefix="vidtron_bench_ckpt_") if ctx.is_main else None, ctx))
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for key, value in _one_rep(model, opt, root / f"plain{rep}", root / f"run{rep}", ctx).items():
            times.setdefault(key, []).append(value)
        barrier(ctx)
        if ctx.is_main:
            shutil.rmtree(root / f"plain{rep}")
            shutil.rmtree(root / f"run{rep}")
    barrier(ctx)
    if ctx.is_main:
        shutil.rmtree(root, ignore_errors=True)
    med = {key: statistics.median(values) for key, values in times.items()}
    return {
        "model": f"dit-small {arch}",
        "parameters": sum(p.numel() for p in model.parameters()),
        **med,
        "save_over_plain": med["save_s"] / med["plain_dcp_save_s"],
        "commit_old_over_new": med["commit_old_s"] / med["commit_new_s"],
        "verify_old_over_new": med["verify_old_s"] / med["verify_new_s"],
        "commit_cpu_old_over_new": med["commit_old_cpu_s"] / med["commit_new_cpu_s"],
        "all_reps": times,
    }


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else None))
