"""The frozen teacher of recipe dit_cfg_distill: its architecture, its pre-launch checks and its CFG output.

Legend: b local batch, C latent channels, F latent frames, H, W latent height/width, T text tokens, D text width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import DiTConfig, dit_config
from vidtron.models.dit.parallelize import parallelize_dit
from vidtron.models.text.encoders import TextBatch
from vidtron.parallel.dims import ParallelDims
from vidtron.parallel.options import ParallelizeOptions
from vidtron.platform.checkpoint import read_manifest
from vidtron.platform.init_from import check_init_from, init_from, is_training_checkpoint

FIELD = "distill.teacher_from"


def student_config(cfg) -> DiTConfig:
    """The student's DiTConfig (model.flavor + overrides); it must embed the guidance scale."""
    student = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
    if not student.guidance_embeds:
        fix = "the student needs guidance_embeds=True: choose a guided flavor, e.g. dit-tiny-guided or dit-13b"
        raise ConfigError("model.flavor", cfg.model.flavor, fix)
    return student


def teacher_config(cfg) -> DiTConfig:
    """distill.teacher_flavor (+ the model's size overrides), or by default the student's shape without guidance."""
    if cfg.distill.teacher_flavor:
        return dit_config(cfg.distill.teacher_flavor, cfg.model.arch_overrides(), field="distill.teacher_flavor")
    return dataclasses.replace(student_config(cfg), guidance_embeds=False)


def check_teacher(cfg) -> None:
    """Before any process starts: the teacher's weights exist and fit the teacher (names and shapes, from headers /
    DCP metadata only), and the student shares every teacher tensor's shape. Every failure is one ConfigError."""
    path = cfg.distill.teacher_from
    if not path or not Path(path).exists():
        raise ConfigError(FIELD, path, "no such file or folder; give RUN/checkpoints/step_N of a dit_t2v run")
    with torch.device("meta"):
        teacher, student = DiT(teacher_config(cfg)), DiT(student_config(cfg))
    try:
        check_init_from(teacher, path, kind="dit")
    except ConfigError as err:  # re-labelled: the user set distill.teacher_from, not model.init_from
        raise ConfigError(FIELD, path, err.fix) from None
    shapes = {name: p.shape for name, p in student.named_parameters()}
    for name, p in teacher.named_parameters():
        if shapes.get(name) != p.shape:
            fix = f"teacher tensor {name} {tuple(p.shape)} has no same-shaped place in the student ({cfg.model.flavor})"
            raise ConfigError(FIELD, path, fix + "; give model.flavor the teacher's shape plus the guidance embedding")
    if is_training_checkpoint(path):
        check_text_encoder(cfg, read_manifest(Path(path))["config"].get("text", {}))


def check_text_encoder(cfg, teacher_text: dict) -> None:
    """The student must be conditioned by the caption encoder the teacher was trained with (device / dtype aside)."""
    for key, value in teacher_text.items():
        if key not in ("device", "dtype") and getattr(cfg.text, key, value) != value:
            fix = f"the teacher {cfg.distill.teacher_from} was trained with text.{key}={value!r}; use the same encoder"
            raise ConfigError(f"text.{key}", getattr(cfg.text, key), fix)


def load_teacher(cfg, dims: ParallelDims, device: torch.device) -> DiT:
    """The frozen teacher on `device`, laid out like the student (same `parallelize_dit`, same dims, inference
    options: no FSDP, no recompute) and filled from distill.teacher_from (a collective for checkpoint folders)."""
    with torch.device("meta"):
        teacher = DiT(teacher_config(cfg))
    parallelize_dit(teacher, dims, ParallelizeOptions(inference=True))
    teacher.to_empty(device=device)
    init_from(teacher, cfg.distill.teacher_from, kind="dit")
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def cfg_velocity(
    teacher: DiT, x_bCFHW: torch.Tensor, timestep_b: torch.Tensor, text: TextBatch, uncond: TextBatch, g_b: torch.Tensor
) -> torch.Tensor:
    """The teacher's classifier-free-guided velocity u + g (c - u) [b, C, F, H, W]; conditional and unconditional
    rows run as one batch (as in sampling). `uncond`: the empty caption, one row; `g_b`: the scale per sample."""
    b = x_bCFHW.shape[0]
    states = torch.cat([text.states, uncond.states.expand(b, -1, -1)])  # [2b, T, D]
    mask = torch.cat([text.mask, uncond.mask.expand(b, -1)])  # [2b, T]
    pooled = torch.cat([text.pooled, uncond.pooled.expand(b, -1)])  # [2b, P]
    v = teacher(torch.cat([x_bCFHW, x_bCFHW]), torch.cat([timestep_b, timestep_b]), states, mask, pooled)
    c, u = v[:b].float(), v[b:].float()  # [b, C, F, H, W] each
    return u + g_b.view(-1, 1, 1, 1, 1).float() * (c - u)
