"""launcher=dryrun: one simulated step of 8 ranks in this process writes per-rank bytes that equal the real shard sizes,
collective bytes per mesh dimension and the checkpoint's bytes; bad layouts fail with one ConfigError line."""

from __future__ import annotations

import json
import math

import pytest

from vidtron.launch import train as train_cli
from vidtron.models.dit.configs import dit_config
from vidtron.tools.memory_model import param_shapes

LAYOUT = ["launcher.world_size=8", "parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=2", "data.batch_size=2"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    run = tmp_path_factory.mktemp("dryrun")
    extra = ["model.flavor=dit-tiny", "trainer.precision=bf16", "trainer.ema_decay=0.99"]
    assert train_cli.main(["launcher=dryrun", f"run_dir={run}", *extra, *LAYOUT]) == 0
    return json.loads((run / "dryrun.json").read_text())


def test_record_has_every_figure(record):
    assert record["layout"] | {"world_size": 8, "tp": 2, "cp": 2, "dp_shard": 2} == record["layout"]
    per_rank = record["per_rank_bytes"]
    for key in ("params", "grads", "optimizer", "activations", "peak_activations", "peak_total"):
        assert per_rank[key] > 0, key
    assert per_rank["peak_total"] >= per_rank["params"] + per_rank["grads"] + per_rank["optimizer"]
    comms = record["collectives_per_step"]
    assert {"tp", "cp", "dp_shard_cp"} <= set(comms)  # TP/SP, the ring, FSDP
    assert comms["cp"]["payload"]["send"] > 0 and comms["dp_shard_cp"]["payload"]["reduce_scatter"] > 0
    assert set(record["checkpoint_bytes_per_rank"]) == {"model", "optim", "ema"}
    assert record["plan"]["layout"] == "tp2-cp2r-fs2-dr1-z3"


def test_model_states_are_the_real_shard_sizes(record):
    """fp32 master params (bf16 only in the all-gathers and compute), split over tp x dp_shard x cp = 8 ranks, except
    the ones TP replicates (norms, embeddings, row-parallel biases), which only FSDP's 4 ranks split (+ dim-0 padding).
    Gradients are fp32 like the params, AdamW holds two fp32 moments, and the checkpoint writes exactly these."""
    per_rank = record["per_rank_bytes"]
    total = sum(math.prod(shape) for _, shape in param_shapes(dit_config("dit-tiny")))
    assert 4 * total / 8 <= per_rank["params"] <= 4 * total / 4 * 1.02
    assert per_rank["params"] == record["plan"]["params"]  # the planner's shard arithmetic, element for element
    assert per_rank["grads"] == per_rank["params"]
    assert 0 <= per_rank["optimizer"] - 2 * per_rank["params"] <= 4 * 200  # + one fp32 step count per parameter
    assert record["checkpoint_bytes_per_rank"]["model"] == per_rank["params"]
    assert record["checkpoint_bytes_per_rank"]["optim"] == per_rank["optimizer"]
    assert record["checkpoint_bytes_per_rank"]["ema"] == per_rank["ema"] == per_rank["params"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["launcher.world_size=16", "parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=2"], "launcher.world_size=8"),
        (["launcher.world_size=8", "parallel.tp=4", "parallel.cp=2", "parallel.dp_shard=1"], "parallel.tp=4"),
        ([*LAYOUT, "data.batch_size=3"], "data.batch_size=3"),
        (["launcher.world_size=-1"], "launcher.world_size=-1"),
    ],
)
def test_bad_layout_is_one_config_error(overrides, field, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(["launcher=dryrun", f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidtron-train: error:") and field in err[0], err
    assert not run.exists()


def test_plan_prints_one_layout(capsys):
    """vidtron-plan --layout: the figures the dry run is compared with, for every policy of one layout."""
    from vidtron.launch import plan

    assert plan.main(["--gpus", "256", "--layout", "tp=8,cp=4,dp_shard=8"]) == 0
    out = capsys.readouterr().out
    assert "tp8-cp4r-fs8-dr1-z3: per rank, GiB (params 0.20, grads 0.20, optimizer 0.40" in out
    assert len([line for line in out.splitlines() if line.startswith(("-", "sel-", "full"))]) == 12
    assert plan.main(["--gpus", "256", "--layout", "tp=8,cp=4,dp_shard=4"]) == 2
    assert "not --gpus 256" in capsys.readouterr().err


def _measured_vs_planned(record: dict) -> list[tuple[str, float, float]]:
    """(part, measured wire bytes, vidtron-plan's) per part: the measured mesh dims mapped onto the planner's kinds
    (FSDP on dp_shard_cp; USP's ring and Ulysses sub-groups, outside the named dims, go with the cp dim)."""
    wire = {dim: c["wire"] for dim, c in record["collectives_per_step"].items()}
    plan = record["plan"]["comm_wire"]
    cp = wire.get("cp", 0) + sum(v for k, v in wire.items() if k.startswith("other_"))
    rows = [("fsdp", wire.get("dp_shard_cp", 0), plan["fsdp"]), ("cp", cp, plan["ring"] + plan["ulysses"])]
    return rows + [("tp", wire.get("tp", 0), plan["tp"])]


def _assert_plan_matches(record: dict) -> None:
    """Within 1%: the measured side also holds the gradient-norm all-reduces of clipping (a few hundred bytes)."""
    for part, measured, planned in _measured_vs_planned(record):
        print(f"{part}: measured {measured} planned {planned}")
        assert abs(measured - planned) <= 0.01 * max(planned, 1), (part, measured, planned)


def test_planner_collective_bytes_are_what_the_step_sends(record):
    """vidtron-plan's per-step wire bytes (FSDP, TP/SP, ring) equal what the simulated step issues (bf16)."""
    _assert_plan_matches(record)


USP = ["launcher.world_size=8", "parallel.cp=4", "parallel.cp_mode=usp", "parallel.ulysses=2", "parallel.dp_shard=2"]


@pytest.mark.parametrize(
    "overrides",
    [
        [*USP, "memory.recompute=full"],
        pytest.param([*USP, "memory.recompute=selective"], marks=pytest.mark.slow),
        pytest.param([*LAYOUT[:-1], "memory.recompute=selective", "data.batch_size=4"], marks=pytest.mark.slow),
        pytest.param(
            ["launcher.world_size=8", "parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.dp_shard=4"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["usp-full", "usp-selective", "tp-ring-selective", "ulysses"],
)
def test_planner_collective_bytes_under_ulysses_usp_and_recompute(overrides, tmp_path):
    extra = ["model.flavor=dit-tiny", "model.num_heads=4", "trainer.precision=bf16", "data.batch_size=4"]
    assert train_cli.main(["launcher=dryrun", f"run_dir={tmp_path}", *extra, *overrides]) == 0
    _assert_plan_matches(json.loads((tmp_path / "dryrun.json").read_text()))
