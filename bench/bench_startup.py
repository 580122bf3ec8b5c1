"""Start-up memory of a sharded DiT: per-rank peak RSS growth while the model is built, laid out and initialised,
before the first step, relative to the full model's fp32 parameter bytes.

    meta start (today's trainer): build on meta -> parallelize (FSDP2 over dp_shard = world) -> materialize: each
        rank allocates its shard and computes one full parameter at a time (vidtron/parallel/materialize.py)
    full start (before): build the whole fp32 model on the host, initialise it, then parallelize

`python -m bench.run_all bench_startup` writes bench/results/startup.json (dit-small, 1 / 2 / 4 ranks, gloo).
"""

from __future__ import annotations

import gc
import sys

import torch

from bench.common import proc_status_bytes, reset_peak_rss, write_result

FLAVOR = "dit-small"


def _config(run_dir: str, world: int):
    from vidtron.recipes.registry import compose_config

    args = [f"model.flavor={FLAVOR}", "data.root=unused", f"run_dir={run_dir}", f"parallel.dp_shard={world}"]
    return compose_config([*args, "metrics.wandb=false"])


def _startup(mode: str, run_dir: str) -> dict:
    """Runs on every rank: peak RSS growth of setting the model up (bytes), and the full model's fp32 bytes."""
    from vidtron.models.dit import DiT
    from vidtron.models.dit.configs import dit_config
    from vidtron.models.dit.parallelize import ParallelizeOptions, parallelize_dit
    from vidtron.platform.distributed import init_distributed
    from vidtron.platform.trainer import build_dims

    ctx = init_distributed()
    cfg = dit_config(FLAVOR)
    dims = build_dims(_config(run_dir, ctx.world_size).parallel, ctx.world_size)
    if ctx.distributed:
        dims.build_mesh("cpu")
    gc.collect()
    base = proc_status_bytes("VmRSS")
    reset_peak_rss()
    if mode == "meta":
        from vidtron.parallel.materialize import materialize

        with torch.device("meta"):
            model = DiT(cfg)
        parallelize_dit(model, dims, ParallelizeOptions())
        materialize(model, "cpu", model.init_function(0))
    else:
        model = DiT(cfg)
        model.init_weights(0)
        parallelize_dit(model, dims, ParallelizeOptions())
    growth = proc_status_bytes("VmHWM") - base
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    full = sum(p.numel() for p in model.parameters()) * 4
    return {"peak_growth": growth, "local_param_bytes": local, "full_param_bytes": full}


def measure(mode: str, world: int, tmp: str) -> dict:
    from vidtron.testing.multirank import run_ranks

    ranks = run_ranks(_startup, world, (mode, tmp)) if world > 1 else [_single(mode, tmp)]
    full = ranks[0]["full_param_bytes"]
    worst = max(r["peak_growth"] for r in ranks)
    return {
        "world": world,
        "mode": mode,
        "full_fp32_param_gb": full / 1e9,
        "max_rank_peak_growth_gb": worst / 1e9,
        "growth_over_full": worst / full,
        "local_shard_over_full": ranks[0]["local_param_bytes"] / full,
    }


def _single(mode: str, tmp: str) -> dict:
    """One rank in a fresh interpreter (so earlier allocations do not hide this one's peak)."""
    import json
    import subprocess

    code = f"import json; from bench.bench_startup import _startup; print(json.dumps(_startup({mode!r}, {tmp!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(out_dir=None) -> dict:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2, 4):
            for mode in ("meta", "full"):
                rows.append(measure(mode, world, tmp))
                print(rows[-1], flush=True)
    write_result("startup", {"flavor": FLAVOR, "rows": rows}, out_dir)
    return {f"{r['mode']}@{r['world']}": round(r["growth_over_full"], 3) for r in rows}


if __name__ == "__main__":
    print(run())
