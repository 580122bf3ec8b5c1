"""Registration of recipe `dit_t2v` (vidtron/recipes/registry.py): schema, defaults, task, pre-launch checks."""

from __future__ import annotations

from pathlib import Path

import torch

from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.data.shards import list_shards
from vidtron.platform.init_from import check_init_from
from vidtron.platform.recipe import Recipe
from vidtron.recipes.dit_t2v.config import DiTTrainConfig


def preflight(cfg: DiTTrainConfig, dims: ParallelDims) -> None:
    """Shards in data.root; the layout must split this DiT's heads and MLP and this clip's tokens (pixel -> latent
    -> token)."""
    list_shards(cfg.data.root)
    dit = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
    tokens = dit.video_tokens(cfg.data.frames, cfg.data.height, cfg.data.width)
    dims.validate_for(dit.num_heads, tokens, dit.mlp_hidden)
    if cfg.model.init_from:  # names, shapes and layout from the file headers only, before any process starts
        with torch.device("meta"):
            check_init_from(DiT(dit), cfg.model.init_from, kind="dit")


def make_task(cfg: DiTTrainConfig):
    from vidtron.recipes.dit_t2v.task import DiTTextToVideo

    return DiTTextToVideo(cfg)


RECIPE = Recipe(
    name="dit_t2v",
    config=DiTTrainConfig,
    defaults=Path(__file__).with_name("dit_t2v.yaml"),
    make_task=make_task,
    preflight=preflight,
)
