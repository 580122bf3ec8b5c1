"""trainer.compile=true: parallelize_dit compiles every block in its documented place (step 4: after recompute /
offload, before FSDP) and training matches eager.

Tolerance 1e-4 on losses (~2) and parameters after 3 steps: inductor fuses elementwise work and may reorder fp32
sums (a few ulps per op), nothing more. Running inductor costs minutes of compilation on a loaded 2-core CPU, so the
training comparisons are `slow` (make test-slow); the placement check is fast.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import full_params
from tests.test_parallel_parity import config
from vidtron.models.dit.parallelize import ParallelizeOptions, parallelize_dit
from vidtron.models.dit.sharding import dit_blocks
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.distributed import DistContext, init_distributed
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.testing.multirank import run_ranks

ONE = DistContext(0, 1, 0, torch.device("cpu"))


def _cfg(data, run, *extra):
    return config(data, run, "trainer.steps=3", "optim.warmup_steps=0", *extra)


def _train(cfg, ctx=ONE) -> dict:
    state = train(cfg, DiTTextToVideo(cfg), ctx)
    return {"losses": state.losses, "params": full_params(state.model)}


def _close(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= tol
    assert max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"]) <= tol


def test_compile_wraps_every_block_and_nothing_else(pad_data, tmp_path):
    task = DiTTextToVideo(_cfg(pad_data, tmp_path / "r"))
    model = parallelize_dit(task.build_model(), ParallelDims(), ParallelizeOptions(compile=True))
    assert all(b._compiled_call_impl is not None for b in dit_blocks(model))
    assert model._compiled_call_impl is None and model.final_layer._compiled_call_impl is None
    names = {n for n, _ in model.named_parameters()}
    assert all("_orig_mod" not in n for n in names)  # in place: checkpoints keep their names


@pytest.mark.slow
def test_compiled_training_matches_eager_on_one_rank(pad_data, tmp_path):
    _close(_train(_cfg(pad_data, tmp_path / "c", "trainer.compile=true")), _train(_cfg(pad_data, tmp_path / "e")))


def _two_ranks(data: str, tmp: str) -> dict:
    return _train(_cfg(data, f"{tmp}/c2", "trainer.compile=true", "parallel.dp_shard=2"), init_distributed())


@pytest.mark.slow
def test_compiled_fsdp_training_matches_eager_one_rank(pad_data, tmp_path):
    eager = _train(_cfg(pad_data, tmp_path / "e"))
    _close(run_ranks(_two_ranks, 2, (str(pad_data), str(tmp_path)))[0], eager)
