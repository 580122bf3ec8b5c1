"""Peak memory of a streaming export vs the size of the model it exports (dit-small, ~0.47B params, ~1.9 GB fp32).

A randomly initialised dit-small is saved as a DCP checkpoint (in a child process, so its memory is not
counted); then each format is exported (--max-shard-size 200MB; hunyuan also 50MB) in a fresh child process
that reports its peak resident memory (VmHWM from /proc/self/status, reset after the imports when the kernel
allows it) above its baseline (RSS after the imports, including torch's lazily imported meta kernels, which the
export's planning uses). The claim under test: the export's peak follows the shard size, not the model size.
Run: python -m bench.bench_export
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.common import proc_status_bytes, reset_peak_rss, write_result

FLAVOR = "dit-small"
RUNS = (("safetensors", "200MB"), ("diffusers", "200MB"), ("hunyuan", "200MB"), ("hunyuan", "50MB"))  # format, shard


def save_random_checkpoint(run_dir: str, flavor: str = FLAVOR, seed: int = 0) -> str:
    """A committed checkpoint (manifest + DCP) of a randomly initialised DiT of `flavor`; returns its folder."""
    import torch

    from vidtron.models.dit import DiT
    from vidtron.models.dit.configs import FLAVORS
    from vidtron.platform.checkpoint import save_checkpoint
    from vidtron.platform.distributed import DistContext

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DiT(FLAVORS[flavor])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    meta = {"config": {"model": {"flavor": flavor}}}
    return str(save_checkpoint(run_dir, 1, model, [], meta, DistContext(0, 1, 0, torch.device("cpu"))))


def export_in_child(ckpt: str, fmt: str, max_shard: str, out: str) -> dict:
    """Runs in a fresh process: export, and report the peak RSS above the post-import baseline."""
    import torch

    from vidtron.launch.export import checkpoint_config
    from vidtron.platform.export import export_checkpoint, parse_size

    torch.set_num_threads(1)
    torch.cat([torch.empty(1, device="meta")] * 2)  # lazily imports the meta kernels (~150 MB): baseline, not export
    reset = reset_peak_rss()
    baseline = proc_status_bytes("VmRSS")
    report = export_checkpoint(Path(ckpt), fmt, Path(out), checkpoint_config(Path(ckpt)), parse_size(max_shard))
    peak = proc_status_bytes("VmHWM")
    return {
        "format": fmt,
        "max_shard_size": max_shard,
        "files": len(report.files),
        "total_bytes": report.total_bytes,
        "largest_shard_bytes": report.largest_shard_bytes,
        "peak_held_tensor_bytes": report.peak_held_bytes,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_reset_after_imports": reset,
        "export_rss_bytes": peak - baseline,
        "export_rss_over_model": (peak - baseline) / report.total_bytes,
        "export_rss_over_largest_shard": (peak - baseline) / report.largest_shard_bytes,
    }


def _child(fn, *args):
    """fn(*args) in a fresh spawned process (its own peak RSS), one thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(out_dir: str | Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _child(save_random_checkpoint, str(Path(tmp) / "run"))
        exports = [_child(export_in_child, ckpt, fmt, shard, str(Path(tmp) / f"{fmt}-{shard}")) for fmt, shard in RUNS]
    result = {
        "flavor": FLAVOR,
        "model_bytes": exports[0]["total_bytes"],
        "exports": exports,
        "worst_export_rss_over_model": max(e["export_rss_over_model"] for e in exports),
        "worst_export_rss_over_largest_shard": max(e["export_rss_over_largest_shard"] for e in exports),
    }
    write_result("export", result, out_dir)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
