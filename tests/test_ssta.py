"""SSTA: tile layout, sliding / selective block masks, block-sparse attention (torch and triton backends).

Shapes: B batch, N heads, L tokens (video (T, H, W) row-major, then Tt text), Dh head dim, nv video tiles,
nb blocks, bs tokens per block. Tolerance 1e-5 (fp32) against dense SDPA: both sides are exact softmax
attention, they only differ in summation order (~1e-7 observed).

The triton checks run in a subprocess (this file as a script) with TRITON_INTERPRET=1, because the
interpreter must be switched on before the kernel module is imported.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vidtron.kernels.ssta import (
    SSTAAttention,
    TileLayout,
    block_sparse_attention,
    default_tiles,
    default_topk,
    from_tiles,
    sliding_tile_mask,
    ssta_block_mask,
    to_tiles,
)
from vidtron.kernels.ssta.mask import tile_means

TOL = 1e-5


# ---------------------------------------------------------------- references


def _key_valid_L(B: int, n_video: int, text_mask_BTt: torch.Tensor | None, text_len: int) -> torch.Tensor:
    """Bool [B, L]: video keys always valid, text keys per text_mask."""
    text = torch.ones(B, text_len, dtype=torch.bool) if text_mask_BTt is None else text_mask_BTt
    return torch.cat([torch.ones(B, n_video, dtype=torch.bool), text], dim=1)


def dense_reference(q, k, v, text_mask, layout: TileLayout, block_mask=None) -> torch.Tensor:
    """SDPA in the original order with the key-padding mask, and the block mask expanded to tokens."""
    B, N, L, Dh = q.shape
    keep = _key_valid_L(B, layout.n_video_tokens, text_mask, layout.text_len)[:, None, None, :]  # [B, 1, 1, L]
    if block_mask is not None:
        blk_L = layout.scatter_index // layout.block_size  # block of each original token
        keep = keep & block_mask[:, :, blk_L[:, None], blk_L[None, :]]  # [B, N, L, L]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _tiles_of(canvas, tile):
    """Per tile in row-major order: the original video token indices it holds (a plain loop)."""
    T, H, W = canvas
    grid = [math.ceil(c / t) for c, t in zip(canvas, tile)]
    for it, ih, iw in itertools.product(*(range(n) for n in grid)):
        ts = range(it * tile[0], min((it + 1) * tile[0], T))
        hs = range(ih * tile[1], min((ih + 1) * tile[1], H))
        ws = range(iw * tile[2], min((iw + 1) * tile[2], W))
        yield (it, ih, iw), [t * H * W + h * W + w for t in ts for h in hs for w in ws]


def _sliding_loop(grid, window, i, j) -> bool:
    for ix, jx, n, kx in zip(i, j, grid, window):
        if n > kx:
            c = min(max(ix, kx // 2), n - 1 - kx // 2)
            if abs(c - jx) > kx // 2:
                return False
    return True


def _cos01(a, b) -> float:
    return ((a @ b) / (a.norm() * b.norm()) + 1).item() / 2


def loop_reference_mask(q, k, canvas, text_len, tile, window, topk, lam) -> torch.Tensor:
    """The SSTA mask spelled out with loops, in float64."""
    tiles = list(_tiles_of(canvas, tile))
    grid = [math.ceil(c / t) for c, t in zip(canvas, tile)]
    nv, nt = len(tiles), math.ceil(text_len / math.prod(tile))
    B, N = q.shape[:2]
    mask = torch.ones(B, N, nv + nt, nv + nt, dtype=torch.bool)
    for b, n in itertools.product(range(B), range(N)):
        qm = [q[b, n, idx].double().mean(0) for _, idx in tiles]
        km = [k[b, n, idx].double().mean(0) for _, idx in tiles]
        red = [sum(_cos01(km[jp], km[j]) for jp in range(nv) if jp != j) / max(nv - 1, 1) for j in range(nv)]
        for i in range(nv):
            score = [lam * _cos01(qm[i], km[j]) - (1 - lam) * red[j] for j in range(nv)]
            top = sorted(range(nv), key=lambda j: -score[j])[: min(topk, nv)]
            for j in range(nv):
                mask[b, n, i, j] = j in top or _sliding_loop(grid, window, tiles[i][0], tiles[j][0])
    return mask


def _qkv(B, N, L, Dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, L, Dh, generator=g) for _ in range(3)]


# ---------------------------------------------------------------- attention cases (shared with the triton run)

FULL_CASE = dict(canvas=(3, 5, 6), tile=(2, 2, 4), window=(3, 3, 3), text_len=5, topk=1000)  # grid 2x3x2
SPARSE_CASE = dict(canvas=(4, 6, 7), tile=(2, 2, 2), window=(1, 1, 1), text_len=11, topk=3)  # grid 2x3x4


def attention_error(case: dict, backend: str, B: int = 2, N: int = 2) -> dict:
    """Max |SSTAAttention - dense reference| for one case; padded text in sample 1."""
    lay = TileLayout(case["canvas"], case["tile"], case["text_len"])
    q, k, v = _qkv(B, N, lay.seq_len, 8, seed=1)
    text_mask = torch.ones(B, lay.text_len, dtype=torch.bool)
    text_mask[-1, 3:] = False
    core = SSTAAttention(case["canvas"], case["text_len"], case["tile"], case["window"], case["topk"], 0.7, backend)
    mask = ssta_block_mask(q, k, case["canvas"], case["text_len"], case["tile"], case["window"], case["topk"])
    out = core(q, k, v, text_mask)
    ref = dense_reference(q, k, v, text_mask, lay, mask)
    nv = lay.n_video_blocks
    return {"err": (out - ref).abs().max().item(), "video_kept": mask[:, :, :nv, :nv].float().mean().item()}


def empty_row_outputs(backend: str) -> dict:
    """Kernel API: a query block with no kept key and one whose kept keys are all invalid both give zeros."""
    q, k, v = (x.view(1, 2, 4, 8, 8) for x in _qkv(1, 2, 32, 8, seed=2))  # [B, N, nb=4, bs=8, Dh]
    block_mask = torch.eye(4, dtype=torch.bool)  # [nb, nb], broadcast over B, N
    block_mask[0] = False  # query block 0 keeps nothing
    key_valid = torch.ones(4, 8, dtype=torch.bool)
    key_valid[1] = False  # query block 1 keeps only key block 1, all padding
    key_valid[2, 5:] = False
    out = block_sparse_attention(q, k, v, block_mask, key_valid, backend=backend)
    ref = F.scaled_dot_product_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], attn_mask=key_valid[2:, None, :])
    return {"empty_max": out[:, :, :2].abs().max().item(), "err": (out[:, :, 2:] - ref).abs().max().item()}


def kernel_api_errors(backend: str) -> dict:
    """Kernel API on a random block mask, a block size that is not a power of two and random key padding."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 24, 16, generator=g) for _ in range(3))  # [B, N, nb=5, bs=24, Dh]
    block_mask = torch.rand(2, 2, 5, 5, generator=g) < 0.5
    block_mask[..., 0] = True
    key_valid = torch.rand(2, 5, 24, generator=g) < 0.8  # [B, nb, bs]
    keep = block_mask.repeat_interleave(24, 2).repeat_interleave(24, 3) & key_valid.flatten(1)[:, None, None, :]
    flat = [x.flatten(2, 3) for x in (q, k, v)]  # [B, N, nb*bs, Dh]
    ref = F.scaled_dot_product_attention(*flat, attn_mask=keep).view(q.shape)
    out = block_sparse_attention(q, k, v, block_mask, key_valid, backend=backend)
    bf16 = [x.bfloat16() for x in (q, k, v)]
    out_bf16 = block_sparse_attention(*bf16, block_mask, key_valid, backend=backend)
    return {"err": (out - ref).abs().max().item(), "bf16_err": (out_bf16.float() - ref).abs().max().item()}


