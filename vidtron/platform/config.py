"""Typed configs for `vidtron-train`, composed by Hydra from `vidtron/recipes/conf` plus CLI overrides.

Each component owns a dataclass with one comment per field and validation in `__post_init__`; bad values
raise ConfigError(field, value, fix) before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import check_frames
from vidtron.models.text.config import TextConfig
from vidtron.parallel.activation_memory import MemoryConfig

__all__ = ["MemoryConfig", "TextConfig", "TrainConfig"]  # MemoryConfig and TextConfig live with their owners
LAUNCHERS = ("local", "torchrun", "slurm", "ray", "dryrun")


@dataclass
class ModelConfig:
    flavor: str = "dit-tiny"  # a name from vidtron.models.dit.configs.FLAVORS
    init_from: str = ""  # start from these weights: our safetensors, a diffusers folder, an original-HunyuanVideo
    # .pt/safetensors, or a training checkpoint step_N folder (weights only); each rank reads only its slices
    num_heads: int = 0  # 0 = the flavor's; otherwise overrides it (width = num_heads * head_dim)
    head_dim: int = 0  # 0 = the flavor's
    num_double_blocks: int = -1  # -1 = the flavor's
    num_single_blocks: int = -1  # -1 = the flavor's
    image_condition: str = ""  # "" = the flavor's (text-to-video); token_replace = image-to-video (latent frame 0 is
    # the clean reference image, loss on the other frames; `vidtron-sample --image`)
    patch_size: int = 0  # 0 = the flavor's (2: a token per 2x2 latents); 1 = a token per latent pixel (4x the tokens)
    latent_channels: int = 0  # 0 = the flavor's (16, the causal VAE's); otherwise the DiT's in and out channels,
    # to match a data root's autoencoder (e.g. `vidtron-data synth --latent-channels 32`)

    def arch_overrides(self) -> dict:
        """The DiTConfig fields this config overrides (used by scaling sweeps to build model families)."""
        fields = {"num_heads": self.num_heads, "head_dim": self.head_dim, "patch_size": self.patch_size}
        out = {k: v for k, v in fields.items() if v > 0}
        if self.latent_channels > 0:
            out |= {"in_channels": self.latent_channels, "out_channels": self.latent_channels}
        out |= {"image_condition": self.image_condition} if self.image_condition else {}
        out |= {
            k: v
            for k, v in (("num_double_blocks", self.num_double_blocks), ("num_single_blocks", self.num_single_blocks))
            if v >= 0
        }
        return out


def check_clip_shape(frames: int, height: int, width: int, names: tuple[str, str, str]) -> None:
    """Pixel clips must be 4k+1 frames (VAE 4x in time after the first frame) and 16-divisible (VAE 8x, patch 2)."""
    check_frames(frames, names[0])
    for name, value in zip(names[1:], (height, width)):
        if value < 16 or value % 16:
            raise ConfigError(name, value, f"must be a positive multiple of 16 (e.g. {max(16, value // 16 * 16)})")


@dataclass
class BucketConfig:
    """One duration x resolution bucket (data.format=video|latent): every sample of a step has this shape."""

    frames: int = 9  # pixel frames: 4k+1; 1 makes an image bucket
    height: int = 64  # pixels, a multiple of 16
    width: int = 64  # pixels, a multiple of 16
    max_batch: int = 0  # global batch of a step from this bucket (split over DP ranks); 0 = from data.bucket_tokens

    def __post_init__(self) -> None:
        names = ("data.buckets[].frames", "data.buckets[].height", "data.buckets[].width")
        check_clip_shape(self.frames, self.height, self.width, names)
        if self.max_batch < 0:
            raise ConfigError("data.buckets[].max_batch", self.max_batch, "must be >= 0 (0 = from data.bucket_tokens)")


@dataclass
class DataConfig:
    root: str = ""  # folder with webdataset shards (*.tar) written by `vidtron-data synth` (or `encode`)
    frames: int = 9  # pixel frames per clip: 4k+1 (the VAE compresses time 4x after the first frame)
    height: int = 64  # pixels, divisible by 16 (VAE 8x times patch 2)
    width: int = 64  # pixels, divisible by 16
    batch_size: int = 4  # global batch: samples per step over all data-parallel ranks
    caption_dropout: float = 0.1  # probability of an empty caption (trains the unconditional branch for CFG)
    format: str = "memory"  # memory: fixed-shape video.npy clips encoded once into RAM; video: decode per step
    # (mp4/webm/npy/png) into buckets; latent: shards written by `vidtron-data encode`
    decoder: str = "cpu"  # format=video: cpu (PyAV) | dali (GPU decode; needs nvidia-dali and CUDA)
    buckets: list[BucketConfig] = field(default_factory=list)  # empty = one bucket (frames, height, width, batch_size)
    bucket_tokens: int = 0  # DiT tokens per global batch; buckets with max_batch=0 take max(1, this // tokens)
    image_ratio: float = 0.0  # fraction of steps drawn from image (frames=1) buckets; 0 = images only as they come
    frame_interval: int = 1  # format=video: take every k-th frame of a clip
    vae: str = ""  # format=video: "" = the stand-in autoencoder of data.root; else a CausalVAE folder (diffusers)

    def __post_init__(self) -> None:
        self._check_loader()
        check_clip_shape(self.frames, self.height, self.width, ("data.frames", "data.height", "data.width"))
        if self.batch_size < 1:
            raise ConfigError("data.batch_size", self.batch_size, "must be >= 1")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError("data.caption_dropout", self.caption_dropout, "must be in [0, 1)")

    def _check_loader(self) -> None:
        if self.format not in ("memory", "video", "latent"):
            raise ConfigError("data.format", self.format, "choose memory (default), video or latent")
        if self.decoder not in ("cpu", "dali"):
            raise ConfigError("data.decoder", self.decoder, "choose cpu (PyAV) or dali (GPU)")
        if self.buckets and self.format == "memory":
            raise ConfigError("data.format", self.format, "data.buckets need data.format=video or latent")
        if any(b.max_batch == 0 for b in self.buckets) and self.bucket_tokens <= 0:
            raise ConfigError("data.bucket_tokens", self.bucket_tokens, "set it > 0, or give every bucket a max_batch")
        if not 0.0 <= self.image_ratio < 1.0:
            raise ConfigError("data.image_ratio", self.image_ratio, "must be in [0, 1)")
        if self.frame_interval < 1:
            raise ConfigError("data.frame_interval", self.frame_interval, "must be >= 1")


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
    precision: str = "fp32"  # fp32 | bf16: bf16 params and compute (FSDP2 MixedPrecisionPolicy + autocast) over
    # fp32 master weights, optimizer state and gradient reduction
    grad_accum: int = 1  # micro-batches per optimizer step: global batch = data.batch_size = micro x grad_accum x dp
    ema_decay: float = 0.0  # EMA of the weights (sharded like them, checkpointed); 0 = off, e.g. 0.999
    prefetch: int = 2  # batches prepared ahead in a background thread while the step runs; 0 = synchronous
    compile: bool = False  # torch.compile each block (parallelize_dit step 4; inductor, also on CPU)
    peak_tflops: float = 0.0  # per-rank peak for MFU; 0 = from the GPU's name (H100/H200/A100), none on CPU
    progress: bool = True  # a progress bar on rank 0 when stdout is a terminal
    async_checkpoint: bool = False  # DCP async_save: the step loop stalls only for the staging copy
    max_bad_steps: int = 3  # NaN/inf steps in a row (each skipped, no update) before a rollback to the last checkpoint
    max_rollbacks: int = 3  # rollbacks per process before the run fails with an error
    skip_bad_batches: bool = True  # after a rollback, the batches of the NaN/inf streak are skipped (events.jsonl)
    skip_batches: list[int] = field(default_factory=list)  # data cursors never to train (e.g. from events.jsonl)
    collective_timeout_s: float = 600.0  # a collective that waits longer fails the process (the launcher restarts it)
    hang_timeout_s: float = 300.0  # a rank with no step progress this long reports itself (rank, host) and exits so
    # the group restarts; well under collective_timeout_s; 0 = off. Counted from the end of the first step
    straggler_ratio: float = 1.5  # a rank whose step takes longer than this x the median is logged as a straggler

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("trainer.steps", self.steps, "must be >= 1")
        if self.max_bad_steps < 1:
            raise ConfigError("trainer.max_bad_steps", self.max_bad_steps, "must be >= 1")
        if self.hang_timeout_s < 0 or self.straggler_ratio <= 1:
            raise ConfigError("trainer.hang_timeout_s", self.hang_timeout_s, "must be >= 0; straggler_ratio > 1")
        if self.collective_timeout_s <= 0:
            raise ConfigError("trainer.collective_timeout_s", self.collective_timeout_s, "must be > 0 seconds")
        if self.checkpoint_every < 0:
            raise ConfigError("trainer.checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = only at the end)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("trainer.precision", self.precision, "choose fp32 or bf16")
        if self.grad_accum < 1:
            raise ConfigError("trainer.grad_accum", self.grad_accum, "must be >= 1 (1 = no accumulation)")
        if self.prefetch < 0 or self.peak_tflops < 0:
            raise ConfigError("trainer.prefetch", self.prefetch, "prefetch depth and peak_tflops must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("trainer.ema_decay", self.ema_decay, "must be in [0, 1) (0 = no EMA; e.g. 0.999)")

    @property
    def bf16(self) -> bool:
        """precision == "bf16" (read-only shorthand; set trainer.precision)."""
        return self.precision == "bf16"


@dataclass
class ZeroConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed (extra [deepspeed]; data + context parallel only, tp = 1)
    stage: int = 3  # ZeRO stage: 3 shards params+grads+optimizer state; 2 grads+optimizer; 1 optimizer (FSDP2: as 2)
    # deepspeed only: parameters with fewer elements than this stay whole on every rank under ZeRO-3
    # (DeepSpeed's stage3_param_persistence_threshold; fewer, larger all-gathers)
    ds_persist_below: int = 100_000
    ds_bucket_elements: int = 50_000_000  # deepspeed only: reduce / all-gather bucket size in elements

    def __post_init__(self) -> None:
        if self.engine not in ("fsdp2", "deepspeed"):
            raise ConfigError("parallel.zero.engine", self.engine, "choose 'fsdp2' or 'deepspeed'")
        if self.stage not in (1, 2, 3):
            raise ConfigError("parallel.zero.stage", self.stage, "choose 1, 2 or 3")
        for name, lo in (("ds_persist_below", 0), ("ds_bucket_elements", 1)):
            if getattr(self, name) < lo:
                raise ConfigError(f"parallel.zero.{name}", getattr(self, name), f"must be an element count >= {lo}")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel degree (SP rides on it)
    cp: int = 1  # context parallel degree
    cp_mode: str = "ring"  # ring | ulysses | usp
    ulysses: int = 0  # Ulysses degree inside usp (0 = derived)
    dp_shard: int = -1  # ZeRO-sharded data-parallel degree; -1 = whatever the world size leaves
    dp_replicate: int = 1  # replicated data-parallel degree (HSDP outer dim)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        if self.zero.engine != "deepspeed":
            return
        if self.tp > 1:
            raise ConfigError(
                "parallel.tp",
                self.tp,
                "parallel.zero.engine=deepspeed runs without tensor parallelism (it flattens whole parameters, "
                "not DTensor shards); use parallel.tp=1 or parallel.zero.engine=fsdp2",
            )
        if self.dp_replicate > 1:
            raise ConfigError(
                "parallel.dp_replicate",
                self.dp_replicate,
                "parallel.zero.engine=deepspeed shards over every data-parallel rank (no HSDP); "
                "use parallel.dp_replicate=1 with parallel.dp_shard=N, or parallel.zero.engine=fsdp2",
            )


@dataclass
class LauncherConfig:
    kind: str = "local"  # local | torchrun | slurm | ray | dryrun (one simulated step, vidtron/tools/dryrun.py)
    nproc_per_node: int = 1  # processes per node (torchrun, ray workers; slurm takes the cluster config's)
    max_restarts: int = 0  # torchrun restarts of the whole group after a failure
    max_failures: int = 3  # ray: worker-group restarts (FailureConfig); slurm: job requeues after a failed step
    cluster: str = ""  # slurm / ray: a name in cluster_configs/ (or a .yaml path); ray without one runs locally
    dry_run: bool = False  # slurm: print the sbatch script instead of submitting it
    world_size: int = 0  # dryrun: simulated ranks (e.g. 256); 0 = dp_replicate * dp_shard * cp * tp (dp_shard -1 = 1)
    exclude_failed_nodes: bool = True  # slurm: requeue without the node whose torchrun failed first (ExcNodeList)
    max_excluded_nodes: int = 8  # slurm: most nodes one job excludes for failures (never below the job's node count)
    exclude_nodes: list[str] = field(default_factory=list)  # slurm: nodes never used (#SBATCH --exclude), e.g. [gpu017]

    @staticmethod
    def _is_hostlist(name: str) -> bool:
        """A node name or SLURM hostlist (gpu017, gpu[040-043,050]): what `--exclude` takes, nothing a shell reads."""
        chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-[],")
        return bool(name) and set(name) <= chars and name.count("[") == name.count("]") and name[0] not in "-[,"

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ConfigError("launcher", self.kind, f"choose one of {', '.join('launcher=' + k for k in LAUNCHERS)}")
        if self.nproc_per_node < 1:
            raise ConfigError("launcher.nproc_per_node", self.nproc_per_node, "must be >= 1")
        if self.max_restarts < 0 or self.max_failures < 0:
            raise ConfigError("launcher.max_failures", self.max_failures, "restart counts must be >= 0")
        if self.world_size < 0:
            raise ConfigError("launcher.world_size", self.world_size, "must be >= 0 (0 = the layout's product)")
        if self.kind == "slurm" and not self.cluster:
            raise ConfigError("launcher.cluster", self.cluster, "launcher=slurm needs a cluster_configs/<name>.yaml")
        if self.max_excluded_nodes < 1:
            fix = "must be >= 1; to requeue without excluding nodes set launcher.exclude_failed_nodes=false"
            raise ConfigError("launcher.max_excluded_nodes", self.max_excluded_nodes, fix)
        for node in self.exclude_nodes:
            if not self._is_hostlist(str(node)):
                fix = "node names or SLURM hostlists, e.g. [gpu017,'gpu[040-043]'] (no spaces or shell characters)"
                raise ConfigError("launcher.exclude_nodes", node, fix)


@dataclass
class FaultsConfig:
    """Fault injection for drills and tests; each fault fires once per run dir (marker in <run_dir>/faults/)."""

    kill_rank: int = 0  # the rank that kill_at_step / kill_during_checkpoint SIGKILLs
    kill_at_step: int = 0  # SIGKILL kill_rank right after this step (before its checkpoint); 0 = off
    kill_during_checkpoint: int = 0  # SIGKILL kill_rank inside the save of step N's checkpoint, before commit; 0 = off
    corrupt_checkpoint: int = 0  # flip one byte of step N's committed checkpoint (its sha256 check fails); 0 = off
    nan_at_step: int = 0  # the loss of this step is NaN on every rank; 0 = off
    nan_steps: int = 1  # ... and of this many steps in a row
    nan_sample: int = -1  # every batch holding this sample (its index in data.root) has a NaN loss; -1 = off
    hang_rank: int = 0  # the rank that hang_at_step stalls
    hang_at_step: int = 0  # hang_rank sleeps forever right after this step (peers hit the collective timeout); 0 = off
    step_delay_s: float = 0.0  # sleep after every step: widens the window for kills from outside (tests, benches)

    def __post_init__(self) -> None:
        for name in ("kill_rank", "kill_at_step", "kill_during_checkpoint", "corrupt_checkpoint", "nan_at_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"faults.{name}", getattr(self, name), "must be >= 0 (0 = off for steps)")
        if self.hang_rank < 0 or self.hang_at_step < 0 or self.step_delay_s < 0:
            raise ConfigError("faults.hang_at_step", self.hang_at_step, "hang_rank, hang_at_step, step_delay_s >= 0")
        if self.nan_steps < 1:
            raise ConfigError("faults.nan_steps", self.nan_steps, "must be >= 1")


@dataclass
class MetricsConfig:
    wandb: bool = True  # log to Weights & Biases (offline unless WANDB_MODE says otherwise)
    wandb_project: str = "vidtron"


@dataclass
class TrainConfig:
    """What every recipe's run has. A recipe's own config dataclass subclasses this and adds its sections (the DiT
    recipes: model, text, flow; the VAE: vae); it is the schema of the recipe's Hydra group (recipes/registry.py)."""

    recipe: str = "dit_t2v"  # which recipe's task to train (a name in vidtron/recipes/registry.py)
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, events and wandb files go here
    seed: int = 0  # seeds init, data order, noise and timesteps
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir", self.run_dir, "give a folder, e.g. run_dir=runs/my_run")
