"""The scaling sweep's grid: its config, the DiT family crossed with token budgets, and one `Point` per run,
validated before anything trains. `sweep.py` trains the points and collects them into the report.

Grid. Model sizes grow in width and depth together, like the paper's family: size `WxK` has width
W = num_heads * head_dim and K dual-stream blocks plus `single_ratio * K` single-stream blocks. Each size is
ONE training run, long enough for the largest token budget; every smaller budget is read along that run
at step ceil(budget / tokens_per_step). Tokens are video tokens (what the trainer counts), compute is the
analytic training FLOPs of `flops.dit_train_flops` (3x forward, text tokens included). Each run trains
`smooth` past its last budget so that its last read is centred in the loss window (see `sweep.py`).

Schedule. `schedule=constant` (default) holds the peak lr after warmup (`optim.min_lr_ratio=1`): a read at
an intermediate budget is then an honest run of that length, and a longer budget list resumes finished
runs. `schedule=cosine` decays to each run's last step (intermediate reads are then pessimistic, as
Hoffmann et al. note).

Reuse. `point.json` in each run folder holds the run's trainer overrides; reusing `out` with different
settings is refused (`check_out_folder`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import dit_config, latent_shape
from vidtron.platform.config import TrainConfig
from vidtron.platform.data.shards import list_shards
from vidtron.recipes.registry import compose_config
from vidtron.tools.flops import dit_train_flops

RECIPE = "scaling_sweep"
LAUNCHERS = ("local", "ray", "slurm")
# trainer keys the sweep sets per run; the user may not override them
OWNED_KEYS = (
    "run_dir",
    "trainer.steps",
    "trainer.resume",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "model.num_heads",
    "model.head_dim",
    "model.num_double_blocks",
    "model.num_single_blocks",
)
POINT = "point.json"  # per-run file with the size and trainer overrides (written by `sweep.prepare_point`)


# ----------------------------------------------------------------------------- config


@dataclass
class SweepConfig:
    """`vidtron-sweep recipe=scaling_sweep ...`; dotted keys (data.root=..., optim.lr=...) go to every run."""

    out: str = ""  # output folder: runs/<size>/, results.csv, results.json, report.md, plots
    sizes: str = "4"  # an int n (family of n sizes, widths 32..128, depths 1..4) or 'WxK,...' e.g. '32x1,64x2'
    budgets: str = "2e4:2e5:6"  # video-token budgets: 'a,b,c' or 'lo:hi:n' (n log-spaced from lo to hi)
    head_dim: int = 16  # channels per head for every size (width must be a multiple)
    single_ratio: int = 1  # single-stream blocks per dual-stream block (HunyuanVideo: 2)
    schedule: str = "constant"  # constant: peak lr after warmup; cosine: decay to each run's end
    smooth: float = 0.1  # half-width of the centred loss window, as a fraction of the step
    checkpoint_every: int = 0  # steps between checkpoints of each run; 0 = about 4 per run
    max_parallel: int = 1  # runs at a time; 0 = as many as the cores allow (cores // threads_per_run)
    threads_per_run: int = 1  # OMP / torch threads of each run (max_parallel * threads_per_run <= cores)
    launcher: str = "local"  # local (subprocesses here), ray (one Ray task per run) or slurm (one sbatch job per run)
    ray_address: str = ""  # launcher=ray: a running cluster (ray://head:10001 or head:6379); "" = a private local one
    cluster: str = ""  # launcher=slurm: cluster_configs/<name>.yaml (partition, account, time, env), e.g. local_cpu
    dry_run: bool = False  # launcher=slurm: print each pending run's sbatch script, submit nothing
    budget_pflops: float = 0.0  # > 0: the report recommends N and D for this compute (PFLOPs)
    fit_params: str = "non_embedding"  # N in the fit: non_embedding (transformer blocks, as Kaplan) or total
    drop_edges: bool = True  # envelope: drop minima at the family's smallest / largest size
    n_boot: int = 1000  # bootstrap resamples for the fit's intervals (0 = none)
    title: str = "vidtron DiT scaling sweep"  # report title
    recipe: str = RECIPE  # the only sweep recipe
    train: dict[str, str] = field(default_factory=dict)  # dotted vidtron-train overrides for every run

    def __post_init__(self) -> None:
        if self.recipe != RECIPE:
            raise ConfigError("recipe", self.recipe, f"choose recipe={RECIPE}")
        self._check_launcher()
        if not self.out:
            raise ConfigError("out", self.out, "give an output folder, e.g. out=sweep_out")
        if not self.train.get("data.root"):
            raise ConfigError("data.root", "", "give the generated data folder, e.g. data.root=data/synth")
        self._check_numbers()
        self._check_choices()
        overlap = set(self.train) & set(OWNED_KEYS)
        if overlap:
            key = sorted(overlap)[0]
            raise ConfigError(key, self.train[key], f"is set by the sweep for each run; drop it (owned: {OWNED_KEYS})")

    def _check_launcher(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError("launcher", self.launcher, f"choose one of {LAUNCHERS}")
        if self.launcher == "slurm" and not self.cluster:
            fix = "launcher=slurm needs cluster=NAME (cluster_configs/NAME.yaml), e.g. cluster=local_cpu"
            raise ConfigError("cluster", self.cluster, fix)
        if self.launcher != "slurm" and (self.cluster or self.dry_run):
            raise ConfigError("launcher", self.launcher, "cluster= and dry_run= are for launcher=slurm")
        if self.launcher != "ray" and self.ray_address:
            raise ConfigError("ray_address", self.ray_address, "is for launcher=ray")

    @property
    def local_cores(self) -> bool:
        """True when the runs share this machine's cores (local subprocesses or a private local Ray)."""
        return self.launcher == "local" or (self.launcher == "ray" and not self.ray_address)

    def _check_numbers(self) -> None:
        for name in ("head_dim", "single_ratio", "threads_per_run"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        cores = os.cpu_count() or 1
        if self.max_parallel == 0:
            self.max_parallel = max(1, cores // self.threads_per_run)
        if self.max_parallel < 1:
            raise ConfigError("max_parallel", self.max_parallel, "must be >= 1 (or 0 = as many as the cores allow)")
        if self.head_dim % 2:
            raise ConfigError("head_dim", self.head_dim, "must be even (RoPE rotates channel pairs), e.g. 16")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every", self.checkpoint_every, "must be >= 0 (0 = about 4 per run)")
        if not 0 <= self.smooth < 1:
            raise ConfigError("smooth", self.smooth, "must be in [0, 1), e.g. 0.1 (0 = the raw loss at the step)")
        if self.budget_pflops < 0:
            raise ConfigError("budget_pflops", self.budget_pflops, "must be >= 0 PFLOPs (0 = no recommendation)")
        if self.n_boot < 0:
            raise ConfigError("n_boot", self.n_boot, "must be >= 0 (0 = no bootstrap intervals)")
        if self.local_cores and self.max_parallel * self.threads_per_run > cores:
            fix = f"max_parallel * threads_per_run must be <= the {cores} cores here; lower one of them"
            raise ConfigError("max_parallel", self.max_parallel, fix)

    def _check_choices(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError("schedule", self.schedule, "choose constant or cosine")
        if self.fit_params not in ("non_embedding", "total"):
            raise ConfigError("fit_params", self.fit_params, "choose non_embedding or total")
        parse_sizes(self.sizes, self.head_dim, self.single_ratio)
        parse_budgets(self.budgets)

    def base_overrides(self) -> list[str]:
        """Trainer overrides shared by every run: the sweep's defaults, then the user's dotted keys."""
        defaults = {"metrics.wandb": "false", "trainer.progress": "false"}
        if self.schedule == "constant":
            defaults["optim.min_lr_ratio"] = "1.0"
        return [f"{k}={v}" for k, v in (defaults | self.train).items()]


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class ModelSize:
    """One member of the family: width W = num_heads * head_dim, K dual-stream + single_ratio * K single blocks."""

    width: int
    depth: int
    head_dim: int
    single_ratio: int

    @property
    def name(self) -> str:
        return f"w{self.width}-d{self.depth}"

    def overrides(self) -> dict[str, int]:
        """DiTConfig fields of this size (as `dit_config` and the trainer's model.* keys take them)."""
        return {
            "num_heads": self.width // self.head_dim,
            "head_dim": self.head_dim,
            "num_double_blocks": self.depth,
            "num_single_blocks": self.single_ratio * self.depth,
        }


def family(n: int, head_dim: int = 16, single_ratio: int = 1, widths=(32, 128), depths=(1, 4)) -> list[ModelSize]:
    """n sizes with widths log-spaced over `widths` (rounded to head_dim) and depths linear over `depths`."""
    out = []
    for i in range(n):
        frac = i / (n - 1) if n > 1 else 1.0
        width = widths[0] * (widths[1] / widths[0]) ** frac
        width = max(head_dim, round(width / head_dim) * head_dim)
        depth = max(1, round(depths[0] + frac * (depths[1] - depths[0])))
        out.append(ModelSize(width, depth, head_dim, single_ratio))
    return out


def parse_sizes(spec: str, head_dim: int, single_ratio: int) -> list[ModelSize]:
    """'4' -> family(4); '32x1,64x2' -> those (width x depth) sizes. ConfigError on bad input."""
    spec = str(spec).strip().strip("[]")
    if spec.isdigit():
        sizes = family(int(spec), head_dim, single_ratio)
    else:
        sizes = [_parse_size(item, head_dim, single_ratio) for item in spec.split(",")]
    if len({s.name for s in sizes}) != len(sizes) or len(sizes) < 2:
        fix = "give >= 2 distinct sizes: sizes=N (widths round to head_dim: N <= 5 at 16) or sizes=32x1,64x2"
        raise ConfigError("sizes", spec, fix)
    return sizes


def _parse_size(item: str, head_dim: int, single_ratio: int) -> ModelSize:
    """'64x2' -> ModelSize(width 64, depth 2)."""
    w, sep, k = item.strip().lower().partition("x")
    if not (sep and w.isdigit() and k.isdigit()) or int(w) % head_dim or int(w) < head_dim or int(k) < 1:
        fix = f"give WIDTHxDEPTH items with WIDTH a multiple of head_dim={head_dim}, e.g. sizes=32x1,64x2,128x4"
        raise ConfigError("sizes", item, fix)
    return ModelSize(int(w), int(k), head_dim, single_ratio)


def parse_budgets(spec: str) -> list[int]:
    """'2e4,5e4' -> [20000, 50000]; '1e4:1e6:5' -> 5 log-spaced budgets. Video tokens, sorted, >= 2 of them."""
    spec = str(spec).strip().strip("[]")
    fix = "give video-token budgets as 'a,b,c' or 'lo:hi:n' (n log-spaced), e.g. budgets=2e4:2e5:6"
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            if not (0 < lo < hi and n >= 2):
                raise ValueError
            values = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        else:
            values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError("budgets", spec, fix) from None
    budgets = sorted({round(v) for v in values})
    if len(budgets) < 2 or budgets[0] < 1:
        raise ConfigError("budgets", spec, "need at least 2 distinct positive budgets; " + fix)
    return budgets


@dataclass
class Point:
    """One run of the sweep: a model size trained to `steps`, read at `budget_steps`."""

    size: ModelSize
    run_dir: Path
    steps: int  # optimizer steps the run trains
    budget_steps: dict[int, int]  # token budget -> step where it is read
    tokens_per_step: int  # video tokens per optimizer step (batch * V)
    flops: dict  # dit_train_flops of one step
    train_args: list[str]  # complete vidtron-train overrides

    @property
    def name(self) -> str:
        return self.size.name


def _latent_shape(train: TrainConfig) -> tuple[int, int, int]:
    """(F, H, W) latents of the trainer's clips: the VAE keeps the first frame and compresses 4x in time, 8x in space."""
    return latent_shape(train.data.frames, train.data.height, train.data.width)


def build_points(cfg: SweepConfig) -> list[Point]:
    """The sweep's runs, each validated by composing its trainer config (bad keys fail before any run)."""
    budgets = parse_budgets(cfg.budgets)
    list_shards(cfg.train["data.root"])  # DataError (exit 2) for a missing or empty folder
    points = []
    for size in parse_sizes(cfg.sizes, cfg.head_dim, cfg.single_ratio):
        model_args = [f"model.{k}={v}" for k, v in size.overrides().items()]
        train = compose_config(cfg.base_overrides() + model_args)
        _check_fixed_shape(train)
        dit = dit_config(train.model.flavor, train.model.arch_overrides())
        flops = dit_train_flops(dit, _latent_shape(train), train.text.max_tokens, train.data.batch_size)
        per_step = flops["video_tokens"]
        budget_steps = {b: math.ceil(b / per_step) for b in budgets}
        steps = math.ceil(max(budget_steps.values()) * (1 + cfg.smooth))
        every = cfg.checkpoint_every or max(1, steps // 4)
        run_dir = Path(cfg.out) / "runs" / size.name
        args = [*cfg.base_overrides(), *model_args, f"run_dir={run_dir}", f"trainer.steps={steps}"]
        args += ["trainer.resume=auto", "trainer.log_every=1", f"trainer.checkpoint_every={every}"]
        points.append(Point(size, run_dir, steps, budget_steps, per_step, flops, args))
    _check_distinct_reads(points)
    return points


def _check_fixed_shape(train: TrainConfig) -> None:
    """The FLOP and token accounting assumes every clip has data.frames x height x width (one bucket)."""
    data_format, buckets = getattr(train.data, "format", "memory"), getattr(train.data, "buckets", [])
    if data_format != "memory" or buckets:
        fix = "the sweep counts FLOPs for fixed-shape clips; use data.format=memory (the default) and no data.buckets"
        raise ConfigError("data.format", data_format, fix)


def _check_distinct_reads(points: list[Point]) -> None:
    """Every run needs >= 2 distinct read steps to be a curve."""
    for p in points:
        if len(set(p.budget_steps.values())) < 2:
            step = next(iter(p.budget_steps.values()))
            fix = f"all are read at step {step}; spread them (one step is {p.tokens_per_step} video tokens)"
            raise ConfigError("budgets", sorted(p.budget_steps), fix)


def _settings(train_args: list[str]) -> list[str]:
    """The trainer overrides that must match to continue a run: all but its folder, length and checkpointing."""
    return [a for a in train_args if not a.startswith(("run_dir=", "trainer.steps=", "trainer.checkpoint_every="))]


def check_out_folder(points: list[Point]) -> None:
    """Refuse to reuse a run folder that was trained with other settings (the step count may change, and
    the sweep folder may move)."""
    for p in points:
        path = p.run_dir / POINT
        if not path.exists():
            continue
        old, new = _settings(json.loads(path.read_text())["train_args"]), _settings(p.train_args)
        if old != new:
            diff = sorted(set(old) ^ set(new))
            fix = f"was trained with other settings (differs in {diff}); use a new out= folder or delete it"
            raise ConfigError("out", str(p.run_dir), fix)
