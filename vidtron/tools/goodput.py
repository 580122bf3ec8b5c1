"""A goodput model for fault-tolerant training: how much of the wall time trains, given failures and their costs.

N GPUs, each failing on average every `mtbf_gpu_h` hours, fail as a group every M = mtbf_gpu_h / N hours. A run that
checkpoints every tau seconds, stalling `ckpt_stall_s` per checkpoint (async: the copy to host), and that needs
`restart_s` after each failure (detection + restart + reload; with heartbeats detection is trainer.hang_timeout_s
for a hang, seconds for a crash), loses per failure the restart plus on average half an interval of recomputation.
To first order (Young 1974, Daly 2006):

    goodput(tau) = 1 - stall / tau - (tau / 2 + restart) / M,   best at tau* = sqrt(2 stall M)
    goodput(tau*) = 1 - sqrt(2 stall / M) - restart / M

so reaching a goodput G needs restart <= M (1 - G - sqrt(2 stall / M)). Units: seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOUR = 3600.0


@dataclass(frozen=True)
class Goodput:
    gpus: int
    system_mtbf_s: float  # M
    interval_s: float  # tau*, the Young-Daly checkpoint interval
    goodput: float  # at tau*
    max_restart_s_for: dict[float, float]  # target goodput -> the largest restart cost that still reaches it


def young_daly(gpus: int, mtbf_gpu_h: float, stall_s: float, restart_s: float, targets=(0.995, 0.99)) -> Goodput:
    if gpus < 1 or mtbf_gpu_h <= 0 or stall_s <= 0 or restart_s < 0:
        raise ValueError("gpus >= 1, mtbf_gpu_h > 0, stall_s > 0 and restart_s >= 0 are required")
    m = mtbf_gpu_h * HOUR / gpus
    tau = math.sqrt(2 * stall_s * m)
    good = 1 - math.sqrt(2 * stall_s / m) - restart_s / m
    need = {g: m * (1 - g - math.sqrt(2 * stall_s / m)) for g in targets}
    return Goodput(gpus, m, tau, max(good, 0.0), need)


def table(gpu_counts, mtbf_gpu_h: float, stall_s: float, restart_s: float) -> list[Goodput]:
    return [young_daly(n, mtbf_gpu_h, stall_s, restart_s) for n in gpu_counts]


def format_table(rows: list[Goodput]) -> str:
    head = "| GPUs | system MTBF | checkpoint every | goodput | restart allowed for 99.5% | for 99% |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        ok = {g: f"{s:.0f} s" if s > 0 else "unreachable" for g, s in r.max_restart_s_for.items()}
        lines.append(
            f"| {r.gpus} | {r.system_mtbf_s / HOUR:.2f} h | {r.interval_s / 60:.1f} min | {r.goodput:.2%} "
            f"| {ok[0.995]} | {ok[0.99]} |"
        )
    return "\n".join(lines)


def plot(rows_by_restart: dict[float, list[Goodput]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for restart, rows in rows_by_restart.items():
        ax.plot([r.gpus for r in rows], [100 * r.goodput for r in rows], marker="o", label=f"restart {restart:.0f} s")
    ax.axhline(99.5, color="grey", linestyle="--", linewidth=1, label="99.5% (HunyuanVideo)")
    ax.set(xscale="log", xlabel="GPUs", ylabel="goodput (%)", title="Young-Daly goodput vs scale")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m vidtron.tools.goodput --gpus 1024,4096,16384 --mtbf-gpu-h 50000 --ckpt-stall-s 5 --restart-s 60`"""
    import argparse

    p = argparse.ArgumentParser(prog="vidtron-goodput", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="64,256,1024,4096,16384", help="comma-separated GPU counts")
    p.add_argument("--mtbf-gpu-h", type=float, default=50_000.0, help="mean time between failures of one GPU (hours)")
    p.add_argument("--ckpt-stall-s", type=float, default=5.0, help="training stall per checkpoint (s)")
    p.add_argument("--restart-s", default="60", help="restart cost per failure (s); comma-separated for the plot")
    p.add_argument("--plot", default="", help="write a goodput-vs-GPUs PNG here")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.gpus.split(",")]
    restarts = [float(x) for x in a.restart_s.split(",")]
    for restart in restarts:
        print(f"MTBF {a.mtbf_gpu_h:.0f} h/GPU, stall {a.ckpt_stall_s} s per checkpoint, restart {restart:.0f} s")
        print(format_table(table(counts, a.mtbf_gpu_h, a.ckpt_stall_s, restart)))
    if a.plot:
        print("plot:", plot({r: table(counts, a.mtbf_gpu_h, a.ckpt_stall_s, r) for r in restarts}, a.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
