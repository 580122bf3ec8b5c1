"""Data throughput vs what the trainer consumes (CPU, one process, one thread).

On generated mp4 clips (9 or 17 frames, 64x64 or 48x80) in duration x aspect buckets:
- decode: the CPU (PyAV) decoder's clips/s, frames/s and DiT tokens/s of the decoded clips (resize + crop to
  each bucket included), and the same plus the stand-in autoencoder (what data.format=video pays per step);
- latent: reading the cached latent shards of `vidtron-data encode` (what data.format=latent pays);
- train: dit-tiny optimizer steps on the latent shards through the trainer, samples/s and tokens/s.
`decode_headroom` = decode clips/s / trainer samples/s: above 1, one decoding core keeps one trainer fed.
Run: python -m bench.bench_data
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from vidtron.launch.data import main as data_main
from vidtron.platform.config import BucketConfig, DataConfig
from vidtron.platform.data.latents import load_latent_sample, to_model_input
from vidtron.platform.data.loader import BucketLoader
from vidtron.platform.distributed import init_distributed
from vidtron.platform.metrics import read_metrics
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.stream import build_latent_encoder
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.recipes.registry import compose_config

BUCKETS = [(17, 64, 64, 4), (9, 64, 64, 8), (9, 48, 80, 8)]
CLIPS, TRAIN_STEPS = 96, 30


def _data_cfg(root: Path, fmt: str) -> DataConfig:
    return DataConfig(root=str(root), format=fmt, buckets=[BucketConfig(*b) for b in BUCKETS])


def _time_epoch(loader: BucketLoader, load, repeats: int = 3) -> dict:
    """Run `load(local_batch)` over one epoch (best of `repeats`); clips, frames and DiT tokens per second."""
    clips = frames = tokens = 0
    for cursor in range(loader.plan.batches_per_epoch):
        lb = loader.local_batch(cursor, 0, 1)
        n = len(lb.items)
        clips, frames, tokens = clips + n, frames + n * lb.bucket.frames, tokens + n * lb.bucket.tokens()
    times = []
    for _ in range(repeats):  # the machine is shared: the best pass is the least disturbed one
        t0 = time.perf_counter()
        for cursor in range(loader.plan.batches_per_epoch):
            load(loader.local_batch(cursor, 0, 1))
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"clips_per_s": clips / dt, "frames_per_s": frames / dt, "tokens_per_s": tokens / dt, "clips": clips}


def _bench_decode(root: Path) -> tuple[dict, dict]:
    loader = BucketLoader(_data_cfg(root, "video"), seed=0)
    decode = _time_epoch(loader, loader.pixels)
    encoder = build_latent_encoder(root)
    with_ae = _time_epoch(loader, lambda lb: encoder(to_model_input(loader.pixels(lb))))
    return decode, with_ae


def _bench_train(latents: Path, run_dir: Path) -> dict:
    spec = ",".join(f"{{frames:{f},height:{h},width:{w},max_batch:{b}}}" for f, h, w, b in BUCKETS)
    cfg = compose_config(
        [
            f"data.root={latents}",
            f"run_dir={run_dir}",
            "data.format=latent",
            f"data.buckets=[{spec}]",
            f"trainer.steps={TRAIN_STEPS}",
            "metrics.wandb=false",
            "trainer.progress=false",
        ]
    )
    train(cfg, DiTTextToVideo(cfg), init_distributed())
    records = read_metrics(run_dir)[5:]  # past warm-up
    dt = sum(r["step_time_s"] for r in records)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in records)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in records)
    step_med = statistics.median(r["step_time_s"] for r in records)
    return {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "step_s_median": step_med}


def run(out_dir: str | Path | None = None) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, latents = Path(tmp) / "clips", Path(tmp) / "latents"
        args = ["synth", "--out", str(root), "--clips", str(CLIPS), "--format", "mp4", "--shard-size", "32"]
        data_main([*args, "--durations", "9,17", "--sizes", "64x64,48x80"])
        decode, with_ae = _bench_decode(root)
        shapes = ",".join(f"{f}x{h}x{w}" for f, h, w, _ in BUCKETS)
        t0 = time.perf_counter()
        data_main(["encode", "--root", str(root), "--out", str(latents), "--buckets", shapes])
        encode_s = time.perf_counter() - t0
        loader = BucketLoader(_data_cfg(latents, "latent"), seed=0)
        latent = _time_epoch(loader, lambda lb: loader.read_latents(lb, load_latent_sample))
        trainer = _bench_train(latents, Path(tmp) / "run")
    result = {
        "clips": CLIPS,
        "buckets": [f"{f}x{h}x{w}:{b}" for f, h, w, b in BUCKETS],
        "decode_cpu": decode,
        "decode_cpu_plus_autoencoder": with_ae,
        "encode_command_clips_per_s": CLIPS / encode_s,
        "latent_read": latent,
        "trainer_dit_tiny": trainer,
        "decode_headroom": decode["clips_per_s"] / trainer["samples_per_s"],
        "decode_plus_ae_headroom": with_ae["clips_per_s"] / trainer["samples_per_s"],
    }
    write_result("data", result, out_dir)
    return result


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else None))
