"""vidtron-sample --attention ssta: on 1 process, under Ulysses 2 and TP 2; ring / usp refused; triton refuses grads.

The clip is the run's 9x64x64 -> 3x4x4 = 48 video tokens (dit-tiny, patch (1, 2, 2)). With (1, 2, 2) tiles the
tile grid is 3 x 2 x 2 = 12 tiles:
  * FULL: a (3, 3, 3) window covers the whole grid, so every block is kept and SSTA is dense attention with the
    text key-padding mask, computed block by block: within 1e-5 of dense sampling (the same sums in another order
    over 3 Euler steps, as in tests/test_sample_parallel.py, whose model moves the latents ~3e-2 from the noise);
  * SPARSE: a (1, 1, 1) window and top-1, so each query tile keeps 1-2 of the 12 key tiles: it runs, keeps under
    a fifth of the video-video blocks and moves the latents away from dense (by 4.3e-4, 40x the tolerance: the
    3-step model's attention output is still small). Under Ulysses 2 and TP 2 every rank
    builds the single-process masks for its heads, so sparse sampling matches one process within the same 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_training
from vidtron.errors import ConfigError
from vidtron.kernels.ssta import CanvasSSTA, SSTAOptions, block_sparse_attention
from vidtron.launch.sample import generate_latents, load_for_sampling
from vidtron.launch.sample import main as sample_main
from vidtron.models.text.encoders import build_text_encoder
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions
from vidtron.platform.checkpoint import latest_valid_checkpoint
from vidtron.platform.distributed import DistContext
from vidtron.recipes.dit_t2v.sampling import SampleOptions
from vidtron.testing.multirank import run_ranks

PROMPTS = ["a red circle moves left", "a blue square"]
OPTS = SampleOptions(steps=3, cfg_scale=4.0, seed=7)
FULL = ParallelizeOptions(attention="ssta", ssta=SSTAOptions(tile=(1, 2, 2), window=(3, 3, 3), topk=64))
SPARSE = ParallelizeOptions(
    attention="ssta", ssta=SSTAOptions(tile=(1, 2, 2), window=(1, 1, 1), topk=1, halve_topk=False)
)
TOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssta_sample") / "run"
    run_training(synth_data, out, "trainer.steps=3", "model.num_heads=4", "model.head_dim=16")
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return latest_valid_checkpoint(run_dir, DistContext(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def dense(ckpt):
    return generate_latents(ckpt, PROMPTS, OPTS)[0]


def _ssta_on_rank(ckpt, tp: int, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = ParallelDims(tp=tp, cp=cp, cp_mode="ulysses")
    dims.build_mesh("cpu")
    full = generate_latents(ckpt, PROMPTS, OPTS, dims, parallel=FULL)[0]
    return full, generate_latents(ckpt, PROMPTS, OPTS, dims, parallel=SPARSE)[0]


def test_full_density_ssta_equals_dense_and_sparse_differs(ckpt, dense):
    full = generate_latents(ckpt, PROMPTS, OPTS, parallel=FULL)[0]
    assert (full - dense).abs().max().item() <= TOL
    sparse = generate_latents(ckpt, PROMPTS, OPTS, parallel=SPARSE)[0]
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max().item() > 10 * TOL  # measured 4.3e-4: the mask really drops blocks


def test_sparse_core_keeps_few_blocks(ckpt):
    model, cfg = load_for_sampling(ckpt, parallel=SPARSE)
    cores = {id(b.attn_core) for b in [*model.double_blocks, *model.single_blocks]}
    core = model.double_blocks[0].attn_core
    assert isinstance(core, CanvasSSTA) and cores == {id(core)}  # one shared core in every block
    dcfg = model.config
    text = build_text_encoder(cfg["text"], dcfg.text_dim, dcfg.pooled_dim).encode(PROMPTS[:1])
    latents = torch.randn(1, dcfg.in_channels, 3, 8, 8)
    with torch.no_grad():
        model(latents, torch.tensor([500.0]), text.states, text.mask, text.pooled)
    assert core.canvas == (3, 4, 4)
    assert 0 < core.last_density.item() <= 2 / 12  # itself (window 1) + the top-1 tile of 12


@pytest.mark.parametrize("tp, cp", [(1, 2), (2, 1)], ids=["ulysses2", "tp2"])
def test_ssta_under_ulysses_and_tp_matches_one_process(ckpt, dense, tp, cp):
    sparse_ref = generate_latents(ckpt, PROMPTS, OPTS, parallel=SPARSE)[0]
    for rank, (full, sparse) in enumerate(run_ranks(_ssta_on_rank, 2, args=(ckpt, tp, cp))):
        err_full = (full - dense).abs().max().item()
        err_sparse = (sparse - sparse_ref).abs().max().item()
        assert err_full <= TOL, f"tp{tp} cp{cp} rank {rank}: full-density SSTA vs dense, max |dz| = {err_full}"
        assert err_sparse <= TOL, f"tp{tp} cp{cp} rank {rank}: sparse SSTA vs 1 process, max |dz| = {err_sparse}"


def test_cli_flags_reach_the_core(run_dir, ckpt, tmp_path):
    flags = ["--ssta-tile", "1,2,2", "--ssta-window", "1,1,1", "--ssta-topk", "1", "--no-ssta-halve-topk"]
    args = ["--run-dir", str(run_dir), "--out", str(tmp_path), "--steps", "3", "--cfg-scale", "4", "--seed", "7"]
    assert sample_main([*args, *sum((["--prompt", p] for p in PROMPTS), []), "--attention", "ssta", *flags]) == 0
    written = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert torch.equal(written, generate_latents(ckpt, PROMPTS, OPTS, parallel=SPARSE)[0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cp", "2", "--nproc", "2"], "--cp-mode='ring': SSTA runs alone or inside Ulysses only"),
        (["--cp", "2", "--cp-mode", "usp", "--nproc", "2"], "--cp-mode='usp'"),
        (["--ssta-tile", "6,8"], "--ssta-tile='6,8': give three integers"),
        (["--ssta-lambda", "1.5"], "ssta.lam=1.5"),
        (["--tile", "on"], "--tile='on': this run decodes with the stand-in autoencoder"),
    ],
)
def test_bad_ssta_settings_exit_2_with_one_line(run_dir, capsys, extra, message):
    assert sample_main(["--run-dir", str(run_dir), "--prompt", "x", "--attention", "ssta", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parallelize_refuses_ssta_under_ring():
    with pytest.raises(ConfigError, match="parallel.cp_mode='ring'.*use parallel.cp_mode=ulysses"):
        ParallelizeOptions(attention="ssta").check_layout(ParallelDims(cp=2))
    ParallelizeOptions(attention="ssta").check_layout(ParallelDims(cp=2, cp_mode="ulysses"))  # fine
    with pytest.raises(ConfigError, match="attention='sparse'"):
        ParallelizeOptions(attention="sparse")


def test_triton_backend_refuses_inputs_that_require_grad():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2, 16, 16, generator=g) for _ in range(3))  # [B, N, nb, bs, Dh]
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ConfigError, match="ssta.backend='triton': is forward only.*backend='torch'"):
        block_sparse_attention(q.requires_grad_(), k, v, mask, backend="triton")
    with torch.no_grad():  # no grad to track: past the check (here, CPU tensors then need the interpreter)
        try:
            block_sparse_attention(q, k, v, mask, backend="triton")
        except RuntimeError as err:
            assert "TRITON_INTERPRET" in str(err) or "triton" in str(err)


def test_bench_sample_section_runs_on_a_tiny_canvas():
    from bench.bench_ssta import bench_sample

    row = bench_sample((6, 16, 16), blocks=(1, 0), text_len=8)  # a 1 x 2 x 2 tile grid: the window keeps all
    assert row["tile"] == [6, 8, 8] and row["topk"] == 32 and row["sparsity_last_block"] == 0.0
    assert row["relative_diff_vs_dense"] < 1e-5 and row["dense_forward_s"] > 0 and row["ssta_forward_s"] > 0
