"""Fused vs math log-sum-exp block attention on CPU: forward + backward time and peak memory.

    python -m bench.bench_attention                      # writes bench/results/attention.json (~1-2 min)
    python -m bench.bench_attention --case --seq 8192 --impl fused --reps 2   # one case, prints a JSON line

One case is what a ring step does with one key/value block: `block_attention` (out, lse) then
`block_attention_backward` from that (out, lse), at B=1, N=2 heads, Dh=64, fp32, Lq = Lk = L. Each (L, impl) runs in
a fresh subprocess with one thread, so its peak RSS (VmHWM, the whole process: Python + torch + inputs + kernel) is
its own; time is the best of `reps` calls after a small warm-up, as process CPU time (user + system: one thread, so
this is the compute, and other processes on a shared machine barely move it) and as wall time. The parent compares the fused outputs and gradients
with the math ones (max abs difference) and reports the fused / math ratios.
Shape legend: B batch, N heads, L tokens, Dh head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import proc_status_bytes, write_result
from vidtron.kernels.lse_attention import block_attention, block_attention_backward

B, N, DH = 1, 2, 64
CASES = {4096: 2, 8192: 2, 16384: 1}  # L -> repetitions (the 16k math case materialises 2 GB score blocks)
MATH_16K_NEEDS = 12 << 30  # bytes of MemAvailable below which the 16k math case is skipped (it peaks near 8 GB)
KEYS = ("out", "lse", "dq", "dk", "dv")


def _inputs(seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, N, seq, DH, generator=g) for _ in range(4)]  # q, k, v, dout: [B, N, L, Dh]


def _step(q, k, v, dout, impl: str) -> dict:
    out, lse = block_attention(q, k, v, impl=impl)  # [B, N, L, Dh], [B, N, L]
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, impl=impl)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def run_case(seq: int, impl: str, reps: int, save: str | None) -> dict:
    """One (L, impl) case in this process: best time of `reps` forward + backward calls and the peak RSS."""
    torch.set_num_threads(1)
    _step(*_inputs(256), impl)  # warm-up: kernels, allocator
    q, k, v, dout = _inputs(seq)
    rss_base = proc_status_bytes("VmRSS")
    times, cpu_times = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        res = _step(q, k, v, dout, impl)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if save:
        torch.save({key: res[key] for key in KEYS}, save)
    peak = proc_status_bytes("VmHWM")
    result = dict(seq=seq, impl=impl, reps=reps, cpu_s=min(cpu_times), wall_s=min(times))
    return result | dict(peak_rss_mb=peak / 2**20, base_rss_mb=rss_base / 2**20)


def _spawn(seq: int, impl: str, reps: int, save: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_attention", "--case", "--seq", str(seq), "--impl", impl]
    cmd += ["--reps", str(reps), "--save", str(save)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _max_diff(a: Path, b: Path) -> float:
    x, y = torch.load(a), torch.load(b)
    diffs = []
    for key in KEYS:
        finite = torch.isfinite(y[key])
        diffs.append((x[key][finite] - y[key][finite]).abs().max().item())
    return max(diffs)


def _compare(seq: int, reps: int, tmp: Path) -> dict:
    fused = _spawn(seq, "fused", reps, tmp / f"fused_{seq}.pt")
    row = dict(seq=seq, fused=fused)
    if seq >= 16384 and _mem_available() < MATH_16K_NEEDS:
        row["math"] = None
        row["skipped"] = f"math case needs ~{MATH_16K_NEEDS >> 30} GiB available, have {_mem_available() >> 30} GiB"
        return row
    math = _spawn(seq, "math", reps, tmp / f"math_{seq}.pt")
    row["math"] = math
    row["time_ratio"] = fused["cpu_s"] / math["cpu_s"]  # process CPU time: steady when the machine is shared
    row["wall_ratio"] = fused["wall_s"] / math["wall_s"]
    row["peak_rss_ratio"] = fused["peak_rss_mb"] / math["peak_rss_mb"]
    extra_f, extra_m = (r["peak_rss_mb"] - r["base_rss_mb"] for r in (fused, math))
    row["extra_rss_ratio"] = extra_f / max(extra_m, 1e-9)  # the kernels' own memory, inputs and libraries excluded
    row["max_abs_diff"] = _max_diff(tmp / f"fused_{seq}.pt", tmp / f"math_{seq}.pt")
    return row


def run(out_dir=None) -> dict:
    """Every L in CASES, fused vs math; writes bench/results/attention.json and returns its payload."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq, reps in CASES.items():
            rows.append(_compare(seq, reps, Path(tmp)))
            print(_line(rows[-1]), flush=True)
    result = {
        "what": "block_attention + block_attention_backward (one ring step), fp32, one thread, fresh process per case",
        "shape": {"B": B, "N": N, "Dh": DH},
        "goal_at_8192": {"time_ratio": 0.3, "peak_rss_ratio": 0.2},
        "ratios": "fused / math; time_ratio on process CPU time, wall_ratio on wall time, peak_rss_ratio on VmHWM",
        "rows": rows,
    }
    write_result("attention", result, out_dir)
    return result


def _line(row: dict) -> str:
    f, m = row["fused"], row["math"]
    if m is None:
        return f"L={row['seq']}: fused {f['cpu_s']:.2f} s {f['peak_rss_mb']:.0f} MB; math skipped ({row['skipped']})"
    return (
        f"L={row['seq']}: fused {f['cpu_s']:.2f} s CPU ({f['wall_s']:.2f} s wall) {f['peak_rss_mb']:.0f} MB, "
        f"math {m['cpu_s']:.2f} s CPU ({m['wall_s']:.2f} s wall) {m['peak_rss_mb']:.0f} MB: "
        f"time x{row['time_ratio']:.3f} (wall x{row['wall_ratio']:.3f}), peak RSS x{row['peak_rss_ratio']:.3f}, "
        f"max abs diff {row['max_abs_diff']:.1e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="store_true", help="run one case in this process and print a JSON line")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--impl", choices=("fused", "math"), default="fused")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--save", default=None, help="save out, lse and grads here (torch.save)")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.seq, args.impl, args.reps, args.save)))
    else:
        run()


if __name__ == "__main__":
    main()
