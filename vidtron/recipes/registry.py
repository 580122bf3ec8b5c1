"""The recipe registry: one line per built-in recipe, plus recipe folders found on VIDTRON_RECIPE_PATH.

A recipe is a package folder `<name>/` whose `recipe.py` defines `RECIPE = vidtron.platform.recipe.Recipe(...)`
(its config dataclass, yaml, task factory and pre-launch checks). To add one without touching vidtron, put the
folder anywhere and list its parent folder in VIDTRON_RECIPE_PATH (os.pathsep-separated); `vidtron-train
recipe=<name>` then finds it in every process it launches.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from vidtron.errors import ConfigError
from vidtron.platform import compose
from vidtron.platform.config import TrainConfig
from vidtron.platform.recipe import Recipe

BUILTIN = {
    "dit_t2v": "vidtron.recipes.dit_t2v.recipe",  # text-to-video DiT, flow matching
    "vae": "vidtron.recipes.vae.recipe",  # HunyuanVideo's causal 3D VAE with its GAN losses
    "dit_cfg_distill": "vidtron.recipes.dit_cfg_distill.recipe",  # guidance-embedded student of a CFG teacher
}
PATH_ENV = "VIDTRON_RECIPE_PATH"
DEFAULT = "dit_t2v"


def _external() -> dict[str, str]:
    """name -> module of the recipe folders under VIDTRON_RECIPE_PATH (their parents join sys.path)."""
    found = {}
    for root in filter(None, os.environ.get(PATH_ENV, "").split(os.pathsep)):
        folder = Path(root).resolve()
        for recipe_py in sorted(folder.glob("*/recipe.py")):
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            found[recipe_py.parent.name] = f"{recipe_py.parent.name}.recipe"
    return found


def recipe_modules() -> dict[str, str]:
    return {**BUILTIN, **_external()}


def get_recipe(name: str) -> Recipe:
    modules = recipe_modules()
    if name not in modules:
        fix = f"choose one of {sorted(modules)} (or add a recipe folder to {PATH_ENV})"
        raise ConfigError("recipe", name, fix)
    recipe = importlib.import_module(modules[name]).RECIPE
    if not isinstance(recipe, Recipe) or recipe.name != name:
        raise ConfigError("recipe", name, f"{modules[name]}.RECIPE must be a Recipe named {name!r}")
    return recipe


def recipe_of(overrides: list[str]) -> str:
    """The recipe an override list asks for (the last `recipe=` wins), else the default."""
    names = [o.partition("=")[2] for o in overrides if o.lstrip("+").partition("=")[0] == "recipe"]
    return names[-1] if names else DEFAULT


def compose_config(overrides: list[str]) -> TrainConfig:
    """The validated config of the recipe the overrides name, or a ConfigError with field, value and fix."""
    recipe = get_recipe(recipe_of(overrides))
    cfg = compose.compose_config(overrides, recipe.config, recipe.name, recipe.defaults)
    recipe.check_knobs(cfg)
    return cfg