# ---------------------------------------------------------------- 1. geometry


def test_sliding_window_27_tiles_and_clamped_corners():
    grid, window = (4, 5, 6), (3, 3, 3)
    mask = sliding_tile_mask(grid, window)  # [120, 120]
    assert mask.shape == (120, 120) and (mask.sum(-1) == 27).all()
    flat = lambda t, h, w: (t * 5 + h) * 6 + w  # noqa: E731
    corner = {flat(t, h, w) for t in range(3) for h in range(3) for w in range(3)}  # centre clamps to (1, 1, 1)
    assert set(mask[flat(0, 0, 0)].nonzero().flatten().tolist()) == corner
    far = {flat(t, h, w) for t in range(1, 4) for h in range(2, 5) for w in range(3, 6)}  # centre (2, 3, 4)
    assert set(mask[flat(3, 4, 5)].nonzero().flatten().tolist()) == far
    edge = {flat(t, h, w) for t in range(0, 3) for h in range(1, 4) for w in range(3, 6)}  # tile (0, 2, 5)
    assert set(mask[flat(0, 2, 5)].nonzero().flatten().tolist()) == edge
    assert (sliding_tile_mask((2, 5, 6), window).sum(-1) == 2 * 9).all()  # short axis: all of its tiles
    assert torch.equal(sliding_tile_mask((1, 3, 4), (1, 1, 1)), torch.eye(12, dtype=torch.bool))


