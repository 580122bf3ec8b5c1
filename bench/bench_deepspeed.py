"""DeepSpeed ZeRO 1/2/3 vs FSDP2 on 2 gloo ranks: collective bytes per step, per-rank model-state bytes, step time.

    python -m bench.bench_deepspeed [--steps 6] [--out bench/results]

dit-tiny (4 heads x 16) on generated 9 x 48 x 80 clips, batch 4, fp32, through the trainer's own pieces
(setup_model -> AdamW -> deepspeed_zero.initialize). Per engine:
- collective payload bytes of one whole step (forward, backward, optimizer step), measured on rank 0 with
  CollectiveBytes, over the model's fp32 parameter bytes P, and over the analytic volume. ZeRO's: stages 1-2
  reduce the gradients once (P) and all-gather the updated parameters once (P) = 2P; stage 3 all-gathers the
  parameters in forward and again in backward and reduce-scatters the gradients = 3P. FSDP2: comm_accounting's
  model (the root module keeps its parameters from forward to backward).
- per-rank parameter bytes (ZeRO-3: the rank's partitions) and AdamW bytes (fp32 master partition + two
  moments; FSDP2: the two moments of the DTensor shards, whose master is the parameter itself) over the single-
  rank total / 2.
- median step time relative to FSDP2 dp_shard 2 and to one process in the same run (2 shared cores: a
  regression guard, not a speed-up claim).
Writes `deepspeed.json`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from bench.bench_parallel import _local_bytes, bench_config, measure_layout, predicted_bytes
from bench.common import write_result
from vidtron.parallel import deepspeed_zero
from vidtron.platform.distributed import DistContext, init_distributed
from vidtron.platform.trainer import build_dims, build_optimizer, setup_model
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.testing.multirank import run_ranks
from vidtron.tools.comm_accounting import CollectiveBytes

ENGINES = {  # name -> ParallelConfig fields
    "fsdp2_zero3": dict(dp_shard=2),
    "deepspeed_zero1": dict(dp_shard=2, zero=dict(engine="deepspeed", stage=1)),
    "deepspeed_zero2": dict(dp_shard=2, zero=dict(engine="deepspeed", stage=2)),
    "deepspeed_zero3": dict(dp_shard=2, zero=dict(engine="deepspeed", stage=3, ds_persist_below=0)),
}


def _cfg(data_root: str, run_dir: str, parallel: dict, steps: int):
    from vidtron.platform.config import ParallelConfig, ZeroConfig

    zero = ZeroConfig(**parallel.get("zero", {}))
    cfg = bench_config(data_root, run_dir, {}, steps)
    cfg.parallel = ParallelConfig(**{k: v for k, v in parallel.items() if k != "zero"}, zero=zero)
    return cfg


def _state_bytes(model, optimizer) -> tuple[int, int]:
    """(parameter bytes, AdamW bytes incl. any separate fp32 master) held by this rank."""
    if isinstance(optimizer, deepspeed_zero.DeepSpeedZeRO):
        params = [getattr(p, "ds_tensor", p) for p in optimizer.params.values()]
        flat = optimizer._flat_partitions()
        moments = [t for f in flat for t in optimizer.base.state[f].values() if t.dim() > 0]
        return _local_bytes(params), _local_bytes(flat) + _local_bytes(moments)
    moments = [t for st in optimizer.state.values() for t in st.values() if t.dim() > 0]
    return _local_bytes(model.parameters()), _local_bytes(moments)


def _step(task, model, optimizer, step: int, dp_rank: int, ctx) -> float:
    batch = task.local_batch(step, (step - 1) * task.cfg.data.batch_size, dp_rank, 2)
    t0 = time.perf_counter()
    loss = task.loss(model, batch, ctx.device)
    if isinstance(optimizer, deepspeed_zero.DeepSpeedZeRO):
        optimizer.update(loss)
    else:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _measure(cfg, ctx) -> dict:
    task = DiTTextToVideo(cfg)
    dims = build_dims(cfg.parallel, ctx.world_size)
    model = setup_model(task, cfg, dims, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    single_param_bytes = sum(p.numel() * 4 for p in task.build_model().parameters())
    if cfg.parallel.zero.engine == "deepspeed":
        model, optimizer = deepspeed_zero.initialize(model, optimizer, cfg, dims)
    dp_rank = dims.mesh["dp"].get_local_rank()
    times = [_step(task, model, optimizer, s, dp_rank, ctx) for s in range(1, cfg.trainer.steps)]
    counter = CollectiveBytes()
    with counter:
        _step(task, model, optimizer, cfg.trainer.steps, dp_rank, ctx)
    params, adam = _state_bytes(model, optimizer)
    return {
        "P": single_param_bytes,
        "analytic": _analytic_bytes(task, cfg, dims, single_param_bytes),
        "bytes": dict(counter.bytes),
        "param_bytes": params,
        "adam_bytes": adam,
        "step_time_s": statistics.median(times[1:]),
    }


def _analytic_bytes(task, cfg, dims, P: int) -> float:
    """Payload bytes of one step (P: fp32 parameter bytes). FSDP2: comm_accounting's model (validated at 1.000 by
    bench_parallel; the root keeps its parameters after forward, so a bit under 3P). DeepSpeed: 2P for stages 1-2,
    3P for stage 3."""
    if cfg.parallel.zero.engine == "deepspeed":
        return (3 if cfg.parallel.zero.stage == 3 else 2) * P
    return float(sum(predicted_bytes(task, cfg, dims).values()))


def _ranks(data_root: str, steps: int) -> dict:
    ctx = init_distributed()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, parallel in ENGINES.items():
            dist.barrier()
            out[name] = _measure(_cfg(data_root, f"{tmp}/{name}", parallel, steps), ctx)
    return out


def _report(name: str, got: dict, fsdp_time: float, single_time: float) -> dict:
    P = got["P"]
    total = sum(got["bytes"].values())
    single_adam = 2 * P + (P if name.startswith("deepspeed") else 0)  # moments (+ the separate fp32 master)
    return {
        "bytes_by_kind": got["bytes"],
        "total_over_P": total / P,
        "analytic_over_P": got["analytic"] / P,
        "measured_over_analytic": total / got["analytic"],
        "param_bytes_over_P_div_2": got["param_bytes"] / (P / 2),
        "adam_bytes_over_single_div_2": got["adam_bytes"] / (single_adam / 2),
        "step_time_s": got["step_time_s"],
        "step_time_vs_fsdp2": got["step_time_s"] / fsdp_time,
        "step_time_vs_single": got["step_time_s"] / single_time,
    }


def run(out_dir=None, steps: int = 6) -> dict:
    from vidtron.launch.data import main as data_main

    with tempfile.TemporaryDirectory() as tmp:
        data_root = f"{tmp}/data"
        args = ["synth", "--out", data_root, "--clips", "32", "--frames", "9", "--height", "48", "--width", "80"]
        data_main(args)
        results = run_ranks(_ranks, 2, (data_root, steps))[0]
        single_cfg = bench_config(data_root, f"{tmp}/single", {}, steps)
        single = measure_layout(single_cfg, DistContext(0, 1, 0, torch.device("cpu")))
    fsdp_time = results["fsdp2_zero3"]["step_time_s"]
    engines = {name: _report(name, got, fsdp_time, single["step_time_s"]) for name, got in results.items()}
    payload = {
        "model": "dit-tiny heads=4 head_dim=16",
        "world": 2,
        "steps": steps,
        "single_step_time_s": single["step_time_s"],
        "engines": engines,
    }
    write_result("deepspeed", payload, out_dir)
    return {n: {k: round(v, 3) for k, v in r.items() if isinstance(v, float)} for n, r in engines.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    for name, r in run(a.out, a.steps).items():
        print(name, r)


if __name__ == "__main__":
    main()
