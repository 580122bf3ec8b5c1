"""What the trainer trains for recipe dit_cfg_distill: a guidance-embedded student matching a frozen teacher's CFG.

The batch is dit_t2v's (same keyed draws of noise, time and caption dropout); the guidance scale g is drawn per
sample from [distill.guidance_min, distill.guidance_max] by the same keyed generator. The target is the teacher's
u + g (c - u) at the same noisy latents and timestep; loss = MSE(student(x_t, t, c, guidance=g), target). The
teacher belongs to the task, not to the model the trainer sees: it is neither optimised nor checkpointed.
Legend: b local batch, C latent channels, F latent frames, H, W latent height/width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidtron.models.dit import DiT
from vidtron.parallel.materialize import materialize
from vidtron.platform.init_from import init_from
from vidtron.recipes.dit_cfg_distill.teacher import cfg_velocity, load_teacher, student_config
from vidtron.recipes.dit_t2v.flow_matching import noisy_latents, timestep_from_sigma
from vidtron.recipes.dit_t2v.task import DiTTextToVideo

TEACHER_FORWARD_SHARE = 2.0 / 3.0  # two teacher forwards (cond + uncond) per sample vs 3 forwards of a train step


class DiTCFGDistill(DiTTextToVideo):
    """dit_t2v's data and layout with a CFG-distillation loss; `self.teacher` is set when the model materialises."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dit_cfg = student_config(cfg)
        self.teacher: DiT | None = None
        self._dims = None

    @property
    def flops_per_sample(self) -> float:
        """The student's training FLOPs plus the teacher's two forwards."""
        return super().flops_per_sample * (1.0 + TEACHER_FORWARD_SHARE)

    def parallelize(self, model: DiT, dims, opts) -> DiT:
        self._dims = dims  # the teacher gets the same layout in `materialize`
        return super().parallelize(model, dims, opts)

    def materialize(self, model: DiT, device: torch.device) -> DiT:
        """The student: its own init (seeded), then every teacher tensor copied in (strict=False: the guidance MLP
        keeps its init) unless model.init_from names other weights; then the frozen teacher on `device`."""
        materialize(model, device, model.init_function(self.cfg.seed))
        if self.cfg.model.init_from:  # a whole student (e.g. an earlier distillation run)
            init_from(model, self.cfg.model.init_from, kind="dit")
        else:
            init_from(model, self.cfg.distill.teacher_from, kind="dit", strict=False)
        self.teacher = load_teacher(self.cfg, self._dims, device)
        return model

    def guidance_range(self) -> tuple[float, float]:
        """dit_t2v's draws (same order from the keyed generator), with g from the distill range."""
        return self.cfg.distill.guidance_min, self.cfg.distill.guidance_max

    def target(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The teacher's CFG velocity u + g (c - u) at the batch's noisy latents and timestep [b, C, F, H, W]."""
        x1, x0, sigma = batch["latents"].to(device), batch["noise"].to(device), batch["sigma"].to(device)
        uncond = self.stream.uncond if self.stream is not None else self.data.uncond
        g_b = batch["guidance"].to(device) / 1000.0  # diffusers units -> scale
        x_t, timestep = noisy_latents(x1, x0, sigma), timestep_from_sigma(sigma)
        return cfg_velocity(self.teacher, x_t, timestep, batch["text"].to(device), uncond.to(device), g_b)

    def loss(self, model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        """This rank's share of the mean MSE between the student's guided velocity and the teacher's CFG target."""
        x1, x0, sigma = batch["latents"].to(device), batch["noise"].to(device), batch["sigma"].to(device)
        text = batch["text"].to(device)
        target = self.target(batch, device)  # [b, C, F, H, W], no grad
        v = model(
            noisy_latents(x1, x0, sigma),
            timestep_from_sigma(sigma),
            text.states,
            text.mask,
            text.pooled,
            batch["guidance"].to(device),
        )
        if "weight" not in batch:
            return F.mse_loss(v.float(), target)
        per_sample = (v.float() - target).pow(2).flatten(1).mean(1)  # [b]
        return (per_sample * batch["weight"].to(device)).sum() * batch["loss_scale"]
