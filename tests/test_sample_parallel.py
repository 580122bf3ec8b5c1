"""vidtron-sample on 2 ranks (TP 2; Ulysses CP 2) gives the single-process latents; bad layouts exit 2.

Tolerance 1e-5: the sharded model sums the same products in a different order (row-parallel partial sums,
attention over all-to-all'd heads), a few fp32 ulps per step over a few Euler steps. After 3 training steps the
model moves the latents by ~3e-2 from the noise, so a layout bug would show far above it.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_training
from vidtron.launch.sample import generate_latents
from vidtron.launch.sample import main as sample_main
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.checkpoint import latest_valid_checkpoint
from vidtron.platform.distributed import DistContext
from vidtron.recipes.dit_t2v.sampling import SampleOptions
from vidtron.testing.multirank import run_ranks

PROMPTS = ["a red circle moves left", "a blue square"]
OPTS = SampleOptions(steps=3, cfg_scale=4.0, seed=7)


def _sample_on_rank(ckpt, tp: int, cp: int, cp_mode: str) -> torch.Tensor:
    dims = ParallelDims(tp=tp, cp=cp, cp_mode=cp_mode)
    dims.build_mesh("cpu")
    return generate_latents(ckpt, PROMPTS, OPTS, dims)[0]


@pytest.fixture(scope="module")
def run_dir(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_parallel") / "run"
    run_training(synth_data, out, "trainer.steps=3", "model.num_heads=4", "model.head_dim=16")
    return out


def test_two_rank_sampling_matches_one_process(run_dir):
    ckpt = latest_valid_checkpoint(run_dir, DistContext(0, 1, 0, torch.device("cpu")))
    ref, _ = generate_latents(ckpt, PROMPTS, OPTS)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(OPTS.seed))
    assert (ref - noise).abs().max() > 1e-3  # the (briefly trained) model moves the latents well past the tolerance
    for tp, cp, mode in [(2, 1, "ring"), (1, 2, "ulysses")]:
        per_rank = run_ranks(_sample_on_rank, 2, args=(ckpt, tp, cp, mode))
        for rank, z in enumerate(per_rank):
            err = (z - ref).abs().max().item()
            assert err <= 1e-5, f"tp{tp} cp{cp} {mode} rank {rank}: max |dz| = {err}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tp", "2"], "--nproc=1: must equal --tp * --cp = 2"),
        (["--tp", "8", "--nproc", "8"], "parallel.tp=8: must divide the 4 heads"),
        (["--cp", "2", "--cp-mode", "bogus", "--nproc", "2"], "parallel.cp_mode='bogus'"),
    ],
)
def test_bad_layouts_exit_2_with_one_line(run_dir, capsys, extra, message):
    assert sample_main(["--run-dir", str(run_dir), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
