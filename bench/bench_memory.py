"""Activation memory: saved bytes per policy, the analytic model's error, the planner's picks, and (CUDA only) the
step-time cost of offload and the peak memory with and without prefetch.

    python -m bench.bench_memory          # writes bench/results/memory.json

CPU part: a scaled-down DiT (dit-tiny widths, 2 dual + 4 single blocks) on one latent clip; the accounting
(vidtron/parallel/memory_accounting.py) measures saved-activation bytes per policy, the model
(vidtron/parallel/memory_model.py) predicts them, on one rank and on 2-rank layouts (FSDP, TP, CP). The dit-13b rows
are the model's numbers at 720p x 129 frames. GPU part (skipped without CUDA): dit-small blocks at a few thousand
tokens, median step time and `torch.cuda.max_memory_allocated` for none / full recompute / offload with and without
prefetch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_result
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.models.dit.sharding import apply_activation_memory, apply_offload
from vidtron.testing.multirank import run_ranks
from vidtron.tools.memory_accounting import measure_step, synthetic_batch
from vidtron.tools.memory_model import GIB, Layout, Policy, Workload, activation_bytes, estimate, latent_grid
from vidtron.tools.planner import Hardware, collapse, plan

POLICIES = {
    "none": Policy(),
    "selective-attn": Policy("selective", "attn"),
    "selective-mlp": Policy("selective", "mlp"),
    "full": Policy("full"),
    "full-single-only": Policy("full", recompute_blocks="single"),
    "offload-all": Policy(offload_blocks="all"),
    "full+offload-all": Policy("full", offload_blocks="all"),
}
GRID, TEXT, BATCH = (5, 16, 16), 32, 1  # latent clip, text tokens, batch of the CPU measurements


def small_config():
    return dit_config("dit-tiny", {"num_double_blocks": 2, "num_single_blocks": 4})


def _measure(policy: Policy, dims=None) -> dict:
    torch.manual_seed(0)
    model = DiT(small_config())
    model.init_weights()
    if dims is not None:
        from vidtron.models.dit.parallelize import parallelize_dit

        parallelize_dit(model, dims)
    apply_activation_memory(model, policy)
    inputs, target = synthetic_batch(small_config(), GRID, TEXT, BATCH)
    return measure_step(model, inputs, target, torch.optim.AdamW(model.parameters()))


def _error(policy: Policy, got: dict, layout: Layout | None = None) -> dict:
    est = estimate(small_config(), Workload(GRID, TEXT, BATCH, 4, 4), layout or Layout(), policy)
    states = got["params"] + got["grads"] + got["optimizer"]
    return {
        "measured_device": got["device"],
        "predicted_device": est.acts.device,
        "activation_error": est.acts.device / got["device"] - 1,
        "measured_host": got["host"],
        "predicted_host": est.acts.host,
        "state_error": est.model_states / states - 1,
    }


def one_rank() -> tuple[dict, dict]:
    """(saved bytes per policy relative to none, model error per policy)."""
    measured = {name: _measure(p) for name, p in POLICIES.items()}
    base = measured["none"]["device"]
    ratios = {n: {"device": m["device"] / base, "host": m["host"] / base} for n, m in measured.items()}
    errors = {n: _error(POLICIES[n], m) for n, m in measured.items()}
    return ratios, errors


MULTI = [({"dp_shard": 2}, "none"), ({"dp_shard": 2}, "full+offload-all"), ({"tp": 2}, "selective-attn")]
MULTI += [({"cp": 2}, "full"), ({"cp": 2, "cp_mode": "ulysses"}, "offload-all")]


def _multi_rank() -> list[dict]:
    from vidtron.parallel.dims import ParallelDims

    out = []
    for kwargs, name in MULTI:
        dims = ParallelDims(**kwargs)
        dims.build_mesh("cpu")
        layout = Layout(dims.tp, dims.cp, dims.cp_mode, dims.ulysses, dims.dp_shard, dims.dp_replicate)
        got = _measure(POLICIES[name], dims)
        out.append({"layout": layout.name, "policy": name, **_error(POLICIES[name], got, layout)})
    return out


def model_13b() -> dict:
    """The model's activation bytes per GPU for dit-13b at 720p x 129 frames, tp4 x cp8 (ring), per policy."""
    cfg, w, lay = dit_config("dit-13b"), Workload(latent_grid(129, 720, 1280)), Layout(tp=4, cp=8, dp_shard=2)
    acts = {n: activation_bytes(cfg, w, lay, p) for n, p in POLICIES.items()}
    base = acts["none"].device
    return {
        n: {"device_gib": a.device / GIB, "host_gib": a.host / GIB, "ratio": a.device / base} for n, a in acts.items()
    }


def planner_picks(gpus_list=(8, 64, 512), top: int = 3) -> dict:
    cfg, w = dit_config("dit-13b"), Workload(latent_grid(129, 720, 1280))
    out = {}
    for gpus in gpus_list:
        fits, rejected = plan(cfg, w, Hardware(gpus, 80 * GIB))
        out[gpus] = {
            "fit": len(fits),
            "rejected": len(rejected),
            "top": [
                {
                    "layout": r.layout.name,
                    "policy": r.policy.name,
                    "mem_gib": r.peak / GIB,
                    "tok_s_gpu": r.tokens_per_gpu_s,
                }
                for r in collapse(fits)[:top]
            ],
        }
    return out


def gpu_offload(steps: int = 5) -> dict | None:
    """Median step time and peak CUDA memory per policy on a GPU; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    cfg = dit_config("dit-small", {"num_double_blocks": 2, "num_single_blocks": 4})
    out = {}
    cases = {"none": ("none", ""), "full": ("full", ""), "offload-prefetch": ("none", "all")}
    cases["offload-no-prefetch"] = ("none", "no-prefetch")
    for name, (recompute, offload) in cases.items():
        torch.manual_seed(0)
        model = DiT(cfg).cuda().to(torch.bfloat16)
        apply_activation_memory(model, Policy(recompute, offload_blocks=offload if offload == "all" else ""))
        if offload == "no-prefetch":
            apply_offload(model, "all", prefetch=False)
        inputs, target = synthetic_batch(cfg, (9, 32, 32), 64, 1, torch.bfloat16)
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out[name] = _time_cuda(model, inputs, target.cuda(), steps)
    base = out["none"]["step_s"]
    for r in out.values():
        r["overhead"] = r["step_s"] / base - 1
    return out


def _time_cuda(model, inputs: dict, target: torch.Tensor, steps: int) -> dict:
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.nn.functional.mse_loss(model(**inputs).float(), target).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def run(out_dir: str | Path = RESULTS) -> dict:
    torch.set_num_threads(1)
    ratios, errors = one_rank()
    multi = run_ranks(_multi_rank, 2)[0]
    all_errors = [abs(e["activation_error"]) for e in [*errors.values(), *multi]]
    result = {
        "what": "saved-activation bytes per policy (measured, relative to none), analytic model error, planner picks",
        "config": {"model": "dit-tiny widths, 2 dual + 4 single blocks", "latent": GRID, "text": TEXT, "batch": BATCH},
        "saved_bytes_relative_to_none": ratios,
        "model_error_one_rank": errors,
        "model_error_two_ranks": multi,
        "max_abs_activation_error": max(all_errors),
        "dit_13b_720p_129f_tp4_cp8": model_13b(),
        "planner_top_80gib": planner_picks(),
        "gpu": gpu_offload(),
    }
    write_result("memory", result, out_dir)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1, default=str))
