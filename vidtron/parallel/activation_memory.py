"""MemoryConfig: the activation-memory policy (recompute, offload) a model's parallelize_* applies to its blocks.

The mechanisms are recompute.py and offload.py; which modules form a block and a region is the model's own
(e.g. vidtron/models/dit/sharding.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from vidtron.errors import ConfigError


@dataclass
class MemoryConfig:
    """Activation memory policies of the DiT blocks (vidtron/parallel/recompute.py, offload.py). Block specs: all,
    double, single, none / "", or indices and ranges over [dual-stream; single-stream] blocks joined by "," or "+"
    (Hydra overrides need quotes around commas), e.g. "0-3+7"."""

    recompute: str = "none"  # none | selective (one region per block, see `selective`) | full (whole blocks)
    selective: str = "attn"  # recompute=selective: attn (q/k/v projections + attention core) | mlp (dual-stream MLPs)
    recompute_blocks: str = "all"  # which blocks recompute applies to
    offload_blocks: str = ""  # blocks whose saved activations go to host memory between forward and backward

    def __post_init__(self) -> None:
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError("memory.recompute", self.recompute, "choose none, selective or full")
        if self.selective not in ("attn", "mlp"):
            raise ConfigError("memory.selective", self.selective, "choose attn or mlp")
        for name in ("recompute_blocks", "offload_blocks"):
            self._check_spec(name, str(getattr(self, name)))

    @staticmethod
    def _check_spec(name: str, value: str) -> None:
        for part in value.replace("+", ",").replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            ok = part in ("", "all", "double", "single", "none") or (lo.isdigit() and (hi.isdigit() or not dash))
            if not ok:
                fix = "use all, double, single, none, or ranges such as 0-3+7 (or quoted: '0-3,7')"
                raise ConfigError(f"memory.{name}", value, fix)