def test_public_mask_sliding_only_with_topk_zero():
    canvas, tile, text_len = (8, 10, 12), (2, 2, 2), 9  # grid 4x5x6, bs 8, 2 text blocks
    q, k, _ = _qkv(1, 2, 960 + text_len, 4)
    mask = ssta_block_mask(q, k, canvas, text_len, tile, (3, 3, 3), topk=0)
    assert mask.shape == (1, 2, 122, 122)
    assert (mask[:, :, :120, :120].sum(-1) == 27).all()
    assert mask[:, :, 120:].all() and mask[:, :, :, 120:].all()  # text rows and columns dense


def test_padding_of_a_canvas_not_a_tile_multiple():
    lay = TileLayout((5, 7, 9), (2, 4, 4), text_len=5)  # padded to (6, 8, 12): grid 3x2x3, bs 32
    assert lay.grid == (3, 2, 3) and lay.n_video_blocks == 18 and lay.n_text_blocks == 1 and lay.block_size == 32
    assert lay.tiled_len == 19 * 32 and lay.block_valid.sum() == 5 * 7 * 9 + 5
    assert lay.block_valid[17].sum() == 1 * 3 * 1  # last tile: t 4, h 4..6, w 8
    assert lay.block_valid[18].tolist() == [True] * 5 + [False] * 27  # text block
    ids = torch.arange(lay.seq_len, dtype=torch.float32).view(1, 1, -1, 1) + 1  # token id + 1, 0 = padding
    tiled = to_tiles(ids, lay.gather_index, lay)[0, 0, :, :, 0]  # [nb, bs]
    assert torch.equal(tiled != 0, lay.block_valid)
    t, h, w = 4, 6, 8  # in tile (2, 1, 2), at (0, 2, 0) inside it
    assert tiled[(2 * 2 + 1) * 3 + 2, (0 * 4 + 2) * 4 + 0] == t * 63 + h * 9 + w + 1
    assert tiled[18, :5].tolist() == [316.0 + i for i in range(5)]  # text follows the video blocks
    means = tile_means(to_tiles(ids, lay.gather_index, lay)[:, :, :18], lay.block_valid[:18])  # [1, 1, nv, 1]
    assert means[0, 0, 17, 0] == (4 * 63 + 4 * 9 + 8 + 4 * 63 + 5 * 9 + 8 + 4 * 63 + 6 * 9 + 8) / 3 + 1  # valid only


def test_tile_reorder_is_a_permutation_and_inverse_restores_order():
    lay = TileLayout((5, 7, 9), (2, 4, 4), text_len=5)
    real = lay.gather_index[lay.gather_index < lay.seq_len]
    assert torch.equal(real.sort().values, torch.arange(lay.seq_len))
    assert torch.equal(lay.gather_index[lay.scatter_index], torch.arange(lay.seq_len))
    x = torch.randn(2, 3, lay.seq_len, 4)
    assert torch.equal(from_tiles(to_tiles(x, lay.gather_index, lay), lay.scatter_index), x)


# ---------------------------------------------------------------- 2. selective mask vs loops


@pytest.mark.parametrize(
    "canvas, tile, window, text_len, topk, lam",
    [
        ((5, 6, 7), (2, 3, 3), (1, 1, 1), 7, 4, 0.7),  # padded tiles, text block, pure top-k
        ((9, 8, 8), (2, 2, 2), (3, 3, 3), 0, 6, 0.3),  # 80 tiles, window + top-k
    ],
)
def test_selective_mask_matches_loop_reference(canvas, tile, window, text_len, topk, lam):
    q, k, _ = _qkv(2, 3, math.prod(canvas) + text_len, 8, seed=3)
    mask = ssta_block_mask(q, k, canvas, text_len, tile, window, topk, lam)
    ref = loop_reference_mask(q, k, canvas, text_len, tile, window, topk, lam)
    assert torch.equal(mask, ref)
    assert not torch.equal(mask[:, 0], mask[:, 1])  # heads choose different tiles
    nv = math.prod(math.ceil(c / t) for c, t in zip(canvas, tile))
    assert mask[:, :, nv:].all() and mask[:, :, :, nv:].all()


