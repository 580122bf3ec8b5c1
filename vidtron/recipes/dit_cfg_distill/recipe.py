"""Registration of recipe `dit_cfg_distill` (vidtron/recipes/registry.py): schema, defaults, task, pre-launch checks."""

from __future__ import annotations

from pathlib import Path

from vidtron.parallel.dims import ParallelDims
from vidtron.platform.recipe import Recipe
from vidtron.recipes.dit_cfg_distill.config import DiTCFGDistillConfig
from vidtron.recipes.dit_cfg_distill.teacher import check_teacher
from vidtron.recipes.dit_t2v.recipe import preflight as dit_t2v_preflight


def preflight(cfg: DiTCFGDistillConfig, dims: ParallelDims) -> None:
    """dit_t2v's checks (shards, layout vs heads / MLP / tokens, model.init_from), then the teacher's: the weights
    exist, fit the teacher and share the student's shapes (from file headers / DCP metadata only)."""
    dit_t2v_preflight(cfg, dims)
    check_teacher(cfg)


def make_task(cfg: DiTCFGDistillConfig):
    from vidtron.recipes.dit_cfg_distill.task import DiTCFGDistill

    return DiTCFGDistill(cfg)


RECIPE = Recipe(
    name="dit_cfg_distill",
    config=DiTCFGDistillConfig,
    defaults=Path(__file__).with_name("dit_cfg_distill.yaml"),
    make_task=make_task,
    preflight=preflight,
)
