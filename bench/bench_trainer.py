"""Trainer overhead vs a bare PyTorch loop on the same model, data and optimizer (dit-tiny, one process).

Both loops run the same number of steps, alternated twice in one process so machine noise hits both;
the ratio of median step times is the trainer's overhead (batch assembly, metrics, LR schedule, clipping).
Run: python -m bench.bench_trainer
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
from vidtron.platform.distributed import init_distributed
from vidtron.platform.metrics import read_metrics
from vidtron.platform.trainer import build_optimizer, train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.recipes.registry import compose_config

STEPS = 60


def _bare_loop(task: DiTTextToVideo, steps: int) -> list[float]:
    """forward + loss + backward + AdamW on pre-built batches: nothing else."""
    model = task.materialize(task.build_model(), torch.device("cpu"))  # build_model gives meta tensors
    opt = build_optimizer(model, task.cfg.optim)
    batches = [task.local_batch(s, (s - 1) * task.cfg.data.batch_size, 0, 1) for s in range(1, steps + 1)]
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        task.loss(model, batch, torch.device("cpu")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def run(out_dir: str | Path | None = None) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data_main(["synth", "--out", str(data), "--clips", "64"])
        trainer_times, bare_times = [], []
        for rep in range(2):
            run_dir = Path(tmp) / f"run{rep}"
            cfg = compose_config(
                [
                    f"data.root={data}",
                    f"run_dir={run_dir}",
                    f"trainer.steps={STEPS}",
                    "metrics.wandb=false",
                    "trainer.progress=false",
                ]
            )
            task = DiTTextToVideo(cfg)
            train(cfg, task, init_distributed())
            trainer_times += [r["step_time_s"] for r in read_metrics(run_dir)][5:]
            bare_times += _bare_loop(task, STEPS)[5:]
    trainer_med, bare_med = statistics.median(trainer_times), statistics.median(bare_times)
    batch = cfg.data.batch_size
    result = {
        "flavor": cfg.model.flavor,
        "batch": batch,
        "tokens_per_sample": task.tokens_per_sample,
        "trainer_step_s_median": trainer_med,
        "bare_step_s_median": bare_med,
        "overhead_ratio": trainer_med / bare_med,
        "trainer_samples_per_s": batch / trainer_med,
        "bare_samples_per_s": batch / bare_med,
    }
    result["prefetch"] = prefetch_effect()
    write_result("trainer_overhead", result, out_dir)
    return result


def prefetch_effect(steps: int = 30) -> dict:
    """Decoded-video data (data.format=video: mp4 decode + stand-in encode + text per step) with the prefetch thread
    off and on, alternated twice: median step time and median data wait per step."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mp4"
        data_main(["synth", "--out", str(data), "--format", "mp4", "--clips", "64", "--durations", "9"])
        runs = {0: ([], []), 2: ([], [])}
        for rep in range(2):
            for depth, (times, waits) in runs.items():
                run_dir = Path(tmp) / f"p{depth}_{rep}"
                args = [f"data.root={data}", f"run_dir={run_dir}", f"trainer.steps={steps}", "data.format=video"]
                cfg = compose_config([*args, f"trainer.prefetch={depth}", "metrics.wandb=false"])
                train(cfg, DiTTextToVideo(cfg), init_distributed())
                records = read_metrics(run_dir)[3:]
                times += [r["step_time_s"] for r in records]
                waits += [r["data_wait_s"] for r in records]
        for depth, (times, waits) in runs.items():
            out[f"prefetch_{depth}"] = {
                "step_s_median": statistics.median(times),
                "data_wait_s_median": statistics.median(waits),
            }
    out["step_time_ratio_on_over_off"] = out["prefetch_2"]["step_s_median"] / out["prefetch_0"]["step_s_median"]
    return out


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else None))
