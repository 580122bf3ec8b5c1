"""Training samples for the VAE recipe: curriculum stages, video:image mixing, frame-interval sampling.

Every step is either a video step or an image step (the whole global batch has one shape): image with probability
`image_ratio` (0.2 gives HunyuanVideo's video:image = 4:1). A video sample takes `frames` frames at a stride drawn
from 1..max_frame_interval (capped so the span fits the clip) from a random start; an image sample is one random
frame of a clip (a 1-frame video). Frames are then resized to cover the stage's height x width (bilinear,
antialiased) and randomly cropped to it. All draws come from generators keyed by (seed, step) for the step's
plan and (seed, step, position in the global batch) for a sample, so any data-parallel layout sees the same data.

Shape legend: N clips, F frames, H, W pixels, C = 3 channels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidtron.errors import ConfigError, DataError
from vidtron.platform.config import DataConfig
from vidtron.platform.data.shards import read_clips
from vidtron.recipes.vae.config import CurriculumStage, VAERecipeConfig


def generator(seed: int, *keys: object) -> torch.Generator:
    """A torch generator keyed by (seed, *keys): the same draw for the same step / sample on any layout."""
    text = "/".join(["vae", str(seed), *map(str, keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def resolve_stages(cfg: VAERecipeConfig, data: DataConfig) -> list[CurriculumStage]:
    """The configured curriculum, or one stage of data.frames x data.height x data.width."""
    if cfg.stages:
        return list(cfg.stages)
    return [CurriculumStage(until_step=0, frames=data.frames, height=data.height, width=data.width)]


def stage_at(stages: list[CurriculumStage], step: int) -> CurriculumStage:
    """The stage that optimizer step `step` (1-based) trains in: the first with step <= until_step, else the last."""
    for stage in stages[:-1]:
        if step <= stage.until_step:
            return stage
    return stages[-1]


def load_videos(root: str) -> torch.Tensor:
    """Every clip under `root` as one uint8 tensor [N, F, H, W, 3]; all clips must share a shape."""
    clips = read_clips(root)
    shape = clips[0].video.shape
    for clip in clips:
        if clip.video.shape != shape:
            raise DataError(
                f"data.root={root!r}: clip {clip.key!r} is {clip.video.shape}, {clips[0].key!r} is {shape}; "
                "the VAE recipe needs clips of one shape (regenerate with one --frames/--height/--width)"
            )
    return torch.from_numpy(np.stack([c.video for c in clips]))


def check_stages_fit(stages: list[CurriculumStage], videos: torch.Tensor) -> None:
    """Every stage's frame count must fit in a clip (the spatial size may be resized up or down)."""
    clip_frames = videos.shape[1]
    for i, stage in enumerate(stages):
        if stage.frames > clip_frames:
            raise ConfigError(
                f"vae.stages[{i}].frames",
                stage.frames,
                f"the clips have only {clip_frames} frames; use fewer or synth longer clips (--frames 33)",
            )


@dataclass(frozen=True)
class StepPlan:
    """What a whole global batch looks like at one step."""

    image: bool  # 1-frame clips (images) instead of videos
    tiled: bool  # encode / decode through the tiled path
    stage: CurriculumStage


def step_plan(step: int, seed: int, cfg: VAERecipeConfig, stages: list[CurriculumStage]) -> StepPlan:
    gen = generator(seed, step, "plan")
    image = bool(torch.rand((), generator=gen) < cfg.image_ratio)
    tiled = bool(torch.rand((), generator=gen) < cfg.random_tiling_p)
    return StepPlan(image=image, tiled=tiled, stage=stage_at(stages, step))


def frame_indices(clip_frames: int, frames: int, max_interval: int, gen: torch.Generator) -> torch.Tensor:
    """`frames` indices into a clip of `clip_frames`: a stride from 1..max_interval (capped so the span fits),
    a random start."""
    cap = (clip_frames - 1) // (frames - 1) if frames > 1 else 1
    stride = int(torch.randint(1, max(1, min(max_interval, cap)) + 1, (), generator=gen))
    start = int(torch.randint(0, clip_frames - (frames - 1) * stride, (), generator=gen))
    return torch.arange(frames) * stride + start


def resize_crop(video_CFHW: torch.Tensor, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Resize so the frames cover height x width (aspect kept), then crop a random height x width window."""
    _, _, h, w = video_CFHW.shape
    scale = max(height / h, width / w)
    if scale != 1.0:
        size = (max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale)))
        frames = video_CFHW.transpose(0, 1)  # [F, C, H, W]
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        video_CFHW = frames.transpose(0, 1)
        h, w = size
    top = int(torch.randint(0, h - height + 1, (), generator=gen))
    left = int(torch.randint(0, w - width + 1, (), generator=gen))
    return video_CFHW[:, :, top : top + height, left : left + width]


def draw_sample(
    videos_u8: torch.Tensor, index: int, plan: StepPlan, max_interval: int, gen: torch.Generator
) -> torch.Tensor:
    """One training sample [C, F, H, W] in [-1, 1] from clip `index` of uint8 [N, F, H, W, 3] clips."""
    clip = videos_u8[index]  # [F, H, W, 3]
    frames = 1 if plan.image else plan.stage.frames
    idx = frame_indices(clip.shape[0], frames, 1 if plan.image else max_interval, gen)
    x = clip[idx].permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [C, F, H, W]
    return resize_crop(x, plan.stage.height, plan.stage.width, gen).clamp(-1.0, 1.0).contiguous()
