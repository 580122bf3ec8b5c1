"""VAERecipeConfig: the `vae:` section of `vidtron-train recipe=vae` (losses, discriminator, curriculum, tiling).

Loss = l1_weight * L1 + l2_weight * MSE + lpips_weight * LPIPS
       + adv_weight * lambda_adapt * hinge-G (after disc_start steps) + kl_weight * KL,
with HunyuanVideo's weights 1, 0, 0.1, 0.05, 1e-6 as defaults (MSE off: HunyuanVideo uses L1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vidtron.errors import ConfigError
from vidtron.models.dit.configs import check_frames
from vidtron.platform.config import TrainConfig


@dataclass
class CurriculumStage:
    """One curriculum stage: clips of `frames` x `height` x `width` up to and including step `until_step`."""

    until_step: int = 0  # last optimizer step of this stage (1-based); the last stage runs to the end regardless
    frames: int = 9  # pixel frames per video sample: 4k+1 (image steps always use 1 frame)
    height: int = 64  # pixels, a multiple of 8 (the VAE's spatial compression)
    width: int = 64  # pixels, a multiple of 8

    def check(self, where: str) -> None:
        """Raise ConfigError (naming `where`, e.g. `vae.stages[1]`) unless the sizes fit the causal VAE."""
        check_frames(self.frames, f"{where}.frames")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ConfigError(
                    f"{where}.{name}", value, f"must be a positive multiple of 8 (e.g. {max(8, value // 8 * 8)})"
                )


@dataclass
class VAERecipeConfig:
    """Training a causal 3D VAE: model flavor, loss weights, discriminator, data mixing, curriculum, tiling."""

    flavor: str = "vae-tiny"  # a name from vidtron.models.vae.configs.FLAVORS
    init_from: str = ""  # start from these weights: a diffusers AutoencoderKLHunyuanVideo folder, our safetensors
    # (vidtron-export), or a recipe=vae checkpoint folder (step_N: model weights only); "" = the flavor's random init
    # ---- loss weights (HunyuanVideo: L1 + 0.1 LPIPS + 0.05 adversarial + 1e-6 KL) ----
    l1_weight: float = 1.0  # pixel L1
    l2_weight: float = 0.0  # pixel MSE; off by default (HunyuanVideo: L1 only). Without LPIPS, L1 alone stalls at
    # the per-pixel median (the background) on sparse content, so short runs (`make vae-demo`) add it
    lpips_weight: float = 0.1  # perceptual term; needs lpips_path, else it is off (one warning)
    adv_weight: float = 0.05  # hinge generator term, times the VQGAN adaptive weight
    kl_weight: float = 1e-6  # KL(q(z|x) || N(0, I)), summed over latent dims, mean over the batch
    lpips_path: str = ""  # local safetensors: VGG16 `features.N.*` + heads `linK.model.1.weight`; never downloaded
    lpips_frames: int = 0  # LPIPS on at most this many evenly spaced frames per clip; 0 = every frame
    # ---- discriminator (3D PatchGAN, hinge loss) ----
    disc_start: int = 2000  # the adversarial term and discriminator updates start after this many steps
    disc_channels: int = 64  # channels of the discriminator's first conv (doubling per layer, capped at 8x)
    disc_layers: int = 3  # stride-2 layers of the discriminator
    disc_lr_scale: float = 1.0  # discriminator LR = the scheduled optim.lr * this
    disc_beta1: float = 0.5  # discriminator AdamW betas (VQGAN's 0.5, 0.9)
    disc_beta2: float = 0.9
    adaptive_weight_max: float = 1e4  # clamp of the adaptive weight ||grad nll|| / ||grad G||
    # ---- data ----
    image_ratio: float = 0.2  # probability that a step trains on images (1-frame clips): video:image = 4:1
    max_frame_interval: int = 8  # frame stride drawn from 1..this (capped by what the clip length allows)
    sample_posterior: bool = True  # decode z ~ q(z|x) (False: decode the mean)
    stages: list[CurriculumStage] = field(default_factory=list)  # curriculum; empty = one stage of data.frames/h/w
    # ---- tiling ----
    random_tiling_p: float = 0.0  # probability that a step encodes / decodes tiled (the final fine-tune uses > 0)
    tile_size: int = 256  # spatial tile edge in pixels (a multiple of 8)
    tile_frames: int = 17  # temporal tile length in frames (4k+1)
    tile_overlap: float = 0.25  # fraction of a tile shared with its neighbour

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "lpips_weight", "adv_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"vae.{name}", getattr(self, name), "must be >= 0 (0 turns the term off)")
        for name, lo in (("disc_start", 0), ("disc_channels", 1), ("disc_layers", 1), ("lpips_frames", 0)):
            if getattr(self, name) < lo:
                raise ConfigError(f"vae.{name}", getattr(self, name), f"must be an integer >= {lo}")
        for name in ("image_ratio", "random_tiling_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"vae.{name}", getattr(self, name), "must be a probability in [0, 1]")
        if self.max_frame_interval < 1:
            raise ConfigError("vae.max_frame_interval", self.max_frame_interval, "must be >= 1 (1 = consecutive)")
        if self.disc_lr_scale <= 0:
            raise ConfigError("vae.disc_lr_scale", self.disc_lr_scale, "must be > 0")
        self._check_tiles()
        self._check_stages()

    def _check_tiles(self) -> None:
        if self.tile_size < 8 or self.tile_size % 8:
            raise ConfigError("vae.tile_size", self.tile_size, "must be a positive multiple of 8 pixels, e.g. 256")
        if self.tile_frames < 5 or (self.tile_frames - 1) % 4:
            raise ConfigError("vae.tile_frames", self.tile_frames, "must be 4k+1 with k >= 1, e.g. 17")
        if not 0.0 <= self.tile_overlap <= 0.5:
            raise ConfigError("vae.tile_overlap", self.tile_overlap, "must be in [0, 0.5] (0.25 by default)")

    def _check_stages(self) -> None:
        last = 0
        for i, stage in enumerate(self.stages):
            stage.check(f"vae.stages[{i}]")
            if i < len(self.stages) - 1 and stage.until_step <= last:
                raise ConfigError(
                    f"vae.stages[{i}].until_step",
                    stage.until_step,
                    f"must be > {last}: stages are listed in step order",
                )
            last = stage.until_step


@dataclass
class VAETrainConfig(TrainConfig):
    """The schema of `vidtron-train recipe=vae`: the run's sections plus `vae`."""

    vae: VAERecipeConfig = field(default_factory=VAERecipeConfig)  # losses, discriminator, curriculum, tiling
