"""The analytic memory model (vidtron/parallel/memory_model.py) against the measured accounting, and vidtron-plan.

Tolerance: 5% of the measured saved-activation bytes and of the model-state bytes per rank. The model counts what
autograd saves item by item; what it leaves out is small (masks, a few [B, D] vectors, padding copies).
"""

from __future__ import annotations

import re

import pytest
import torch

from vidtron.launch.plan import main as plan_main
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.models.dit.sharding import apply_activation_memory
from vidtron.testing.multirank import run_ranks
from vidtron.tools.memory_accounting import measure_step, synthetic_batch
from vidtron.tools.memory_model import (
    GIB,
    Layout,
    Policy,
    Workload,
    activation_bytes,
    estimate,
    latent_grid,
    param_shapes,
    video_tokens,
)
from vidtron.tools.planner import parse_bytes

TOL = 0.05
POLICIES = [
    Policy(),
    Policy("selective", "attn"),
    Policy("selective", "mlp"),
    Policy("full"),
    Policy("full", recompute_blocks="single"),
    Policy(offload_blocks="all"),
    Policy("full", offload_blocks="0-1"),
]
SHAPES = [  # (latent grid, text tokens, batch, dtype)
    ((3, 8, 8), 16, 2, torch.float32),
    ((5, 16, 16), 32, 1, torch.float32),
    ((3, 16, 16), 16, 1, torch.bfloat16),
]


def tiny_config():
    return dit_config("dit-tiny", {"num_double_blocks": 2, "num_single_blocks": 2})


def measure(policy: Policy, grid, text, batch, dtype=torch.float32, dims=None) -> dict:
    """Build the tiny DiT, lay it out (when `dims`), apply `policy`, run one step with accounting."""
    torch.manual_seed(0)
    model = DiT(tiny_config())
    model.init_weights()
    if dims is not None:
        from vidtron.models.dit.parallelize import parallelize_dit

        parallelize_dit(model, dims)
    model.to(dtype)
    apply_activation_memory(model, policy)  # Policy has MemoryConfig's fields
    inputs, target = synthetic_batch(tiny_config(), grid, text, batch, dtype)
    return measure_step(model, inputs, target, torch.optim.AdamW(model.parameters()))


def predict(policy: Policy, grid, text, batch, dtype=torch.float32, layout: Layout | None = None):
    w = Workload(grid, text, batch, act_bytes=torch.finfo(dtype).bits // 8, param_bytes=4)
    return estimate(tiny_config(), w, layout or Layout(), policy)


def close(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOL * measured


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-T{s[1]}-B{s[2]}-{str(s[3])[6:]}")
def test_model_matches_accounting_one_rank(shape):
    for policy in POLICIES:
        got, est = measure(policy, *shape), predict(policy, *shape)
        assert close(est.acts.device, got["device"]), (policy.name, est.acts.device, got["device"])
        assert close(est.acts.host, got["host"]) or est.acts.host == got["host"] == 0, policy.name
        if shape[3] == torch.float32:  # the model prices fp32 master params, grads and AdamW moments
            assert close(est.model_states, got["params"] + got["grads"] + got["optimizer"]), policy.name


CASES = [  # (ParallelDims kwargs, policy)
    ({"dp_shard": 2}, Policy()),
    ({"dp_shard": 2}, Policy("full", offload_blocks="all")),
    ({"tp": 2}, Policy()),
    ({"tp": 2}, Policy("selective", "attn")),
    ({"cp": 2}, Policy("full")),
    ({"cp": 2}, Policy(offload_blocks="all")),
    ({"cp": 2, "cp_mode": "ulysses"}, Policy()),
]


def _two_rank_cases() -> list[tuple[dict, dict]]:
    from vidtron.parallel.dims import ParallelDims

    out = []
    for kwargs, policy in CASES:
        dims = ParallelDims(**kwargs)
        dims.build_mesh("cpu")
        got = measure(policy, (5, 16, 16), 32, 2, dims=dims)
        layout = Layout(dims.tp, dims.cp, dims.cp_mode, dims.ulysses, dims.dp_shard, dims.dp_replicate)
        est = predict(policy, (5, 16, 16), 32, 2, layout=layout)
        out.append(({k: got[k] for k in ("device", "host", "params", "grads", "optimizer")}, _summary(est)))
    return out


def _summary(est) -> dict:
    return {"device": est.acts.device, "host": est.acts.host, "states": est.model_states}


def test_model_matches_accounting_two_ranks():
    per_rank = run_ranks(_two_rank_cases, 2)
    for rank in per_rank:
        for (kwargs, policy), (got, est) in zip(CASES, rank):
            case = (kwargs, policy.name)
            assert close(est["device"], got["device"]), (case, est, got)
            assert close(est["host"], got["host"]) or est["host"] == got["host"] == 0, (case, est, got)
            assert close(est["states"], got["params"] + got["grads"] + got["optimizer"]), (case, est, got)


def test_clip_to_tokens():
    cfg = dit_config("dit-13b")
    assert latent_grid(129, 720, 1280) == (33, 90, 160)
    assert video_tokens(cfg, latent_grid(129, 720, 1280)) == 33 * 45 * 80
    assert sum(torch.Size(s).numel() for _, s in param_shapes(cfg)) == 12_821_012_544


def test_model_orders_policies_and_layouts():
    cfg = dit_config("dit-13b")
    w = Workload(latent_grid(129, 720, 1280))
    dev = {p.name: activation_bytes(cfg, w, Layout(tp=4, cp=8), p).device for p in POLICIES}
    assert dev["full"] < dev["sel-attn"] < dev["-"] and dev["sel-mlp"] < dev["-"]
    assert dev["- off[all]"] < dev["full"]
    by_cp = [activation_bytes(cfg, w, Layout(cp=cp), Policy("full")).device for cp in (1, 2, 4, 8)]
    assert by_cp == sorted(by_cp, reverse=True)


@pytest.mark.parametrize("gpus", [8, 64])
def test_plan_cli_ranks_layouts_that_fit(gpus, capsys):
    args = ["--flavor", "dit-13b", "--frames", "129", "--height", "720", "--width", "1280"]
    assert plan_main([*args, "--gpus", str(gpus), "--gpu-mem", "80GiB", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "118800 video tokens" in out and "layouts fit in 80 GiB" in out
    rows = [
        re.match(r"\s*\d+ tp(\d+)-cp(\d+)\S*-fs(\d+)-dr(\d+)-z[123] .*? ([\d.]+)Gi", line) for line in out.splitlines()
    ]
    rows = [r for r in rows if r]
    assert 1 <= len(rows) <= 5
    for r in rows:
        tp, cp, fs, dr = (int(g) for g in r.groups()[:4])
        assert tp * cp * fs * dr == gpus and float(r.group(5)) <= 80  # uses every GPU, fits the memory
    assert "out of memory" in out or gpus > 8
    if gpus == 64:
        assert "parallel.ulysses" in out  # cp=16 Ulysses cannot split 24 heads


def test_plan_cli_rejects_bad_input(capsys):
    assert plan_main(["--gpus", "8", "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err
    assert plan_main(["--gpus", "8", "--frames", "128"]) == 2
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("141GB") == 141 * 10**9
