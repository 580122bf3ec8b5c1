"""Compose a typed config from Hydra overrides (`key=value` strings), with one-line errors.

The recipe's schema (a TrainConfig subclass) and its yaml of defaults are registered in Hydra's ConfigStore (the
schema as `train_schema`, the yaml as option `<recipe>` of the `recipe` group, package `_global_`);
`vidtron/platform/conf/train.yaml` puts them together with a launcher (`launcher=local|torchrun|slurm|ray`).
Which recipe: vidtron/recipes/registry.py (its `compose_config` is what commands call).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vidtron.errors import ConfigError
from vidtron.platform.config import TrainConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _register(schema: type, recipe: str, defaults: Path) -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=schema)
    store.store(group="recipe", name=recipe, node=OmegaConf.load(defaults), package="_global_")


def compose_config(
    overrides: list[str], schema: type = TrainConfig, recipe: str = "", defaults: Path | None = None
) -> TrainConfig:
    """Return the validated `schema` instance for these overrides (the recipe's yaml `defaults` applied first), or
    raise ConfigError with field, value and fix."""
    if defaults is None:
        raise ConfigError("recipe", recipe, "compose through vidtron.recipes.registry.compose_config")
    _register(schema, recipe, Path(defaults))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="train", overrides=list(overrides))
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # Hydra / OmegaConf errors -> one line naming the field
        raise _explain(err, overrides) from err
    finally:
        GlobalHydra.instance().clear()


def _explain(err: Exception, overrides: list[str]) -> ConfigError:
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for e in chain:
        if isinstance(e, ConfigError):
            return e
    text = "\n".join(str(e) for e in chain)
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        return ConfigError(group, value, f"choose one of {_group_options(group)}")
    full_key = re.search(r"full_key: (\S+)", text)
    if full_key:
        key = full_key.group(1)
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith(" ") and "$" not in ln]
        first = next((ln for ln in lines if re.match(r"(Value|Key) '", ln)), lines[0])
        if "not in" in first:
            return ConfigError(key, _override_value(overrides, key), f"unknown key ({first}); check the spelling")
        return ConfigError(key, _override_value(overrides, key), f"{first}; give a value of the field's type")
    return ConfigError("overrides", " ".join(overrides), str(err).splitlines()[0] if str(err) else type(err).__name__)


def _override_value(overrides: list[str], key: str) -> str:
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return "?"


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
