"""Collective bytes, per-rank memory and CPU step time of the DiT under each parallel layout (gloo ranks).

    python -m bench.bench_parallel [--steps 6] [--out bench/results]

For every layout (the ones of tests/test_parallel_parity.py) the dit-tiny model (4 heads x 16) trains a few steps on
generated 9 x 48 x 80 clips with 29 text tokens (45 video tokens: every CP / SP layout pads). Reported per layout:
- bytes per collective kind for one forward + backward, measured on rank 0 (CollectiveBytes) and predicted
  (comm_accounting.analytic_bytes), and their ratio (1.0 = the model explains every byte);
- per-rank parameter, gradient and AdamW-state bytes against the single-rank total / world (1.0 = perfectly split;
  TP-replicated parameters and FSDP padding push it above 1);
- the median CPU step time relative to one rank. On 2 shared CPU cores with 2-4 processes this measures
  collective latency and oversubscription, not speed-up: it is a regression guard, not a scaling claim.
Writes `parallel.json` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vidtron.models.dit import DiT
from vidtron.platform.config import (
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TextConfig,
    TrainConfig,
    TrainerConfig,
)
from vidtron.platform.distributed import DistContext, init_distributed
from vidtron.platform.trainer import build_dims, build_optimizer, setup_model
from vidtron.recipes.dit_t2v.config import DiTTrainConfig
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.testing.multirank import run_ranks
from vidtron.tools.comm_accounting import KINDS, CollectiveBytes, Workload, analytic_bytes

LAYOUTS: dict[int, dict[str, dict]] = {  # world -> name -> ParallelConfig fields
    2: {
        "tp2": dict(tp=2),
        "cp2_ring": dict(cp=2),
        "cp2_ulysses": dict(cp=2, cp_mode="ulysses"),
        "dp_shard2": dict(dp_shard=2),
        "dp_replicate2": dict(dp_replicate=2, dp_shard=1),
    },
    4: {
        "tp4": dict(tp=4),
        "usp2x2": dict(cp=4, cp_mode="usp", ulysses=2),
        "tp2_cp2": dict(tp=2, cp=2),
        "tp2_dp2": dict(tp=2, dp_shard=2),
        "cp2_dp2": dict(cp=2, dp_shard=2),
    },
}


def bench_config(data_root: str, run_dir: str, parallel: dict, steps: int) -> TrainConfig:
    return DiTTrainConfig(
        run_dir=run_dir,
        model=ModelConfig(flavor="dit-tiny", num_heads=4, head_dim=16),
        data=DataConfig(root=data_root, frames=9, height=48, width=80, batch_size=4),
        text=TextConfig(max_tokens=29),
        trainer=TrainerConfig(steps=steps, progress=False, resume="never"),
        optim=OptimConfig(warmup_steps=2),
        parallel=ParallelConfig(**({"dp_shard": 1} | parallel)),
        metrics=MetricsConfig(wandb=False),
    )


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _step(task, model, optimizer, step: int, dp_rank: int, dp: int, ctx, count: bool) -> dict:
    """One training step; under `count` the forward + backward runs inside CollectiveBytes."""
    batch = task.local_batch(step, (step - 1) * task.cfg.data.batch_size, dp_rank, dp)
    counter = CollectiveBytes()
    t0 = time.perf_counter()
    if count:
        with counter:
            task.loss(model, batch, ctx.device).backward()
    else:
        task.loss(model, batch, ctx.device).backward()
    grads = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"time": time.perf_counter() - t0, "bytes": dict(counter.bytes), "grad_bytes": grads}


def measure_layout(cfg: TrainConfig, ctx: DistContext) -> dict:
    """Train cfg.trainer.steps steps on this rank; counts collectives on the last one."""
    task = DiTTextToVideo(cfg)
    dims = build_dims(cfg.parallel, ctx.world_size)
    model = setup_model(task, cfg, dims, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    dp_rank, dp = (dims.mesh["dp"].get_local_rank(), dims.dp) if ctx.distributed else (0, 1)
    steps = [
        _step(task, model, optimizer, s, dp_rank, dp, ctx, count=s == cfg.trainer.steps)
        for s in range(1, cfg.trainer.steps + 1)
    ]
    opt_state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {
        "step_time_s": statistics.median(s["time"] for s in steps[1:]),
        "bytes": steps[-1]["bytes"],
        "param_bytes": _local_bytes(model.parameters()),
        "grad_bytes": steps[-1]["grad_bytes"],
        "optim_bytes": _local_bytes(opt_state),
    }


def _ranks(data_root: str, world: int, steps: int) -> dict:
    ctx = init_distributed()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS[world].items():
            dist.barrier()
            out[name] = measure_layout(bench_config(data_root, f"{tmp}/{name}", layout, steps), ctx)
    return out


def predicted_bytes(task: DiTTextToVideo, cfg: TrainConfig, dims) -> dict[str, float]:
    """comm_accounting's bytes per collective kind for one forward + backward of this config's DiT."""
    with torch.device("meta"):
        meta = DiT(task.dit_cfg)
    work = Workload(
        batch=cfg.data.batch_size // dims.dp,
        video_tokens=task.tokens_per_sample,
        text_tokens=cfg.text.max_tokens,
        zero_stage=cfg.parallel.zero.stage,
    )
    return analytic_bytes(meta, dims, work)


def _report(name: str, cfg: TrainConfig, got: dict, single: dict, world: int) -> dict:
    dims = build_dims(cfg.parallel, world)
    predicted = predicted_bytes(DiTTextToVideo(cfg), cfg, dims)
    kinds = [k for k in KINDS if got["bytes"].get(k) or predicted.get(k)]
    ratio = {k: (got["bytes"].get(k, 0) / predicted[k]) if predicted.get(k) else None for k in kinds}
    measured_total, predicted_total = sum(got["bytes"].values()), sum(predicted.values())
    memory = {k: got[k] / (single[k] / world) for k in ("param_bytes", "grad_bytes", "optim_bytes") if single.get(k)}
    return {
        "world": world,
        "layout": dims.layout_name,
        "measured_bytes": {k: got["bytes"].get(k, 0) for k in kinds},
        "analytic_bytes": {k: predicted.get(k, 0) for k in kinds},
        "measured_over_analytic": ratio,
        "total_ratio": measured_total / predicted_total if predicted_total else None,
        "memory_per_rank_over_total_div_world": memory,
        "step_time_s": got["step_time_s"],
        "step_time_vs_single": got["step_time_s"] / single["step_time_s"],
    }


def run(out_dir: str | Path = "bench/results", steps: int = 6, data_root: str | None = None) -> dict:
    """Benchmark every layout; write `out_dir/parallel.json` and return its content."""
    from vidtron.launch.data import main as data_main

    with tempfile.TemporaryDirectory() as tmp:
        if data_root is None:
            data_root = f"{tmp}/data"
            args = ["synth", "--out", data_root, "--clips", "32", "--frames", "9", "--height", "48", "--width", "80"]
            data_main(args)
        single_cfg = bench_config(data_root, f"{tmp}/single", {}, steps)
        single = measure_layout(single_cfg, DistContext(0, 1, 0, torch.device("cpu")))
        layouts = {}
        for world in LAYOUTS:
            results = run_ranks(_ranks, world, (data_root, world, steps))[0]
            for name, got in results.items():
                cfg = bench_config(data_root, f"{tmp}/{name}", LAYOUTS[world][name], steps)
                layouts[name] = _report(name, cfg, got, single, world)
    result = {"model": "dit-tiny heads=4 head_dim=16", "steps": steps, "single": single, "layouts": layouts}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--data", default=None, help="data root (default: generate 32 clips in a temp dir)")
    a = p.parse_args()
    result = run(a.out, a.steps, a.data)
    print(f"{'layout':<15} {'total':>7}  per kind (measured / analytic)                      mem p/g/o       time")
    for name, r in result["layouts"].items():
        kinds = " ".join(f"{k}={v:.3f}" for k, v in r["measured_over_analytic"].items() if v is not None)
        mem = "/".join(f"{v:.2f}" for v in r["memory_per_rank_over_total_div_world"].values())
        print(f"{name:<15} {r['total_ratio']:>7.3f}  {kinds:<50} {mem:<15} {r['step_time_vs_single']:.2f}x")


if __name__ == "__main__":
    main()
