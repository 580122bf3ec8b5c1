"""vidtron-sample: sample clips from a training checkpoint and write MP4 + GIF (+ the latents).

    vidtron-sample --run-dir runs/demo --prompt "a red circle moves left from the middle right" --out samples/
    vidtron-sample --ckpt runs/demo/checkpoints/step_000200 --prompt "..." --steps 30 --cfg-scale 5
    vidtron-sample --run-dir runs/demo --prompt "..." --tp 2 --cp 2 --cp-mode ulysses --nproc 4
    vidtron-sample --run-dir runs/demo --prompt "..." --attention ssta --ssta-topk 64 --ssta-lambda 0.7
    vidtron-sample --run-dir runs/demo --prompt "..." --tile auto --tile-size 256 --tile-frames 17   # VAE decode
    vidtron-sample --run-dir runs/i2v --prompt "the circle starts to move" --image first.png   # image-to-video

The checkpoint's manifest supplies the model flavor, text encoder, clip shape and data root (for the
autoencoder that decodes the latents); any saved layout loads into any sampling layout. With `--nproc K > 1`
the command re-runs itself under torchrun; every rank builds the DiT, applies the TP / CP layout (no FSDP: one
data stream), loads the weights into its shards and runs the same Euler steps from the same seeded noise; rank 0
decodes and writes the files. CPU (gloo) only for now.

`--attention ssta` runs SSTA block-sparse attention (HunyuanVideo 1.5; vidtron/kernels/ssta/) in every block: tiles
of --ssta-tile tokens (default (6, 8, 8); (1, 16, 24) for one latent frame), a --ssta-window sliding window of tiles
(default (3, 3, 3); (1, 1, 1) for one frame) OR the --ssta-topk tiles by lambda-weighted similarity / redundancy
(64, halved for <= 31 latent frames unless --no-ssta-halve-topk). One process, --tp, and --cp-mode ulysses (SSTA runs
after the all-to-all on every video token of the rank's heads, so the masks are the single-process ones); ring and
usp are refused. Decoding with a causal VAE (data.vae) is tiled per --tile (see vidtron/launch/encode.py).

`--image` (a run trained with model.image_condition=token_replace, and only such a run): the image (png / jpg, or a
gif's first frame), resized to the clip size, is encoded alone by the run's autoencoder (a causal VAE encodes a
first frame by itself, as does the stand-in) into latent frame 0, which stays fixed while the other frames are sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from vidtron.errors import ConfigError
from vidtron.kernels.ssta import SSTAOptions
from vidtron.launch.cli import user_errors
from vidtron.launch.encode import VAETiling, add_tile_arguments, build_tiled_encoder, tiling_from_args
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import DiTConfig, dit_config
from vidtron.models.dit.parallelize import ParallelizeOptions, parallelize_dit
from vidtron.models.text.encoders import build_text_encoder
from vidtron.parallel.dims import ParallelDims
from vidtron.platform.checkpoint import latest_valid_checkpoint, load_model_weights, read_manifest
from vidtron.platform.config import ModelConfig
from vidtron.platform.distributed import DistContext, init_distributed, shutdown
from vidtron.platform.video_io import to_uint8_frames, write_gif, write_mp4
from vidtron.recipes.dit_t2v.data import videos_to_tensor
from vidtron.recipes.dit_t2v.sampling import SampleOptions, sample_latents


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


def model_config(cfg: dict) -> DiTConfig:
    """The DiTConfig a checkpoint's manifest config describes (flavor plus the saved size overrides)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in cfg["model"].items() if k in known})  # older manifests lack fields
    return dit_config(model_cfg.flavor, model_cfg.arch_overrides())


def load_for_sampling(
    ckpt: Path,
    dims: ParallelDims | None = None,
    device: str = "cpu",
    weights: str = "model",
    parallel: ParallelizeOptions | None = None,
) -> tuple[DiT, dict]:
    """The checkpoint's DiT in eval mode on `device`: single-device, or laid out by `dims` (mesh built on the same
    device type) when it has > 1 rank; `weights` = "model" (the trained weights) or "ema" (their EMA); `parallel`:
    the attention core (`attention="ssta"` + `ssta` options; default dense), always with inference=True."""
    cfg = read_manifest(ckpt)["config"]
    opts = dataclasses.replace(parallel or ParallelizeOptions(), inference=True)
    with torch.device("meta"):
        model = DiT(model_config(cfg))
    if dims is not None and dims.world_size > 1:
        parallelize_dit(model, dims, opts)
    elif opts.attention != "dense":  # one process: no mesh needed, parallelize_dit only swaps the cores
        parallelize_dit(model, dims or ParallelDims(), opts)
    model.to_empty(device=device)
    load_model_weights(ckpt, model, root=_weights_root(ckpt, weights))
    return model.eval(), cfg


