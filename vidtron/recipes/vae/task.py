"""What the trainer trains for recipe `vae`: the VAE + discriminator pair, each step's batch, and the GAN's phases.

Task hooks (vidtron/platform/task.py):
    validate_layout(dims)                 pure data parallel: tp = cp = 1
    parallelize(model, dims, opts)        ZeRO-2/3 (FSDP2) when dp_shard > 1, else replication (parallelize.py);
                                          records the data-parallel group for the adaptive weight's gradient mean
    optimizer_groups(model)               {"vae": ..., "disc": ...}: two AdamW optimizers, checkpointed as a list
    phases(model, batch, step, device)    the VAE's update, then the critic's (gan.phases)
Conveniences for driving the task by hand (tests, `make vae-demo`), on the same update path as the trainer:
`build_optimizers(model)` and `train_step(model, optimizers, batch, step, lr, device)`. `loss(model, batch, device)`
is the VAE's generator loss alone (no update): for evaluation.

Legend: b local batch, C channels, F frames, H, W pixels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vidtron.errors import ConfigError
from vidtron.models.vae import FLAVORS
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions
from vidtron.platform.config import DataConfig, OptimConfig
from vidtron.platform.data.sampler import GlobalSampler
from vidtron.platform.init_from import init_from
from vidtron.platform.task import Phase
from vidtron.platform.trainer import build_optimizers
from vidtron.platform.update import UpdatePolicy, run_phases
from vidtron.recipes.vae import gan
from vidtron.recipes.vae.config import VAERecipeConfig
from vidtron.recipes.vae.data import (
    check_stages_fit,
    draw_sample,
    generator,
    load_videos,
    resolve_stages,
    step_plan,
)
from vidtron.recipes.vae.discriminator import min_input_size
from vidtron.recipes.vae.gan import VAEGAN, build_gan, reconstruct, tiling_kwargs
from vidtron.recipes.vae.losses import VAEObjective
from vidtron.recipes.vae.lpips import build_lpips
from vidtron.recipes.vae.parallelize import parallelize_gan


def validate_layout(dims: ParallelDims) -> None:
    """The VAE recipe is data parallel only; fails before any process group starts."""
    for name in ("tp", "cp"):
        if getattr(dims, name) > 1:
            raise ConfigError(
                f"parallel.{name}", getattr(dims, name), "recipe=vae is data parallel only; use 1 (and more dp ranks)"
            )


class VAETask:
    """The `vae` task: a causal 3D VAE learning to reconstruct clips and images against a 3D PatchGAN critic."""

    def __init__(self, vae: VAERecipeConfig, data: DataConfig, optim: OptimConfig, seed: int = 0):
        if vae.flavor not in FLAVORS:
            raise ConfigError("vae.flavor", vae.flavor, f"choose one of {sorted(FLAVORS)}")
        self.cfg, self.data_cfg, self.optim, self.seed = vae, data, optim, seed
        self.vae_cfg = FLAVORS[vae.flavor]
        self.stages = resolve_stages(vae, data)
        self.videos = load_videos(data.root)  # uint8 [N, F, H, W, 3]
        check_stages_fit(self.stages, self.videos)
        self.sampler = GlobalSampler(self.videos.shape[0], seed)
        self.objective = VAEObjective(vae, build_lpips(vae.lpips_path))
        self.group = None  # data-parallel process group, set by `parallelize`
        self._latent_shape: tuple[int, ...] | None = None
        self._ensure_disc_fits()

    def _ensure_disc_fits(self) -> None:
        need = min_input_size(self.cfg.disc_layers)
        for i, stage in enumerate(self.stages):
            if min(stage.height, stage.width) < need and self.cfg.adv_weight > 0:
                raise ConfigError(
                    f"vae.stages[{i}]",
                    (stage.height, stage.width),
                    f"a {self.cfg.disc_layers}-layer discriminator needs >= {need} pixels; "
                    "raise the size or lower vae.disc_layers",
                )

    # ---- trainer hooks ----------------------------------------------------------------------------------------

    def build_model(self, device: torch.device | str = "cpu") -> VAEGAN:
        """VAE + discriminator, initialised from the run seed (identical on every rank); the VAE from
        `vae.init_from` when set."""
        model = build_gan(self.cfg, self.seed).to(device)
        if self.cfg.init_from:
            init_from(model.vae, self.cfg.init_from, kind="vae")
        return model

    def validate_layout(self, dims: ParallelDims) -> None:
        validate_layout(dims)

    def parallelize(self, model: VAEGAN, dims: ParallelDims, opts: ParallelizeOptions | None = None) -> VAEGAN:
        """ZeRO over dp_shard (FSDP2; `opts.zero_stage` 3 by default, 2 keeps params after forward), replication
        otherwise; remembers the dp group (gradient averaging when replicated, metric and adaptive-weight means)."""
        validate_layout(dims)
        self.group = dims.mesh["dp"].get_group() if dims.dp > 1 else None
        if self.group is None:
            return model
        opts = opts or ParallelizeOptions()
        return parallelize_gan(model, dims, opts)

    def optimizer_groups(self, model: VAEGAN) -> dict[str, list[dict]]:
        return gan.optimizer_groups(model, self.cfg)

    def build_optimizers(self, model: VAEGAN, optim: OptimConfig | None = None) -> dict[str, torch.optim.Optimizer]:
        return build_optimizers(self.optimizer_groups(model), optim or self.optim)

    @property
    def tokens_per_sample(self) -> int:
        """Latent positions f * h * w of the most recent batch (the final stage's before the first)."""
        last = self.stages[-1]
        _, f, h, w = self._latent_shape or self._latent_of((3, last.frames, last.height, last.width))
        return f * h * w

    def local_batch(self, step: int, cursor: int, dp_rank: int, dp: int) -> dict:
        """This data-parallel rank's slice of global batch `step` (stream position `cursor`)."""
        batch = self.data_cfg.batch_size
        idx = self.sampler.global_indices(cursor, batch)
        part = GlobalSampler.local_slice(batch, dp_rank, dp)
        plan = step_plan(step, self.seed, self.cfg, self.stages)
        videos, eps = [], []
        for pos in range(batch)[part]:
            gen = generator(self.seed, step, pos)
            videos.append(draw_sample(self.videos, idx[pos], plan, self.cfg.max_frame_interval, gen))
            eps.append(torch.randn(self._latent_of(videos[-1].shape), generator=gen))
        self._latent_shape = tuple(eps[0].shape)
        return {
            "video": torch.stack(videos),  # [b, C, F, H, W] in [-1, 1]
            "eps": torch.stack(eps) if self.cfg.sample_posterior else None,  # [b, Z, f, h, w]
            "tiled": plan.tiled,
            "image": plan.image,
            "indices": idx[part],
        }

    def _latent_of(self, shape_CFHW: tuple[int, ...]) -> tuple[int, int, int, int]:
        """[C, F, H, W] of a sample -> [Z, f, h, w] of its latents."""
        vcfg = self.vae_cfg
        _, frames, h, w = shape_CFHW
        t, s = vcfg.temporal_compression_ratio, vcfg.spatial_compression_ratio
        return (vcfg.latent_channels, (frames - 1) // t + 1, h // s, w // s)

    def phases(self, model: VAEGAN, batch: dict, step: int, device) -> Iterator[Phase]:
        self.objective.to(device)
        return gan.phases(model, self.objective, self._to(batch, device), step, self.group)

    def train_step(self, model: VAEGAN, optimizers: dict, batch: dict, step: int, lr: float, device) -> dict:
        """One step through the shared update path (vidtron/platform/update.py), as the trainer takes it: the VAE's
        update and (after vae.disc_start steps) the discriminator's; metrics as dp-mean floats."""
        policy = UpdatePolicy(grad_clip=self.optim.grad_clip, dp_group=self.group, mean_group=self.group)
        device = torch.device(device)
        result = run_phases(self.phases(model, batch, step, device), optimizers, lr, step, policy, device.type)
        return {"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics}

    def loss(self, model: VAEGAN, batch: dict, device: torch.device, step: int = 0) -> torch.Tensor:
        """The VAE's total loss on `batch` at `step` (the adversarial term counts once step > vae.disc_start)."""
        self.objective.to(device)
        batch = self._to(batch, device)
        tiling = tiling_kwargs(self.cfg) if batch["tiled"] else None
        recon, mean, logvar = reconstruct(model.vae, batch["video"], batch["eps"], tiling)
        terms = self.objective.generator_terms(model.disc, batch["video"], recon, mean, logvar, step, model.last_layer)
        return terms["loss"]

    @staticmethod
    def _to(batch: dict, device) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
