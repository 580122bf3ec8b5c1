"""Time dense SDPA vs SSTA block-sparse attention (torch backend) at the paper's tile / window / top-k.

    python -m bench.bench_ssta [--heads 1 --head-dim 64 --text 256 --max-query-tokens 4096]

For each latent canvas (T, H, W) after patchify: tile (6, 8, 8), window (3, 3, 3) and top-k 64, halved for
T <= 31 (`default_tiles`, `default_topk`). Reports the sparsity (fraction of video-video blocks dropped), the
time of dense SDPA with the text key-padding mask (as the DiT's dense core runs it) and without any mask (CPU
SDPA is slower with a mask), of SSTA with and without the mask build, and the speed-ups.
Writes bench/results/ssta.json.

    python -m bench.bench_ssta --sample [--sample-canvas 18x48x48 --sample-blocks 1,1 --text 64]

The `sample` section times what `vidtron-sample --attention ssta` runs: one forward of a DiT with dit-tiny widths
(2 heads x 32) on a latent token canvas, its blocks' attention dense (the default core) vs SSTA at the paper's
settings (the same weights, `parallelize_dit` with ParallelizeOptions(attention="ssta")), whole calls, no row
subsets. It reports the SSTA sparsity the model's own q / k give, both times, the speed-up and the relative
difference of the two predictions. Writes bench/results/ssta_sample.json.

To keep each canvas to a few seconds on a CPU, attention is timed on an evenly spaced subset of the query rows
(dense: tokens; SSTA: video query blocks, text query blocks in full) against all keys, and scaled up by the
number of rows: both costs are linear in the query rows. `query_fraction` in the JSON says how much was timed
(1.0 = the whole call, and then the SSTAAttention module is also timed end to end). The tile reorder and the
mask build are always timed in full.
Shape legend: B batch (1), N heads, L tokens, Dh head dim, nv video tiles, nb blocks, bs = 384 tokens per block.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS, write_result
from vidtron.kernels.ssta import SSTAAttention, block_sparse_attention, default_tiles, default_topk, to_tiles
from vidtron.kernels.ssta.mask import block_mask_from_tiles
from vidtron.kernels.ssta.tiles import from_tiles, key_valid_blocks

CANVASES = ((12, 32, 32), (18, 48, 48), (24, 48, 64))


def _best_of(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _timed(fn):
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _evenly(n: int, m: int) -> torch.Tensor:
    """m (or fewer) evenly spaced indices in [0, n)."""
    return torch.linspace(0, n - 1, max(1, min(n, m))).round().long().unique()


def _inputs(L: int, text_len: int, heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, L, head_dim, generator=g) for _ in range(3))  # [B, N, L, Dh]
    text_mask = torch.ones(1, text_len, dtype=torch.bool)
    text_mask[:, text_len * 3 // 4 :] = False  # a quarter of the text is padding
    return q, k, v, text_mask


def _time_dense(q, k, v, text_mask, n_video: int, max_query: int, repeats: int) -> tuple[float, float]:
    """Dense SDPA time for all L query rows (from a row subset): with the text key-padding mask, and unmasked."""
    L = q.shape[2]
    rows = _evenly(L, max_query)
    keys = torch.cat([torch.ones(1, n_video, dtype=torch.bool), text_mask], 1)[:, None, None, :]  # [B, 1, 1, L]
    q_sub = q[:, :, rows].contiguous()
    masked = _best_of(lambda: F.scaled_dot_product_attention(q_sub, k, v, attn_mask=keys), repeats)
    unmasked = _best_of(lambda: F.scaled_dot_product_attention(q_sub, k, v), repeats)
    return masked * L / len(rows), unmasked * L / len(rows)


def _time_ssta(core: SSTAAttention, q, k, v, text_mask, frac: float, repeats: int) -> dict:
    """SSTA stage times: tile reorder (+ inverse), mask build, block-sparse kernel (scaled from a subset)."""
    lay = core.layout
    nv, idx = lay.n_video_blocks, core.gather_index
    reorder_s = _best_of(lambda: [to_tiles(x, idx, lay) for x in (q, k, v)], repeats)
    q_t, k_t, v_t = (to_tiles(x, idx, lay) for x in (q, k, v))  # [B, N, nb, bs, Dh]
    reorder_s += _best_of(lambda: from_tiles(q_t, core.scatter_index), repeats)
    build = lambda: block_mask_from_tiles(q_t, k_t, lay, core.sliding, core.topk, core.lam)  # noqa: E731
    mask_s = _best_of(build, repeats)
    mask = build()  # [B, N, nb, nb]
    valid = key_valid_blocks(core.block_valid, text_mask, lay)  # [B, nb, bs]
    vid = _evenly(nv, math.ceil(nv * frac))  # video query blocks timed
    txt = torch.arange(nv, lay.n_blocks)  # text query blocks: dense rows, timed in full

    def kernel(rows: torch.Tensor) -> float:
        qs, ms = q_t[:, :, rows].contiguous(), mask[:, :, rows]
        return _best_of(lambda: block_sparse_attention(qs, k_t, v_t, ms, valid), repeats)

    kernel_s = kernel(vid) * nv / len(vid) + (kernel(txt) if len(txt) else 0.0)
    kept = mask[:, :, :nv, :nv].sum(-1).float()  # kept key tiles per video query tile
    return {
        "reorder_s": reorder_s,
        "mask_s": mask_s,
        "kernel_s": kernel_s,
        "sparsity": 1.0 - kept.mean().item() / nv,
        "kept_tiles_per_query": [kept.min().item(), kept.mean().item(), kept.max().item()],
    }


def bench_canvas(canvas, heads: int, head_dim: int, text_len: int, max_query: int, repeats: int) -> dict:
    """All numbers for one latent canvas (T, H, W)."""
    (tile, window), topk = default_tiles(canvas), default_topk(canvas[0])
    core = SSTAAttention(canvas, text_len, tile, window, topk)
    L = core.layout.seq_len
    q, k, v, text_mask = _inputs(L, text_len, heads, head_dim)
    frac = min(1.0, max_query / L)
    dense_s, dense_unmasked_s = _time_dense(q, k, v, text_mask, core.layout.n_video_tokens, max_query, repeats)
    res = {"canvas": list(canvas), "tokens": L, "tile": list(tile), "window": list(window), "topk": topk}
    res |= {"video_tiles": core.layout.n_video_blocks, "query_fraction": round(frac, 4)}
    res |= {"dense_s": dense_s, "dense_unmasked_s": dense_unmasked_s}
    res |= _time_ssta(core, q, k, v, text_mask, frac, repeats)
    res["ssta_excl_mask_s"] = res["reorder_s"] + res["kernel_s"]
    res["ssta_incl_mask_s"] = res["ssta_excl_mask_s"] + res["mask_s"]
    res["speedup_excl_mask"] = dense_s / res["ssta_excl_mask_s"]
    res["speedup_incl_mask"] = dense_s / res["ssta_incl_mask_s"]
    res["speedup_incl_mask_vs_unmasked_dense"] = dense_unmasked_s / res["ssta_incl_mask_s"]
    if frac == 1.0:
        res["ssta_module_s"] = _best_of(lambda: core(q, k, v, text_mask), repeats)
    return res


def run(
    out_dir: str | Path = RESULTS, canvases=CANVASES, heads=1, head_dim=64, text_len=256, max_query=4096, repeats=2
):
    """Bench every canvas, write `out_dir/ssta.json` (via bench.common) and return the numbers."""
    torch.manual_seed(0)
    with torch.no_grad():
        rows = [bench_canvas(c, heads, head_dim, text_len, max_query, repeats) for c in canvases]
    result = {
        "what": "dense SDPA vs SSTA (torch backend), forward, seconds per call, best of `repeats`; batch 1",
        "config": {"heads": heads, "head_dim": head_dim, "text_len": text_len, "max_query_tokens": max_query},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "canvases": rows,
    }
    write_result("ssta", result, out_dir)
    return result


TABLE = (  # (header, JSON key, format)
    ("tokens", "tokens", "d"),
    ("tiles", "video_tiles", "d"),
    ("sparsity", "sparsity", ".3f"),
    ("dense s", "dense_s", ".3f"),
    ("unmasked", "dense_unmasked_s", ".3f"),
    ("ssta s", "ssta_excl_mask_s", ".3f"),
    ("+mask s", "ssta_incl_mask_s", ".3f"),
    ("x", "speedup_incl_mask", ".2f"),
    ("x unm.", "speedup_incl_mask_vs_unmasked_dense", ".2f"),
)


def _print_table(res: dict) -> None:
    print(f"{'canvas':>14} " + " ".join(f"{h:>8}" for h, _, _ in TABLE))
    for r in res["canvases"]:
        print(f"{str(tuple(r['canvas'])):>14} " + " ".join(f"{r[key]:>8{fmt}}" for _, key, fmt in TABLE))


def _dit(blocks: tuple[int, int]):
    """A random DiT with dit-tiny widths and `blocks` = (dual, single) blocks, in eval mode."""
    from vidtron.models.dit import DiT
    from vidtron.models.dit.configs import dit_config

    cfg = dit_config("dit-tiny", {"num_double_blocks": blocks[0], "num_single_blocks": blocks[1]})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DiT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # off the zero init of the output layers, so the prediction (and any error) is not zero
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def bench_sample(canvas=(18, 48, 48), blocks=(1, 1), text_len: int = 64, repeats: int = 1) -> dict:
    """One DiT forward on a latent token canvas (T, H, W): dense attention vs SSTA at the paper's settings."""
    from vidtron.models.dit.parallelize import parallelize_dit
    from vidtron.parallel.dims import ParallelDims
    from vidtron.parallel.options import ParallelizeOptions

    dense = _dit(blocks)
    sparse = _dit(blocks)
    sparse.load_state_dict(dense.state_dict())
    parallelize_dit(sparse, ParallelDims(), ParallelizeOptions(inference=True, attention="ssta"))
    cfg, g = dense.config, torch.Generator().manual_seed(0)
    pt, p, _ = cfg.patch
    latents = torch.randn(1, cfg.in_channels, canvas[0] * pt, canvas[1] * p, canvas[2] * p, generator=g)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g)
    text_mask = torch.arange(text_len)[None] < text_len * 3 // 4  # a quarter of the text is padding
    args = (latents, torch.tensor([500.0]), text, text_mask, torch.randn(1, cfg.pooled_dim, generator=g))
    with torch.no_grad():
        out_dense, dense_s = _timed(lambda: dense(*args))  # the first call counts: no compile, no warm-up to hide
        out_sparse, ssta_s = _timed(lambda: sparse(*args))
        dense_s = min(dense_s, _best_of(lambda: dense(*args), repeats - 1)) if repeats > 1 else dense_s
        ssta_s = min(ssta_s, _best_of(lambda: sparse(*args), repeats - 1)) if repeats > 1 else ssta_s
    core = sparse.double_blocks[0].attn_core if cfg.num_double_blocks else sparse.single_blocks[0].attn_core
    tile, window, topk = core.opts.resolve(core.canvas)
    rel = ((out_sparse - out_dense).norm() / out_dense.norm()).item()
    return {
        "canvas": list(canvas),
        "tokens": math.prod(canvas) + text_len,
        "tile": list(tile),
        "window": list(window),
        "topk": topk,
        "lam": core.opts.lam,
        "blocks": list(blocks),
        "heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "sparsity_last_block": 1.0 - core.last_density.item(),
        "dense_forward_s": dense_s,
        "ssta_forward_s": ssta_s,
        "speedup": dense_s / ssta_s,
        "relative_diff_vs_dense": rel,
    }