# ---------------------------------------------------------------- 3./4. attention vs dense (torch backend)


def test_all_blocks_kept_equals_dense_attention():
    res = attention_error(FULL_CASE, "torch")
    assert res["video_kept"] == 1.0 and res["err"] <= TOL
    lay = TileLayout(FULL_CASE["canvas"], FULL_CASE["tile"], FULL_CASE["text_len"])
    q, k, v = _qkv(2, 2, lay.seq_len, 8, seed=4)
    text_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    core = SSTAAttention(FULL_CASE["canvas"], 5, FULL_CASE["tile"], topk=1000)
    ref = dense_reference(q, k, v, text_mask, lay)  # plain key-padding SDPA, no block mask
    assert (core(q, k, v, text_mask) - ref).abs().max() <= TOL
    assert (core(q, k, v, None) - F.scaled_dot_product_attention(q, k, v)).abs().max() <= TOL


def test_sparse_mask_equals_block_masked_dense_attention():
    res = attention_error(SPARSE_CASE, "torch")
    assert res["video_kept"] < 0.5 and res["err"] <= TOL


def test_torch_backend_in_small_chunks(monkeypatch):
    import vidtron.kernels.ssta.torch_impl as torch_impl

    monkeypatch.setattr(torch_impl, "GATHER_BUDGET", 8 * 8 * 3)  # at most 3 kept blocks' keys per chunk
    res = attention_error(SPARSE_CASE, "torch")
    assert res["video_kept"] < 0.5 and res["err"] <= TOL


def test_torch_backend_gradients_match_dense():
    lay = TileLayout((3, 5, 6), (2, 2, 4), 5)
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, lay.seq_len, 8, seed=5))
    text_mask = torch.tensor([[True, True, True, False, False]])
    core = SSTAAttention(lay.canvas, 5, lay.tile, topk=1000)
    grads = torch.autograd.grad(core(q, k, v, text_mask).square().sum(), (q, k, v))
    ref = torch.autograd.grad(dense_reference(q, k, v, text_mask, lay).square().sum(), (q, k, v))
    assert all((g - r).abs().max() <= 1e-4 for g, r in zip(grads, ref))


def test_kernel_api_rows_without_valid_keys_are_zero():
    res = empty_row_outputs("torch")
    assert res["empty_max"] == 0.0 and res["err"] <= TOL


def test_kernel_api_random_block_mask_matches_dense():
    res = kernel_api_errors("torch")
    assert res["err"] <= TOL and res["bf16_err"] <= 3e-2  # bf16: ~8 bits of mantissa on inputs and output


# ---------------------------------------------------------------- 3./4. triton backend (interpreter, subprocess)


def test_triton_backend_matches_dense_in_interpreter():
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: skipping the triton backend test")
        pytest.skip("triton is not importable")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["full"]["video_kept"] == 1.0 and res["full"]["err"] <= TOL
    assert res["sparse"]["video_kept"] < 0.5 and res["sparse"]["err"] <= TOL
    assert res["empty"]["empty_max"] == 0.0 and res["empty"]["err"] <= TOL
    assert res["kernel"]["err"] <= TOL and res["kernel"]["bf16_err"] <= 3e-2


def test_triton_kernel_lowers_to_a_cuda_binary():
    """Compile (no GPU needed) for sm_90 as the wrapper launches it: catches what only the interpreter accepts."""
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton, not in interpreter mode")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vidtron.kernels.ssta.triton_impl import _bsa_fwd_kernel

    for dtype, block_n, stages in (("bf16", 64, 3), ("fp32", 32, 2)):
        sig = dict.fromkeys(("Q", "K", "V", "Out"), f"*{dtype}") | dict.fromkeys(("KV_IDX", "KV_CNT"), "*i32")
        sig |= {"KEY_VALID": "*i8", "scale": "fp32"} | dict.fromkeys(("n_heads", "nb_q", "nb_k", "k_max"), "i32")
        const = dict(BS=384, DH=128, BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=128, UPCAST=False, IEEE=dtype == "fp32")
        src = ASTSource(_bsa_fwd_kernel, sig | dict.fromkeys(const, "constexpr"), const)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_stages": stages, "enable_fp_fusion": True}
        )
        assert kernel.asm["cubin"] and kernel.metadata.shared <= 100 * 1024  # fits A100 / H100 shared memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_backend_on_cuda_matches_torch_backend():
    canvas, text_len = (12, 32, 40), 100  # paper tiles: grid 2x4x5 (padded W), 384-token blocks, Dh 128
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, math.prod(canvas) + text_len, 128, generator=g).cuda() for _ in range(3))
    text_mask = torch.ones(2, text_len, dtype=torch.bool, device="cuda")
    text_mask[1, 60:] = False
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = [t.to(dtype) for t in (q, k, v)]
        outs = [SSTAAttention(canvas, text_len, topk=8, backend=b).cuda()(*x, text_mask) for b in ("torch", "triton")]
        assert (outs[0].float() - outs[1].float()).abs().max() <= tol


