"""Sampling time on one process vs two (TP 2, and Ulysses CP 2): dit-tiny with 4 heads, a few Euler steps, CFG on.

A 2-step training run gives the checkpoint; each layout loads it, runs one warm-up sampling call and then REPS timed
calls of `sample_latents` (model build, weight loading and text encoding are not timed). Every layout runs on
`run_ranks` gloo ranks with one thread each, so the ratio is what splitting the model over 2 CPU processes buys (or
costs in comm) at this size, not a GPU number. Run: python -m bench.bench_sample
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from tests.helpers import run_training
from vidtron.launch.data import main as data_main
from vidtron.launch.sample import clip_shape, latent_shape_for, load_for_sampling
from vidtron.models.text.encoders import build_text_encoder
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.checkpoint import latest_valid_checkpoint
from vidtron.platform.distributed import DistContext
from vidtron.recipes.dit_t2v.sampling import SampleOptions, sample_latents
from vidtron.testing.multirank import run_ranks

STEPS, REPS = 4, 3
CLIP = (17, 128, 128)  # frames, height, width in pixels: latent [C, 5, 16, 16], 320 video tokens
PROMPTS = ["a red circle moves left"]
LAYOUTS = {"1proc": (1, 1, 1, "ring"), "tp2": (2, 2, 1, "ring"), "ulysses2": (2, 1, 2, "ulysses")}


def _time_sampling(ckpt: Path, tp: int, cp: int, cp_mode: str) -> float:
    """Median seconds of one `sample_latents` call on this rank (the ranks run in lockstep)."""
    dims = ParallelDims(tp=tp, cp=cp, cp_mode=cp_mode)
    dims.build_mesh("cpu")
    model, cfg = load_for_sampling(ckpt, dims)
    dcfg, tcfg = model.config, cfg["text"]
    enc = build_text_encoder(tcfg, dcfg.text_dim, dcfg.pooled_dim)
    text, uncond = enc.encode(PROMPTS), enc.encode([""])
    shape, opts = latent_shape_for(dcfg, clip_shape(cfg, *CLIP)), SampleOptions(steps=STEPS, cfg_scale=5.0)
    times = []
    for _ in range(REPS + 1):
        t0 = time.perf_counter()
        sample_latents(model, text, uncond, shape, opts, dcfg.guidance_embeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def run(out_dir: str | Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data, run_dir = Path(tmp) / "data", Path(tmp) / "run"
        data_main(["synth", "--out", str(data), "--clips", "16", "--shard-size", "16"])
        run_training(data, run_dir, "trainer.steps=2", "model.num_heads=4", "model.head_dim=16")
        ckpt = latest_valid_checkpoint(run_dir, DistContext(0, 1, 0, torch.device("cpu")))
        result = {"flavor": "dit-tiny", "heads": 4, "head_dim": 16, "euler_steps": STEPS, "clip": list(CLIP)}
        for name, (world, tp, cp, mode) in LAYOUTS.items():
            result[f"{name}_s"] = run_ranks(_time_sampling, world, args=(ckpt, tp, cp, mode))[0]
    result["tp2_speedup"] = result["1proc_s"] / result["tp2_s"]
    result["ulysses2_speedup"] = result["1proc_s"] / result["ulysses2_s"]
    write_result("sample", result, out_dir)
    return result


if __name__ == "__main__":
    print(run())
