"""Time forward + backward of the context-parallel attention cores on local CPU ranks (gloo).

    python -m bench.bench_cp --world 4 --video 4096 --text 256 --heads 8 --head-dim 64

Prints one line per mode: the median fwd+bwd time per call on rank 0 and the same sequence on one process with the
dense core. On CPU this checks plumbing and comm overhead, not the speed of a GPU cluster.
Shape legend: B batch, N heads, Lv video tokens, T text tokens, Dh head dim.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from bench.common import write_result
from vidtron.kernels.lse_attention import LseDenseAttention
from vidtron.parallel.context import build_cp_attention, local_video_len
from vidtron.parallel.dims import ParallelDims
from vidtron.testing.multirank import run_ranks


def _inputs(args, lv: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, lv + args.text, args.head_dim)  # [B, N, Lv_local + T, Dh]
    qkv = [torch.randn(shape, generator=g).requires_grad_() for _ in range(3)]
    return qkv, torch.ones(args.batch, args.text, dtype=torch.bool)  # text_mask [B, T]


def _time(core, qkv, text_mask, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        core(*qkv, text_mask).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def _rank(args, mode: str) -> float:
    kwargs = dict(ulysses=args.usp_ulysses) if mode == "usp" else {}
    dims = ParallelDims(cp=args.world, cp_mode=mode, **kwargs)
    dims.build_mesh("cpu")
    core = build_cp_attention(dims, video_len=args.video, heads=args.heads)
    qkv, text_mask = _inputs(args, local_video_len(args.video, args.world))
    dist.barrier()
    return _time(core, qkv, text_mask, args.reps)


def run(out_dir=None, argv: list[str] | None = None) -> dict:
    """Dense on one process vs each CP mode on `--world` ranks; writes bench/results/cp.json."""
    args = _parser().parse_args(argv if argv is not None else ["--world", "4", "--modes", "ring,ulysses,usp"])
    qkv, text_mask = _inputs(args, args.video)
    result = {"world": args.world, "video": args.video, "text": args.text, "heads": args.heads}
    result["dense_1proc_ms"] = _time(LseDenseAttention(), qkv, text_mask, args.reps) * 1e3
    for mode in args.modes.split(","):
        ms = run_ranks(_rank, args.world, args=(args, mode))[0] * 1e3
        result[f"{mode}_ms_per_rank"] = ms
        result[f"{mode}_over_dense"] = ms / result["dense_1proc_ms"]
    write_result("cp", result, out_dir)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--video", type=int, default=2048)
    p.add_argument("--text", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--usp-ulysses", type=int, default=2)
    p.add_argument("--modes", default="ring,ulysses,usp")
    return p


def main() -> None:
    import sys

    print(run(argv=sys.argv[1:]))


if __name__ == "__main__":
    main()
