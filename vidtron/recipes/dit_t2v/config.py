"""DiTTrainConfig: the schema of `vidtron-train recipe=dit_t2v` (the run's sections plus model, text and flow)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.platform.config import FlowConfig, ModelConfig, TextConfig, TrainConfig


@dataclass
class DiTTrainConfig(TrainConfig):
    """A DiT trained with flow matching on latents of captioned clips."""

    model: ModelConfig = field(default_factory=ModelConfig)  # DiT flavor, size overrides, init_from
    text: TextConfig = field(default_factory=TextConfig)  # caption encoder
    flow: FlowConfig = field(default_factory=FlowConfig)  # training times, guidance-scale draws