# ---------------------------------------------------------------- 5. default rules and errors


def test_default_topk_and_tiles():
    assert default_topk(31) == 32 and default_topk(1) == 32 and default_topk(32) == 64 and default_topk(61) == 64
    assert default_topk(20, topk=128) == 64 and default_topk(40, topk=128) == 128
    assert default_tiles((1, 45, 80)) == ((1, 16, 24), (1, 1, 1))
    assert default_tiles((2, 45, 80)) == ((6, 8, 8), (3, 3, 3)) == default_tiles((31, 45, 80))
    tile, window = default_tiles((1, 32, 48))  # an image: grid 1x2x2, each tile alone in its window
    q, k, _ = _qkv(1, 1, 32 * 48, 4)
    mask = ssta_block_mask(q, k, (1, 32, 48), 0, tile, window, topk=0)
    assert torch.equal(mask[0, 0], torch.eye(4, dtype=torch.bool))


def test_bad_inputs_raise_value_errors():
    q, k, _ = _qkv(1, 1, 50, 4)
    with pytest.raises(ValueError, match="T\\*H\\*W"):
        ssta_block_mask(q, k, (2, 4, 4), text_len=3, tile=(2, 2, 2))
    with pytest.raises(ValueError, match="ssta.backend"):
        SSTAAttention((2, 4, 4), backend="cuda")
    with pytest.raises(ValueError, match="ssta.tile"):
        SSTAAttention((2, 4, 4), tile=(0, 2, 2))


def test_bench_runs_on_a_tiny_canvas(tmp_path):
    from bench.bench_ssta import run

    res = run(tmp_path, canvases=((2, 16, 24),), head_dim=16, text_len=8, max_query=128, repeats=1)
    row = json.loads((tmp_path / "ssta.json").read_text())["canvases"][0]
    assert row == res["canvases"][0] and row["video_tiles"] == 6 and row["topk"] == 32 and row["sparsity"] == 0.0
    assert row["dense_s"] > 0 and row["ssta_incl_mask_s"] >= row["ssta_excl_mask_s"] > 0


if __name__ == "__main__":  # the triton half of the tests; run with TRITON_INTERPRET=1 on CPU
    torch.set_num_threads(1)
    results = {
        "full": attention_error(FULL_CASE, "triton", B=1),
        "sparse": attention_error(SPARSE_CASE, "triton"),
        "empty": empty_row_outputs("triton"),
        "kernel": kernel_api_errors("triton"),
    }
    print(json.dumps(results))


def test_kernel_rejects_bad_shapes_with_what_it_expected():
    """Wrong k / v / mask shapes fail with the expected shape before any kernel runs (Triton would read out of
    bounds on a short v)."""
    from vidtron.errors import ConfigError

    q, k, v = (x.view(1, 2, 4, 8, 8) for x in _qkv(1, 2, 32, 8, seed=2))  # [B, N, nb=4, bs=8, Dh]
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"v shape.*expected \[B, N, 4, 8, 8\]"):
        block_sparse_attention(q, k, v[:, :, :3], mask, None, backend="torch")
    with pytest.raises(ConfigError, match=r"mask shapes.*block_mask \(3, 4\).*\[1, 2, 4, 4\]"):
        block_sparse_attention(q, k, v, mask[:3], None, backend="torch")
    with pytest.raises(ConfigError, match=r"key_valid \(4, 7\).*key_valid to \[1, 4, 8\]"):
        block_sparse_attention(q, k, v, mask, torch.ones(4, 7, dtype=torch.bool), backend="torch")
