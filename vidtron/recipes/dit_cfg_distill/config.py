"""DiTCFGDistillConfig: the schema of `vidtron-train recipe=dit_cfg_distill` (dit_t2v's sections plus `distill`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.errors import ConfigError
from vidtron.recipes.dit_t2v.config import DiTTrainConfig


@dataclass
class DistillConfig:
    """The frozen teacher and the guidance scales the student learns to reproduce."""

    teacher_from: str = ""  # required: the teacher, a checkpoint step_N folder or weights model.init_from reads
    teacher_flavor: str = ""  # "" = the student's shape (model.flavor + overrides) without the guidance embedding
    guidance_min: float = 1.0  # CFG scale g drawn per sample, uniformly from [guidance_min, guidance_max]
    guidance_max: float = 8.0  # upper end of that range (the paper trains on [1, 8])

    def __post_init__(self):
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            fix = "need 1 <= guidance_min <= guidance_max (the paper draws g from [1, 8])"
            raise ConfigError("distill.guidance_min", self.guidance_min, fix)


@dataclass
class DiTCFGDistillConfig(DiTTrainConfig):
    """A guidance-embedded DiT student trained to match a frozen teacher's classifier-free-guided velocity."""

    distill: DistillConfig = field(default_factory=DistillConfig)  # teacher and guidance-scale draws
