"""Causal VAE encode / decode: time, throughput and peak memory, tiled vs untiled, at growing clip sizes (vae-tiny).

Each (size, path) runs in a fresh subprocess with one thread, so one measurement's allocations never hide
another's. Peak memory is the process's peak resident set (/proc/self/status VmHWM) during the call minus the
resident set just before it; the peak is reset before each call (writing 5 to /proc/self/clear_refs). Tiling:
64x64-pixel tiles of 17 frames with overlap 0.25 (the released model's 256 px / 17 frames, scaled to these sizes);
at 17x64x64 the whole clip is one tile, so tiled = untiled plus bookkeeping.
Time is not monotonic in size on CPU: torch picks, per conv shape, either oneDNN or `slow_conv3d` (im2col, far
more memory); e.g. the largest convs of 33x128x128 go to oneDNN and those of 17x128x128 do not, so the longer
clip encodes as fast with less memory. Small tiles always take the im2col path.
Run: python -m bench.bench_vae [out_dir]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import proc_status_bytes, reset_peak_rss, write_result

SIZES = ((17, 64, 64), (17, 128, 128), (33, 128, 128), (33, 256, 256))  # frames, height, width
TILING = {"tile_size": 64, "tile_frames": 17, "overlap": 0.25}
FLAVOR = "vae-tiny"
REPO = Path(__file__).resolve().parent.parent


def _measured(fn):
    """(result, seconds, peak MiB above the resident set before the call, whether the peak was reset)."""
    reset = reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (proc_status_bytes("VmHWM") - before) / 2**20, reset


def child(frames: int, height: int, width: int, tiled: bool) -> dict:
    """One measurement (runs in its own process): encode then decode one clip, no grad."""
    import torch

    from vidtron.models.vae import FLAVORS, CausalVAE
    from vidtron.models.vae.tiling import tiled_decode, tiled_encode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = CausalVAE(FLAVORS[FLAVOR]).eval()
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        vae.decode(vae.encode(video[:, :, :1, :16, :16])[0])  # warm-up: first-call allocations
        enc = (lambda: tiled_encode(vae, video, **TILING)) if tiled else (lambda: vae.encode(video))
        (mean, _), enc_s, enc_mib, reset = _measured(enc)
        dec = (lambda: tiled_decode(vae, mean, **TILING)) if tiled else (lambda: vae.decode(mean))
        _, dec_s, dec_mib, _ = _measured(dec)
    return {
        "encode_s": enc_s,
        "decode_s": dec_s,
        "encode_frames_per_s": frames / enc_s,
        "decode_frames_per_s": frames / dec_s,
        "encode_peak_mib": enc_mib,
        "decode_peak_mib": dec_mib,
        "input_mib": video.numel() * 4 / 2**20,
        "peak_reset": reset,
    }


def _run_child(frames: int, height: int, width: int, tiled: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_vae", "--child", str(frames), str(height), str(width), str(int(tiled))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(out_dir: str | Path | None = None) -> dict:
    rows = []
    for frames, height, width in SIZES:
        row = {"size": f"{frames}x{height}x{width}"}
        for tiled in (False, True):
            row["tiled" if tiled else "untiled"] = _run_child(frames, height, width, tiled)
        u, t = row["untiled"], row["tiled"]
        row["tiled_over_untiled"] = {
            "time": (t["encode_s"] + t["decode_s"]) / (u["encode_s"] + u["decode_s"]),
            "peak_memory": max(t["encode_peak_mib"], t["decode_peak_mib"])
            / max(u["encode_peak_mib"], u["decode_peak_mib"]),
        }
        print(_summary(row), flush=True)
        rows.append(row)
    result = {"flavor": FLAVOR, "threads": 1, "tiling": TILING, "sizes": rows}
    write_result("vae", result, out_dir)
    return result


def _summary(row: dict) -> str:
    parts = [row["size"]]
    for mode in ("untiled", "tiled"):
        m = row[mode]
        parts.append(
            f"{mode}: enc {m['encode_s']:.2f} s / {m['encode_peak_mib']:.0f} MiB, "
            f"dec {m['decode_s']:.2f} s / {m['decode_peak_mib']:.0f} MiB"
        )
    return "  ".join(parts)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        f, h, w, tiled = (int(v) for v in sys.argv[2:6])
        print(json.dumps(child(f, h, w, bool(tiled))))
    else:
        print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else None), indent=1))
