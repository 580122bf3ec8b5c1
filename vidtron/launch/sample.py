"""vidtron-sample: sample clips from a training checkpoint and write MP4 + GIF (+ the latents).

    vidtron-sample --run-dir runs/demo --prompt "a red circle moves left from the middle right" --out samples/
    vidtron-sample --ckpt runs/demo/checkpoints/step_000200 --prompt "..." --steps 30 --cfg-scale 5

The checkpoint's manifest supplies the model flavor, text encoder, clip shape and data root (for the
autoencoder that decodes the latents); any saved layout loads into this single process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidtron.launch.cli import user_errors
from vidtron.models.dit import DiT
from vidtron.models.text.encoders import build_text_encoder
from vidtron.platform.checkpoint import latest_valid_checkpoint, load_model_weights, read_manifest
from vidtron.platform.distributed import DistContext
from vidtron.platform.errors import ConfigError
from vidtron.platform.video_io import to_uint8_frames, write_gif, write_mp4
from vidtron.recipes.dit_t2v.data import load_autoencoder
from vidtron.recipes.dit_t2v.sampling import SampleOptions, sample_latents
from vidtron.recipes.dit_t2v.task import dit_config


def _resolve_checkpoint(a: argparse.Namespace) -> Path:
    if a.ckpt:
        path = Path(a.ckpt)
        if not (path / "manifest.json").exists():
            raise ConfigError("--ckpt", a.ckpt, "is not a committed checkpoint folder (no manifest.json)")
        return path
    if not a.run_dir:
        raise ConfigError("--ckpt/--run-dir", None, "give a checkpoint folder or a run folder")
    path = latest_valid_checkpoint(a.run_dir, DistContext(0, 1, 0, torch.device("cpu")))
    if path is None:
        raise ConfigError("--run-dir", a.run_dir, "holds no committed checkpoint; train first")
    return path


def load_for_sampling(ckpt: Path) -> tuple[DiT, dict]:
    cfg = read_manifest(ckpt)["config"]
    model_cfg = cfg["model"]
    overrides = {k: v for k, v in model_cfg.items() if k in ("num_heads", "head_dim") and v > 0}
    overrides |= {k: v for k, v in model_cfg.items() if k in ("num_double_blocks", "num_single_blocks") and v >= 0}
    dit_cfg = dit_config(model_cfg["flavor"], overrides)
    with torch.device("meta"):
        model = DiT(dit_cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)
    return model.eval(), cfg


def sample_to_files(a: argparse.Namespace) -> list[Path]:
    ckpt = _resolve_checkpoint(a)
    model, cfg = load_for_sampling(ckpt)
    dcfg, tcfg = model.config, cfg["text"]
    encoder = build_text_encoder(
        tcfg["encoder"], dcfg.text_dim, dcfg.pooled_dim, tcfg["max_tokens"], tcfg["llm_path"], tcfg["clip_path"]
    )
    frames, height, width = (
        (a.frames or cfg["data"]["frames"]),
        (a.height or cfg["data"]["height"]),
        (a.width or cfg["data"]["width"]),
    )
    latent_shape = (dcfg.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8)
    opts = SampleOptions(steps=a.steps, shift=a.shift, cfg_scale=a.cfg_scale, guidance=a.guidance, seed=a.seed)
    z = sample_latents(model, encoder.encode(a.prompt), encoder.encode([""]), latent_shape, opts, dcfg.guidance_embeds)
    video = load_autoencoder(a.data_root or cfg["data"]["root"]).decode(z)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": z.contiguous()}, str(out / "latents.safetensors"))
    written = [out / "latents.safetensors"]
    for i, prompt in enumerate(a.prompt):
        frames_u8 = to_uint8_frames(video[i])
        written += [
            write_mp4(frames_u8, out / f"sample_{i}.mp4"),
            write_gif(frames_u8, out / f"sample_{i}.gif", scale=4),
        ]
        (out / f"sample_{i}.txt").write_text(prompt + "\n")
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidtron-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="a committed checkpoint folder (step_N)")
    p.add_argument("--run-dir", help="a run folder: its newest valid checkpoint is used")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several clips")
    p.add_argument("--out", default="samples")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shift", type=float, default=None, help="time shift (default: 17 under 20 steps, else 7)")
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--guidance", type=float, default=6.0, help="guidance-embedding scale for distilled flavors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--data-root", default="", help="folder with autoencoder.safetensors (default: the run's data.root)")
    return p


@user_errors("vidtron-sample")
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.steps < 1:
        raise ConfigError("--steps", a.steps, "must be >= 1")
    for path in sample_to_files(a):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
