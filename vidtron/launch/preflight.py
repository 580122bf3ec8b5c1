"""The checks every launcher runs once, in the launching process, before any process group starts."""

from __future__ import annotations

from vidtron.errors import ConfigError
from vidtron.platform.config import TrainConfig
from vidtron.platform.faults import check_ranks
from vidtron.platform.trainer import build_dims
from vidtron.recipes.registry import get_recipe


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Layout valid for `world_size` processes and for the recipe (its own checks: data present, geometry, heads),
    fault drills aimed at existing ranks, the global batch split evenly over the data-parallel ranks."""
    recipe = get_recipe(cfg.recipe)
    dims = build_dims(cfg.parallel, world_size)
    if recipe.preflight is not None:
        recipe.preflight(cfg, dims)
    check_ranks(cfg.faults, world_size)
    parts = dims.dp * cfg.trainer.grad_accum
    if cfg.data.batch_size % parts:
        fix = f"must be divisible by the data-parallel size {dims.dp} x trainer.grad_accum {cfg.trainer.grad_accum}"
        raise ConfigError("data.batch_size", cfg.data.batch_size, fix)
