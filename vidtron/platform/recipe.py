"""What a recipe registers (vidtron/recipes/registry.py): its schema, defaults, task and pre-launch checks.

A recipe is one folder: a config dataclass (a subclass of TrainConfig: the schema of its Hydra group), a yaml of
defaults (Hydra package `_global_`), a task (vidtron/platform/task.py) and a `recipe.py` that defines
`RECIPE = Recipe(...)`. The platform never imports a recipe; launchers get them from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from vidtron.errors import ConfigError
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str  # `recipe=<name>` on the command line
    config: type[TrainConfig]  # the schema: TrainConfig plus the recipe's own sections
    defaults: Path  # the recipe's yaml: overrides of the schema's defaults
    make_task: Callable[[TrainConfig], object]  # cfg -> the task every rank trains (vidtron/platform/task.py)
    preflight: Callable[[TrainConfig, ParallelDims], None] | None = None  # geometry / layout checks, before launch
    refuses: dict[str, str] = field(default_factory=dict)  # config key -> why: knobs this recipe does not honour

    def check_knobs(self, cfg: TrainConfig) -> None:
        """Refuse, with one clear error, any knob this recipe does not honour that is set away from its default."""
        given, default = OmegaConf.structured(cfg), OmegaConf.structured(self.config)
        for key, why in self.refuses.items():
            value = OmegaConf.select(given, key)
            if value != OmegaConf.select(default, key):
                raise ConfigError(key, value, f"recipe={self.name} does not honour it ({why}); leave it at its default")