def run_sample(out_dir: str | Path = RESULTS, canvases=((18, 48, 48),), blocks=(1, 1), text_len=64, repeats=1):
    """`bench_sample` for every canvas; writes `out_dir/ssta_sample.json` and returns the numbers."""
    rows = [bench_sample(c, blocks, text_len, repeats) for c in canvases]
    result = {
        "what": "one DiT forward (dit-tiny widths), dense attention vs SSTA core, seconds, best of `repeats`; batch 1",
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "canvases": rows,
    }
    write_result("ssta_sample", result, out_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--max-query-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sample", action="store_true", help="time DiT forwards (dense vs SSTA core) instead")
    p.add_argument("--sample-canvas", default="18x48x48", help="latent token canvases TxHxW, comma-separated")
    p.add_argument("--sample-blocks", default="1,1", help="dual,single blocks of the sample DiT")
    a = p.parse_args()
    if a.sample:
        canvases = [tuple(int(v) for v in c.split("x")) for c in a.sample_canvas.split(",")]
        blocks = tuple(int(v) for v in a.sample_blocks.split(","))
        res = run_sample(a.out, canvases, blocks, a.text, a.repeats)
        for r in res["canvases"]:
            print(json.dumps(r))
        return
    res = run(a.out, CANVASES, a.heads, a.head_dim, a.text, a.max_query_tokens, a.repeats)
    _print_table(res)


if __name__ == "__main__":
    main()
