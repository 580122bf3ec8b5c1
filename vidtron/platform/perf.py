"""Throughput figures of a step: MFU from the task's analytic FLOPs, and peak memory (CUDA, else host RSS).

MFU = model FLOPs of the step (forward + backward of the global batch, from the task's `flops_per_sample`) /
(step time x ranks x peak FLOP/s per rank). The peak comes from trainer.peak_tflops, else from PEAK_TFLOPS by the CUDA
device name (dense bf16; fp32 runs use the TF32 figure); without either (CPU) no MFU is logged.
"""

from __future__ import annotations

import resource

import torch

# dense TFLOP/s per GPU: (bf16, tf32) by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0)}


def peak_tflops(configured: float, bf16: bool) -> float:
    """Per-rank peak: the configured one, else the device table's; 0 when unknown (CPU)."""
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, (b16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return b16 if bf16 else tf32
    return 0.0


def mfu(step_flops: float, step_time_s: float, world: int, peak: float) -> float | None:
    if peak <= 0 or step_time_s <= 0 or step_flops <= 0:
        return None
    return step_flops / (step_time_s * world * peak * 1e12)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """{"peak_mem_gib": ...}: CUDA max allocated on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
