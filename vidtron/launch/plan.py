"""vidtron-plan: rank the 5D layouts and activation policies that fit a DiT training job on a GPU budget.

    vidtron-plan --flavor dit-13b --frames 129 --height 720 --width 1280 --gpus 64 --gpu-mem 80GiB

The model (memory, FLOPs, communication, step time) is vidtron/tools/planner.py; this is its command line.
`--act-dtype` is the trainer's `trainer.precision`: bf16 prices bf16 all-gathered parameters and activations over
fp32 master weights, gradients and AdamW state, fp32 prices everything in fp32.
"""

from __future__ import annotations

import argparse
import sys

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import dit_config
from vidtron.tools.memory_model import latent_grid
from vidtron.tools.planner import (
    Hardware,
    Workload,
    count_video_tokens,
    format_table,
    layout_report,
    parse_bytes,
    parse_layout,
    plan,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidtron-plan", description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="dit-13b")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="clips per data-parallel rank")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", default="80GiB")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--host-mem", default="128GiB", help="host memory per GPU for offloaded activations")
    p.add_argument("--act-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--zero", default="3,2", help="ZeRO stages to try")
    p.add_argument("--tflops", type=float, default=400.0)
    p.add_argument("--pcie-gbps", type=float, default=25.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--all", action="store_true", help="list every fitting variant, not the best per tp x cp")
    p.add_argument("--layout", default="", help="one layout's memory per policy, e.g. tp=8,cp=4,dp_shard=8[,zero=2]")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as err:
        print(f"vidtron-plan: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.frames < 1 or (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise ConfigError("--frames/--height/--width", (args.frames, args.height, args.width), "frames 4k+1, sizes /16")
    cfg = dit_config(args.flavor)
    act = 2 if args.act_dtype == "bf16" else 4
    w = Workload(latent_grid(args.frames, args.height, args.width), args.text_tokens, args.batch, act, act)
    hw = Hardware(args.gpus, parse_bytes(args.gpu_mem), args.gpus_per_node, parse_bytes(args.host_mem))
    hw.tflops, hw.pcie_gbps = args.tflops, args.pcie_gbps
    V = count_video_tokens(cfg, w.video_grid)
    print(f"{args.flavor}: {args.frames}x{args.height}x{args.width} -> latent {w.video_grid} -> {V} video tokens")
    if args.layout:
        print(layout_report(cfg, w, parse_layout(args.layout, args.gpus), hw))
        return 0
    zero = tuple(int(z) for z in args.zero.split(","))
    fits, rejected = plan(cfg, w, hw, zero)
    print(format_table(fits, rejected, args.top, hw, collapsed=not args.all))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
