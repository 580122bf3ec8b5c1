"""Registration of recipe `vae` (vidtron/recipes/registry.py): schema, defaults, task, pre-launch checks."""

from __future__ import annotations

from pathlib import Path

import torch

from vidtron.parallel.dims import ParallelDims
from vidtron.platform.data.shards import list_shards
from vidtron.platform.recipe import Recipe
from vidtron.recipes.vae.config import VAETrainConfig


def preflight(cfg: VAETrainConfig, dims: ParallelDims) -> None:
    from vidtron.recipes.vae.task import validate_layout

    list_shards(cfg.data.root)
    validate_layout(dims)
    if cfg.vae.init_from:
        from vidtron.models.vae import FLAVORS, CausalVAE
        from vidtron.platform.init_from import check_init_from

        with torch.device("meta"):
            check_init_from(CausalVAE(FLAVORS[cfg.vae.flavor]), cfg.vae.init_from, kind="vae")


def make_task(cfg: VAETrainConfig):
    from vidtron.recipes.vae.task import VAETask

    return VAETask(cfg.vae, cfg.data, cfg.optim, cfg.seed)


RECIPE = Recipe(
    name="vae",
    config=VAETrainConfig,
    defaults=Path(__file__).with_name("vae.yaml"),
    make_task=make_task,
    preflight=preflight,
    refuses={
        "parallel.zero.engine": "it trains two optimizers (VAE and discriminator), which the deepspeed engine does "
        "not; use parallel.zero.engine=fsdp2 (ZeRO-2/3 via parallel.zero.stage)",
        "memory.recompute": "activation recompute is a DiT block policy",
        "memory.offload_blocks": "activation offload is a DiT block policy",
        "data.format": "it reads the generated clips of data.root into memory",
    },
)