def _weights_root(ckpt: Path, weights: str) -> str:
    """The checkpoint's top-level key of the chosen weights, refusing EMA weights a run did not keep."""
    if weights not in ("model", "ema"):
        raise ConfigError("--weights", weights, "choose model or ema")
    if weights == "ema" and not read_manifest(ckpt)["config"]["trainer"].get("ema_decay", 0.0):
        raise ConfigError("--weights", weights, f"{ckpt} has no EMA weights: train with trainer.ema_decay > 0")
    return weights


def clip_shape(cfg: dict, frames: int = 0, height: int = 0, width: int = 0) -> tuple[int, int, int]:
    """(frames, height, width) in pixels: the arguments, or the run's data shape where they are 0."""
    data = cfg["data"]
    return frames or data["frames"], height or data["height"], width or data["width"]


def latent_shape_for(dcfg: DiTConfig, clip: tuple[int, int, int]) -> tuple[int, int, int, int]:
    frames, height, width = clip
    return (dcfg.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8)  # [C, F, H, W]


def generate_latents(
    ckpt: Path,
    prompts: list[str],
    opts: SampleOptions,
    dims: ParallelDims | None = None,
    clip=(0, 0, 0),
    device="cpu",
    weights: str = "model",
    parallel: ParallelizeOptions | None = None,
    image_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Latents [B, C, F, H, W] for `prompts` from checkpoint `ckpt`, on this process or on every rank of `dims`
    (same seeded noise everywhere, so every rank returns the same latents); also the manifest config. `parallel`
    picks the attention core (see `load_for_sampling`); `image_latents` [1, C, 1, H, W] (an image-to-video run,
    `encode_image`) is latent frame 0 of every clip."""
    model, cfg = load_for_sampling(ckpt, dims, device, weights, parallel)
    dcfg, tcfg = model.config, cfg["text"]
    encoder = build_text_encoder(tcfg, dcfg.text_dim, dcfg.pooled_dim)
    shape = latent_shape_for(dcfg, clip_shape(cfg, *clip))
    text, uncond = encoder.encode(prompts).to(device), encoder.encode([""]).to(device)
    z = sample_latents(model, text, uncond, shape, opts, dcfg.guidance_embeds, image_latents)
    return z.cpu(), cfg


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file (png / jpg; a gif's or other multi-frame file's first frame) as a one-frame clip
    [1, 3, 1, height, width] in [-1, 1], resized (bicubic) when its size differs."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # the first frame of a multi-frame file
    except OSError as err:
        raise ConfigError("--image", str(path), f"cannot be read as an image ({err})") from err
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return videos_to_tensor([np.asarray(rgb)[None]])  # [1, 3, 1, H, W]


def encode_image(path: str | Path, cfg: dict, clip=(0, 0, 0), data_root: str = "", tiling=None) -> torch.Tensor:
    """The reference latent [1, C, 1, h, w] of an image-to-video sample: the image, at the clip's size, encoded
    alone by the run's autoencoder (causal VAE or stand-in: both encode a first frame by itself)."""
    _, height, width = clip_shape(cfg, *clip)
    codec = build_tiled_encoder(data_root or cfg["data"]["root"], cfg["data"].get("vae", ""), tiling)
    return codec(read_image(path, height, width))[:, :, :1]


def decode_latents(z: torch.Tensor, cfg: dict, data_root: str = "", tiling: VAETiling | None = None) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] of latents z, by the run's VAE (its causal VAE when data.vae was set, tiled per
    `tiling` (default: auto), else the stand-in autoencoder of the data root, never tiled)."""
    codec = build_tiled_encoder(data_root or cfg["data"]["root"], cfg["data"].get("vae", ""), tiling)
    return codec.decode(z)


def write_samples(
    z: torch.Tensor,
    prompts: list[str],
    cfg: dict,
    out: Path,
    data_root: str = "",
    tiling: VAETiling | None = None,
) -> list[Path]:
    """Decode latents with the run's VAE (`decode_latents`); write latents.safetensors and per prompt MP4, GIF and
    caption."""
    video = decode_latents(z, cfg, data_root, tiling)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": z.contiguous()}, str(out / "latents.safetensors"))
    written = [out / "latents.safetensors"]
    for i, prompt in enumerate(prompts):
        frames_u8 = to_uint8_frames(video[i])
        written += [
            write_mp4(frames_u8, out / f"sample_{i}.mp4"),
            write_gif(frames_u8, out / f"sample_{i}.gif", scale=4),
        ]
        (out / f"sample_{i}.txt").write_text(prompt + "\n")
    return written


def _options(a: argparse.Namespace) -> SampleOptions:
    d = SampleOptions()
    cfg_scale, guidance = (
        (d.cfg_scale if a.cfg_scale is None else a.cfg_scale),
        (d.guidance if a.guidance is None else a.guidance),
    )
    return SampleOptions(steps=a.steps, shift=a.shift, cfg_scale=cfg_scale, guidance=guidance, seed=a.seed)


def _dims3(flag: str, text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3:
        raise ConfigError(flag, text, "give three integers T,H,W, e.g. 6,8,8")
    return dims


def attention_options(a: argparse.Namespace) -> ParallelizeOptions:
    """The attention core of the run (--attention and the --ssta-* flags), as sampling ParallelizeOptions."""
    ssta = SSTAOptions(
        tile=_dims3("--ssta-tile", a.ssta_tile),
        window=_dims3("--ssta-window", a.ssta_window),
        topk=a.ssta_topk,
        halve_topk=a.ssta_halve_topk,
        lam=a.ssta_lambda,
        backend=a.ssta_backend,
    )
    return ParallelizeOptions(inference=True, attention=a.attention, ssta=ssta)


def sample_to_files(
    a: argparse.Namespace, dims: ParallelDims | None = None, is_main: bool = True, device="cpu"
) -> list[Path]:
    ckpt = _resolve_checkpoint(a)
    clip, attn = (a.frames, a.height, a.width), attention_options(a)
    image = None
    if a.image:
        image = encode_image(a.image, read_manifest(ckpt)["config"], clip, a.data_root, tiling_from_args(a))
    z, cfg = generate_latents(ckpt, a.prompt, _options(a), dims, clip, device, a.weights, attn, image)
    return write_samples(z, a.prompt, cfg, Path(a.out), a.data_root, tiling_from_args(a)) if is_main else []


def _dims(a: argparse.Namespace) -> ParallelDims:
    return ParallelDims(dp_shard=1, tp=a.tp, cp=a.cp, cp_mode=a.cp_mode)


def preflight(a: argparse.Namespace, world_size: int) -> ParallelDims:
    """Check the layout against the process count, the checkpoint's heads / MLP and the clip's tokens, before
    any process group starts."""
    dims = _dims(a)
    attention_options(a).check_layout(dims, cp_mode_field="--cp-mode")
    tiling = tiling_from_args(a)
    if world_size != dims.world_size:
        raise ConfigError(
            "--nproc", world_size, f"must equal --tp * --cp = {dims.world_size} (layout {dims.layout_name})"
        )
    cfg = read_manifest(_resolve_checkpoint(a))["config"]
    if tiling.mode == "on" and not cfg["data"].get("vae"):
        fix = "this run decodes with the stand-in autoencoder (no data.vae), which maps each patch alone: no tiling"
        raise ConfigError("--tile", tiling.mode, fix)
    dcfg = model_config(cfg)
    check_image_argument(a.image, dcfg)
    check_guidance_arguments(a.cfg_scale, a.guidance, dcfg)
    _, f, h, w = latent_shape_for(dcfg, clip_shape(cfg, a.frames, a.height, a.width))
    pt, p, _ = dcfg.patch
    dims.validate_for(dcfg.num_heads, (f // pt) * (h // p) * (w // p), dcfg.mlp_hidden)
    return dims


def check_guidance_arguments(cfg_scale: float | None, guidance: float | None, dcfg: DiTConfig) -> None:
    """--cfg-scale for models without a guidance embedding, --guidance for models with one: the other would be
    silently ignored (a guidance-distilled student runs one forward per step and reads its scale as an input)."""
    if dcfg.guidance_embeds and cfg_scale not in (None, 1.0):
        fix = f"this model embeds the guidance scale (one forward per step): give --guidance {cfg_scale} instead"
        raise ConfigError("--cfg-scale", cfg_scale, fix)
    if not dcfg.guidance_embeds and guidance is not None:
        fix = "this model has no guidance embedding: give --cfg-scale (classifier-free guidance) instead"
        raise ConfigError("--guidance", guidance, fix)


def check_image_argument(image: str | None, dcfg: DiTConfig) -> None:
    """--image exactly when the checkpoint is an image-to-video DiT, naming an existing file."""
    if image and not dcfg.image_condition:
        fix = "this checkpoint is text-to-video; --image needs a run trained with model.image_condition=token_replace"
        raise ConfigError("--image", image, fix)
    if not image and dcfg.image_condition:
        fix = f"this checkpoint is image-to-video ({dcfg.image_condition}): give --image PATH (png, jpg or gif)"
        raise ConfigError("--image", image, fix)
    if image and not Path(image).is_file():
        raise ConfigError("--image", image, "no such file")


def _without_nproc(argv: list[str]) -> list[str]:
    """argv minus --nproc: the ranks do not need it, and torchrun's parser rejects it as an ambiguous prefix."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def spawn_local(a: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with --nproc processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    cmd += ["-m", "vidtron.launch.sample", *_without_nproc(argv)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_distributed(a: argparse.Namespace) -> list[Path]:
    """This rank's part of a multi-process sampling run (the group is started here and left on return)."""
    dims = preflight(a, int(os.environ["WORLD_SIZE"]))
    ctx = init_distributed()
    try:
        dims.build_mesh(ctx.device.type)
        return sample_to_files(a, dims, ctx.is_main, ctx.device)
    finally:
        shutdown(ctx)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidtron-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="a committed checkpoint folder (step_N)")
    p.add_argument("--run-dir", help="a run folder: its newest valid checkpoint is used")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several clips")
    p.add_argument("--out", default="samples")
    p.add_argument("--image", default=None, help="image-to-video runs: the first frame (png / jpg / gif's first)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shift", type=float, default=None, help="time shift (default: 17 under 20 steps, else 7)")
    d = SampleOptions()
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help=f"classifier-free guidance, 2 forwards per step (default {d.cfg_scale})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"guidance-embedding scale of guidance-distilled models, 1 forward per step (default {d.guidance})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="model", help="model (trained weights) or ema (trainer.ema_decay > 0 runs)")
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--data-root", default="", help="folder with autoencoder.safetensors (default: the run's data.root)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (must divide the heads)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks")
    p.add_argument("--cp-mode", default="ring", help="ring | ulysses | usp")
    p.add_argument("--nproc", type=int, default=1, help="local processes (= tp * cp); > 1 re-runs under torchrun")
    _add_attention_arguments(p)
    add_tile_arguments(p)
    return p


def _add_attention_arguments(p: argparse.ArgumentParser) -> None:
    s = SSTAOptions()
    p.add_argument("--attention", default="dense", choices=("dense", "ssta"), help="dense, or SSTA block-sparse")
    p.add_argument("--ssta-tile", default=None, help="tokens per tile T,H,W (default 6,8,8; 1,16,24 for one frame)")
    p.add_argument("--ssta-window", default=None, help="sliding window in tiles (default 3,3,3; 1,1,1 for one frame)")
    p.add_argument("--ssta-topk", type=int, default=s.topk, help="selective key tiles per query tile")
    p.add_argument(
        "--ssta-halve-topk", default=s.halve_topk, action=argparse.BooleanOptionalAction, help="for <= 31 frames"
    )
    p.add_argument("--ssta-lambda", type=float, default=s.lam, help="similarity vs redundancy weight")
    p.add_argument("--ssta-backend", default=s.backend, choices=("torch", "triton"), help="block-sparse kernel")


@user_errors("vidtron-sample")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    if a.steps < 1:
        raise ConfigError("--steps", a.steps, "must be >= 1")
    if _under_launcher() and int(os.environ["WORLD_SIZE"]) > 1:
        written = run_distributed(a)
    elif a.nproc > 1:
        preflight(a, a.nproc)
        return spawn_local(a, argv)
    else:
        preflight(a, 1)
        written = sample_to_files(a)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
