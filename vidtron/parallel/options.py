"""Options of a model's `parallelize_*` function beyond the layout itself (ParallelDims): ZeRO, precision, memory,
and which attention core the blocks run (dense, or SSTA block-sparse attention)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.errors import ConfigError
from vidtron.kernels.ssta import SSTAOptions
from vidtron.parallel.activation_memory import MemoryConfig

ATTENTIONS = ("dense", "ssta")


@dataclass
class ParallelizeOptions:
    zero_stage: int = 3  # 3: reshard params after forward; 2: keep them until backward; 1 acts like 2 with FSDP2
    zero_engine: str = "fsdp2"  # fsdp2: FSDP2 in parallelize_*; deepspeed: no FSDP, the trainer wraps the model
    param_dtype: str = "float32"  # FSDP2 mixed precision: dtype of the all-gathered params
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # activation recompute / offload policies
    compile: bool = False  # torch.compile each block after the memory policies, before FSDP
    inference: bool = False  # sampling: no FSDP (one data stream), no recompute / offload, eval mode
    attention: str = "dense"  # dense | ssta (block-sparse; alone, or as the inner core of Ulysses CP)
    ssta: SSTAOptions = field(default_factory=SSTAOptions)  # tile / window / top-k / lambda when attention=ssta

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError("attention", self.attention, f"choose one of {list(ATTENTIONS)}")

    def check_layout(self, dims, cp_mode_field: str = "parallel.cp_mode") -> None:
        """Refuse layouts the attention core cannot run under: SSTA needs every video token of its heads in one
        call, which Ulysses gives (after its all-to-all) and ring / USP do not."""
        if self.attention == "ssta" and dims.cp > 1 and dims.cp_mode != "ulysses":
            fix = (
                "SSTA runs alone or inside Ulysses only (ring / usp split the video keys over ranks, so no rank "
                f"sees whole tiles): use {cp_mode_field}=ulysses, or dense attention"
            )
            raise ConfigError(cp_mode_field, dims.cp_mode, fix)
