"""Typed configs for `vidtron-train`, composed by Hydra from `vidtron/recipes/conf` plus CLI overrides.

Each component owns a dataclass with one comment per field and validation in `__post_init__`; bad values
raise ConfigError(field, value, fix) before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.platform.errors import ConfigError

RECIPES = ("dit_t2v",)


@dataclass
class ModelConfig:
    flavor: str = "dit-tiny"  # a name from vidtron.models.dit.configs.FLAVORS
    init_from: str = ""  # optional diffusers-layout safetensors file (or folder) to start from
    num_heads: int = 0  # 0 = the flavor's; otherwise overrides it (width = num_heads * head_dim)
    head_dim: int = 0  # 0 = the flavor's
    num_double_blocks: int = -1  # -1 = the flavor's
    num_single_blocks: int = -1  # -1 = the flavor's

    def arch_overrides(self) -> dict:
        """The DiTConfig fields this config overrides (used by scaling sweeps to build model families)."""
        fields = {"num_heads": self.num_heads, "head_dim": self.head_dim}
        out = {k: v for k, v in fields.items() if v > 0}
        out |= {
            k: v
            for k, v in (("num_double_blocks", self.num_double_blocks), ("num_single_blocks", self.num_single_blocks))
            if v >= 0
        }
        return out


@dataclass
class TextConfig:
    encoder: str = "byte"  # byte: built-in byte-token transformer (no downloads); hf: local LLM + CLIP paths
    max_tokens: int = 32  # text tokens per caption (padded / truncated)
    llm_path: str = ""  # local path of an LLM for encoder=hf
    clip_path: str = ""  # local path of a CLIP text model for encoder=hf

    def __post_init__(self) -> None:
        if self.encoder not in ("byte", "hf"):
            raise ConfigError("text.encoder", self.encoder, "choose 'byte' (built-in) or 'hf' (local paths)")
        if self.max_tokens < 1:
            raise ConfigError("text.max_tokens", self.max_tokens, "must be >= 1")


def check_clip_shape(frames: int, height: int, width: int, names: tuple[str, str, str]) -> None:
    """Pixel clips must be 4k+1 frames (VAE 4x in time after the first frame) and 16-divisible (VAE 8x, patch 2)."""
    if frames < 1 or (frames - 1) % 4:
        near = 4 * ((max(frames, 1) - 1) // 4) + 1
        raise ConfigError(names[0], frames, f"must be 4k+1 (e.g. {near} or {near + 4})")
    for name, value in zip(names[1:], (height, width)):
        if value < 16 or value % 16:
            raise ConfigError(name, value, f"must be a positive multiple of 16 (e.g. {max(16, value // 16 * 16)})")


@dataclass
class DataConfig:
    root: str = ""  # folder with webdataset shards (*.tar) written by `vidtron-data synth`
    frames: int = 9  # pixel frames per clip: 4k+1 (the VAE compresses time 4x after the first frame)
    height: int = 64  # pixels, divisible by 16 (VAE 8x times patch 2)
    width: int = 64  # pixels, divisible by 16
    batch_size: int = 4  # global batch: samples per step over all data-parallel ranks
    caption_dropout: float = 0.1  # probability of an empty caption (trains the unconditional branch for CFG)

    def __post_init__(self) -> None:
        check_clip_shape(self.frames, self.height, self.width, ("data.frames", "data.height", "data.width"))
        if self.batch_size < 1:
            raise ConfigError("data.batch_size", self.batch_size, "must be >= 1")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError("data.caption_dropout", self.caption_dropout, "must be in [0, 1)")


@dataclass
class FlowConfig:
    logit_mean: float = 0.0  # t = sigmoid(u), u ~ N(logit_mean, logit_std): logit-normal training times
    logit_std: float = 1.0
    guidance_min: float = 1.0  # guidance scale drawn from [min, max] when the flavor has a guidance embedding
    guidance_max: float = 8.0


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup from 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr", self.lr, "must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class TrainerConfig:
    steps: int = 200  # optimizer steps to run in total (a resumed run continues up to this)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # committed checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir/checkpoints; never; or a checkpoint path
    stop_after_steps: int = 0  # stop (with a checkpoint) after this many steps in this process; 0 = run to the end
    log_every: int = 1  # steps between metric records
    bf16: bool = False  # bf16 autocast for the model forward
    progress: bool = True  # a progress bar on rank 0 when stdout is a terminal

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("trainer.steps", self.steps, "must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError("trainer.checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = only at the end)")


@dataclass
class ZeroConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    stage: int = 3  # ZeRO stage: 3 shards params+grads+optimizer state; 2 keeps params after forward

    def __post_init__(self) -> None:
        if self.engine not in ("fsdp2", "deepspeed"):
            raise ConfigError("parallel.zero.engine", self.engine, "choose 'fsdp2' or 'deepspeed'")
        if self.stage not in (1, 2, 3):
            raise ConfigError("parallel.zero.stage", self.stage, "choose 1, 2 or 3")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel degree (SP rides on it)
    cp: int = 1  # context parallel degree
    cp_mode: str = "ring"  # ring | ulysses | usp
    ulysses: int = 0  # Ulysses degree inside usp (0 = derived)
    dp_shard: int = -1  # ZeRO-sharded data-parallel degree; -1 = whatever the world size leaves
    dp_replicate: int = 1  # replicated data-parallel degree (HSDP outer dim)
    zero: ZeroConfig = field(default_factory=ZeroConfig)


@dataclass
class LauncherConfig:
    kind: str = "local"  # local | torchrun (ray and slurm arrive with the fault-tolerance work)
    nproc_per_node: int = 1  # processes to spawn on this machine (vidtron-train starts torchrun for you)
    max_restarts: int = 0  # torchrun restarts of the whole group after a failure

    def __post_init__(self) -> None:
        if self.kind not in ("local", "torchrun"):
            raise ConfigError("launcher", self.kind, "choose launcher=local or launcher=torchrun")
        if self.nproc_per_node < 1:
            raise ConfigError("launcher.nproc_per_node", self.nproc_per_node, "must be >= 1")


@dataclass
class MetricsConfig:
    wandb: bool = True  # log to Weights & Biases (offline unless WANDB_MODE says otherwise)
    wandb_project: str = "vidtron"


@dataclass
class TrainConfig:
    recipe: str = "dit_t2v"  # which recipe's task to train
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, events and wandb files go here
    seed: int = 0  # seeds init, data order, noise and timesteps
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError("recipe", self.recipe, f"choose one of {list(RECIPES)}")
        if not self.run_dir:
            raise ConfigError("run_dir", self.run_dir, "give a folder, e.g. run_dir=runs/my_run")
