"""DeepSpeed ZeRO 1/2/3 (`parallel.zero.engine=deepspeed`) behind the same trainer: parity with one rank, NaN skip
and rollback, and checkpoints that move between engines and world sizes.

Same model, data and tolerance as tests/test_parallel_parity.py (dit-tiny 4 x 16 heads, 9 x 48 x 80 clips, batch 4,
20 fp32 AdamW steps at lr 1e-3; |loss diff| and |param diff| <= 1e-5, against ~2e-7 of fp32 reordering: DeepSpeed
reduces flat buckets and runs AdamW on flat fp32 partitions, the same elementwise math in another order). ZeRO-3
runs with `parallel.zero.ds_persist_below=0`, so every parameter is partitioned (DeepSpeed's default keeps the
small ones of dit-tiny whole, which would not test stage 3). A real bug is far outside 1e-5: ZeRO's gradient
average taken over dp only while the CP ranks hold partial gradients doubles the update (1e-3 on parameters).

One world-2 process group runs the layouts (ZeRO-1 at dp 2, ZeRO-2 under ring CP and the world-4 layouts are
`slow`); the resharding legs go DeepSpeed ZeRO-3 on 2 ranks (steps 1-10) -> FSDP2 dp_shard 2 (11-15) -> DeepSpeed
ZeRO-1 on one process (16-20) and must continue the uninterrupted run.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.test_parallel_parity import TOL, _check, _leg, _max_param_diff, _train, check_continuation, config
from vidtron.errors import ConfigError
from vidtron.platform.checkpoint import committed_checkpoints, load_model_weights
from vidtron.platform.distributed import DistContext, init_distributed
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.recipes.registry import compose_config
from vidtron.testing.multirank import run_ranks

DS = ["parallel.zero.engine=deepspeed"]
ZERO3 = [*DS, "parallel.zero.stage=3", "parallel.zero.ds_persist_below=0"]
LAYOUTS = {
    "ds_zero2_dp2": [*DS, "parallel.zero.stage=2"],
    "ds_zero3_dp2": ZERO3,
    "ds_zero3_cp2_ulysses": [*ZERO3, "parallel.cp=2", "parallel.cp_mode=ulysses"],
    # 2 micro-batches of 1 per rank and step (global batch 4 as the reference's one batch of 4)
    "ds_zero2_dp2_accum2": [*DS, "parallel.zero.stage=2", "trainer.grad_accum=2"],
    # one NaN step: no update (NaN + x has finite gradients, so the trainer must skip it, not DeepSpeed); the
    # run must then equal FSDP2 skipping the same step
    "ds_zero3_nan_skip": [*ZERO3, "faults.nan_at_step=5"],
    "fsdp_nan_skip": ["parallel.dp_shard=2", "faults.nan_at_step=5"],
    "ds_zero3_accum2_nan_skip": [*ZERO3, "trainer.grad_accum=2", "faults.nan_at_step=5"],
    # NaN at steps 5 and 6 -> both skipped -> rollback to step 4 (max_bad_steps 2) -> replayed: same final state
    "ds_zero3_nan_rollback": [
        *ZERO3,
        "faults.nan_at_step=5",
        "faults.nan_steps=2",
        "trainer.max_bad_steps=2",
        "trainer.checkpoint_every=2",
        "trainer.skip_bad_batches=false",  # a transient fault: replay the same batches
    ],
}
WORLD2_SLOW = {  # make test-slow; make test keeps ZeRO-1 (the one-process resharding leg) and DeepSpeed under CP
    # (ds_zero3_cp2_ulysses)
    "ds_zero1_dp2": [*DS, "parallel.zero.stage=1"],
    "ds_zero2_cp2_ring": [*DS, "parallel.zero.stage=2", "parallel.cp=2", "parallel.cp_mode=ring"],
}
WORLD4 = {  # make test-slow
    "ds_zero3_cp2_dp2": [*ZERO3, "parallel.cp=2", "parallel.dp_shard=2"],
    "ds_zero1_usp2x2": [*DS, "parallel.zero.stage=1", "parallel.cp=4", "parallel.cp_mode=usp", "parallel.ulysses=2"],
    "ds_zero2_dp4": [*DS, "parallel.zero.stage=2", "parallel.dp_shard=4"],
}
RESHARD = (ZERO3, 10), (["parallel.dp_shard=2"], 5)  # then DeepSpeed ZeRO-1 on one process for the last 5


def _world2(data_root: str, tmp: str) -> dict:
    ctx = init_distributed()
    out = {name: _train(config(data_root, f"{tmp}/{name}", *ov), ctx) for name, ov in LAYOUTS.items()}
    out["reshard"] = [_train(_leg(data_root, f"{tmp}/reshard", ov, n), ctx)["losses"] for ov, n in RESHARD]
    return out


def _layouts(data_root: str, tmp: str, layouts: dict) -> dict:
    ctx = init_distributed()
    return {name: _train(config(data_root, f"{tmp}/{name}", *ov), ctx) for name, ov in layouts.items()}


def _one_process_leg(data_root: str, run_dir: str) -> dict:
    return _train(_leg(data_root, run_dir, [*DS, "parallel.zero.stage=1"], 5), init_distributed())


@pytest.fixture(scope="module")
def reference(pad_data, tmp_path_factory):
    cfg = config(pad_data, tmp_path_factory.mktemp("ds") / "single")
    return _train(cfg, DistContext(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def world2(pad_data, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ds_w2"))
    return run_ranks(_world2, 2, (str(pad_data), tmp))[0], tmp


NAN_RUNS = {"ds_zero3_nan_skip", "fsdp_nan_skip", "ds_zero3_nan_rollback", "ds_zero3_accum2_nan_skip"}


@pytest.fixture(scope="module")
def world4(pad_data, tmp_path_factory):
    return run_ranks(_layouts, 4, (str(pad_data), str(tmp_path_factory.mktemp("ds_w4")), WORLD4))[0]


@pytest.fixture(scope="module")
def world2_slow(pad_data, tmp_path_factory):
    return run_ranks(_layouts, 2, (str(pad_data), str(tmp_path_factory.mktemp("ds_w2s")), WORLD2_SLOW))[0]


@pytest.mark.parametrize("name", sorted(set(LAYOUTS) - NAN_RUNS))
def test_deepspeed_layout_matches_one_rank(name, world2, reference):
    _check(name, world2[0][name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD2_SLOW))
def test_deepspeed_more_two_rank_layouts_match_one_rank(name, world2_slow, reference):
    _check(name, world2_slow[name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORLD4))
def test_deepspeed_four_rank_layout_matches_one_rank(name, world4, reference):
    _check(name, world4[name], reference)


@pytest.mark.parametrize("name", ["ds_zero3_nan_skip", "ds_zero3_accum2_nan_skip"])
def test_deepspeed_skips_a_nan_step_like_fsdp2(name, world2):
    ds, fsdp = world2[0][name], world2[0]["fsdp_nan_skip"]
    assert math.isnan(ds["losses"][4]) and math.isnan(fsdp["losses"][4])
    finite = [i for i in range(len(ds["losses"])) if i != 4]
    loss_diff = max(abs(ds["losses"][i] - fsdp["losses"][i]) for i in finite)
    param_diff = _max_param_diff(ds["params"], fsdp["params"])
    print(f"parity {name} vs fsdp: max loss diff {loss_diff:.2e}, max param diff {param_diff:.2e}")
    assert loss_diff <= TOL and param_diff <= TOL, (loss_diff, param_diff)


def _linear_engine(accum: int):
    """A real DeepSpeed ZeRO-2 engine (one process) over a 4 -> 1 linear layer, through our `initialize`."""
    from vidtron.parallel.deepspeed_zero import initialize
    from vidtron.parallel.dims import ParallelDims

    cfg = compose_config([*DS, "parallel.zero.stage=2", f"trainer.grad_accum={accum}", "data.batch_size=6"])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return initialize(model, torch.optim.AdamW(model.parameters(), lr=0.1), cfg, ParallelDims())


def _micro_phases(engine, xs: list[torch.Tensor], nan_at: int = -1):
    from vidtron.platform.task import Phase

    for i, x in enumerate(xs):
        loss = engine(x).square().mean()
        yield iter([Phase("model", loss + float("nan") if i == nan_at else loss)])


def test_deepspeed_accumulation_drops_a_window_with_a_late_nan_micro_batch():
    """K=3 with micro-batch 2 NaN: DeepSpeed must drop the two good micro-batches' gradients too and not step; the
    next window then updates exactly as a fresh engine's first K=3 window does (and K=3 equals one batch of 6).
    One spawned process (DeepSpeed needs a process group and LOCAL_RANK)."""
    run_ranks(_late_nan_window, 1)


def _late_nan_window() -> None:
    from vidtron.platform.update import UpdatePolicy, run_accumulated, run_phases

    init_distributed()
    xs = list(torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1)))
    engine, opt = _linear_engine(3)
    before = [p.detach().clone() for p in engine.module.parameters()]
    bad = run_accumulated(list(_micro_phases(engine, xs, nan_at=2)), {"model": opt}, 0.1, 1, UpdatePolicy())
    assert not bad.finite and all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    good = run_accumulated(list(_micro_phases(engine, xs)), {"model": opt}, 0.1, 2, UpdatePolicy())
    fresh, fresh_opt = _linear_engine(3)
    ref = run_accumulated(list(_micro_phases(fresh, xs)), {"model": fresh_opt}, 0.1, 1, UpdatePolicy())
    whole, whole_opt = _linear_engine(1)
    one = run_phases(next(_micro_phases(whole, [torch.cat(xs)])), {"model": whole_opt}, 0.1, 1, UpdatePolicy())
    assert good.finite and abs(good.loss - ref.loss) == 0 and abs(good.grad_norm - one.grad_norm) <= 1e-6
    for a, b, c in zip(engine.module.parameters(), fresh.module.parameters(), whole.module.parameters()):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6), (a, b, c)


def test_deepspeed_nan_steps_are_skipped_then_rolled_back(world2, reference):
    """Steps 5 and 6 are NaN: DeepSpeed skips both updates, the trainer rolls back to step 4 and replays them, and
    the run ends where the uninterrupted one does."""
    results, tmp = world2
    run = results["ds_zero3_nan_rollback"]
    assert [i for i, x in enumerate(run["losses"]) if not math.isfinite(x)] == [4, 5]
    events = open(f"{tmp}/ds_zero3_nan_rollback/events.jsonl").read()
    assert '"rollback"' in events and '"to_step": 4' in events, events
    _check("ds_zero3_nan_rollback", {**run, "losses": [x for x in run["losses"] if math.isfinite(x)]}, reference)


def test_deepspeed_checkpoints_reshard_across_engines_and_world_sizes(world2, reference, pad_data):
    """ZeRO-3 x 2 ranks (10 steps) -> FSDP2 dp_shard 2 (5) -> ZeRO-1 on one process (5) == the uninterrupted run."""
    results, tmp = world2
    last = run_ranks(_one_process_leg, 1, (str(pad_data), f"{tmp}/reshard"))[0]
    check_continuation("deepspeed reshard", results["reshard"], last, reference)


def test_deepspeed_checkpoint_loads_as_plain_weights(world2, reference, pad_data):
    """A ZeRO-3 checkpoint holds whole tensors by name: the sampler / exporter load it into a plain DiT."""
    _, tmp = world2
    path = committed_checkpoints(f"{tmp}/ds_zero3_dp2")[-1]
    task = DiTTextToVideo(config(pad_data, f"{tmp}/plain"))
    model = task.materialize(task.build_model(), torch.device("cpu"))  # build_model gives meta tensors
    load_model_weights(path, model)
    got = {n: p.detach() for n, p in model.named_parameters()}
    assert _max_param_diff(got, reference["params"]) <= TOL


def test_deepspeed_layout_errors_name_the_field_and_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"parallel\.tp=2.*parallel\.zero\.engine=fsdp2"):
        compose_config([*DS, "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"parallel\.dp_replicate=2.*no HSDP"):
        compose_config([*DS, "parallel.dp_replicate=2"])
    with pytest.raises(ConfigError, match=r"parallel\.zero\.engine='fsdp3'.*'deepspeed'"):
        compose_config(["parallel.zero.engine=fsdp3"])
    with pytest.raises(ConfigError, match=r"recipe=vae .*trains two optimizers"):
        compose_config([*DS, "recipe=vae"])
    from vidtron.parallel import deepspeed_zero

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if the [deepspeed] extra were not installed
    with pytest.raises(ConfigError, match="DS_BUILD_OPS=0 pip install --no-build-isolation"):
        deepspeed_zero.import_deepspeed()
