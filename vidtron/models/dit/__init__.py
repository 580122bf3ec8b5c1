"""HunyuanVideo-compatible DiT: `DiT(config)`, its `DiTConfig` and the named flavors."""

from vidtron.models.dit.configs import FLAVORS, DiTConfig
from vidtron.models.dit.model import DiT

__all__ = ["DiT", "DiTConfig", "FLAVORS"]
