"""Small helpers for tests: build a TrainConfig from overrides and train in this process."""

from __future__ import annotations

import torch

from vidtron.parallel.deepspeed_zero import full_parameters, is_engine
from vidtron.platform.distributed import init_distributed
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.recipes.registry import compose_config


def run_training(data_root, run_dir, *overrides: str):
    """Train in this process (or on this rank); returns the TrainState (losses, model)."""
    cfg = compose_config([f"data.root={data_root}", f"run_dir={run_dir}", "metrics.wandb=false", *overrides])
    return train(cfg, DiTTextToVideo(cfg), init_distributed())


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter (DTensors and DeepSpeed ZeRO partitions gathered; collective)."""
    if is_engine(model):
        return full_parameters(model)
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out
