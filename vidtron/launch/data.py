"""vidtron-data: dataset tools.

vidtron-data synth --out DIR --clips N --frames F --height H --width W --seed S
    generated clips of moving coloured shapes with captions, as webdataset shards, plus the stand-in
    autoencoder (PCA over 4x8x8 patches) fitted on them. The folder appears complete or not at all.
    --format mp4|webm writes encoded videos (1-frame clips as png); --durations 5,9,17 --sizes 64x64,48x80
    draw each clip's length and size from those lists (variable shapes for data.format=video buckets).
    --holdout red:circle:right,blue:square:up keeps those colour:shape:direction combos out of the clips
    (listed in DIR/holdout.json) so a model can be scored on captions it never saw. --latent-channels C fits a
    C-channel stand-in (default 16, the causal VAE's; train on it with model.latent_channels=C). --shape-size
    0.18,0.25 draws the shapes' radii from that range (fractions of min(H, W); default 0.12,0.2).
vidtron-data fit-ae --root DIR [--latent-channels C]
    (re)fit the stand-in autoencoder on the clips in DIR.
vidtron-data encode --root DIR --out DIR2 [--buckets 9x64x64,1x64x64] [--vae FOLDER] [--rank R --world W]
    run the VAE (stand-in of DIR, or a CausalVAE folder) and the text encoder over DIR once and write latent
    shards for data.format=latent; ranks split the samples (--rank/--world, else torchrun's RANK/WORLD_SIZE).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from vidtron.errors import ConfigError
from vidtron.launch.cli import user_errors
from vidtron.launch.encode import add_encode_parser, run_encode
from vidtron.models.vae.patch_pca import CHANNELS, PatchPCAAutoencoder
from vidtron.platform.config import check_clip_shape
from vidtron.platform.data.index import write_tar
from vidtron.platform.data.shards import write_shard
from vidtron.platform.data.synth import clip_spec, render_clip, size_range_text
from vidtron.platform.data.synth_media import (
    FORMATS,
    fit_clips,
    media_sample,
    parse_durations,
    parse_holdout,
    parse_size_range,
    parse_sizes,
)
from vidtron.recipes.dit_t2v.data import AE_FILE, videos_to_tensor

HOLDOUT_FILE = "holdout.json"
LATENT_HELP = "the stand-in autoencoder's latent channels (train with model.latent_channels to match; 16 = the VAE's)"


def _check_synth_args(a: argparse.Namespace) -> None:
    if a.clips < 1:
        raise ConfigError("--clips", a.clips, "must be >= 1")
    check_clip_shape(a.frames, a.height, a.width, ("--frames", "--height", "--width"))
    if a.shard_size < 1:
        raise ConfigError("--shard-size", a.shard_size, "must be >= 1")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise ConfigError("--out", str(out), "is not empty; pass --overwrite or choose another folder")


def fit_autoencoder(root: Path, seed: int = 0, channels: int = CHANNELS) -> None:
    ae = PatchPCAAutoencoder(channels).fit(videos_to_tensor(fit_clips(root)), seed=seed)
    tmp = root / (AE_FILE + ".tmp")
    save_file(dict(ae.state_dict()), str(tmp))
    os.replace(tmp, root / AE_FILE)


def synth(a: argparse.Namespace) -> Path:
    _check_synth_args(a)
    out = Path(a.out)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    holdout, size_range = parse_holdout(a.holdout), parse_size_range(a.shape_size)
    staging.mkdir(parents=True)
    if holdout:
        _write_holdout(staging, holdout)
    for first in range(0, a.clips, a.shard_size):
        if a.format != "npy" or a.durations or a.sizes:  # encoded media and/or varied shapes
            durations = parse_durations(a.durations) if a.durations else [a.frames]
            sizes = parse_sizes(a.sizes) if a.sizes else [(a.height, a.width)]
            ids = range(first, min(first + a.shard_size, a.clips))
            samples = [
                media_sample(a.seed, i, a.format, durations, sizes, holdout=holdout, size_range=size_range) for i in ids
            ]
            write_tar(staging / f"shard-{first // a.shard_size:05d}.tar", samples)
            continue
        samples = []
        for i in range(first, min(first + a.shard_size, a.clips)):
            spec = clip_spec(a.seed, i, holdout, size_range)
            meta = {
                "caption": spec.caption,
                "shape": spec.shape,
                "colour": spec.colour,
                "direction": spec.direction,
                "frames": a.frames,
                "height": a.height,
                "width": a.width,
                "seed": a.seed,
                "index": i,
            }
            samples.append((f"{i:07d}", render_clip(spec, a.frames, a.height, a.width), meta))
        write_shard(staging / f"shard-{first // a.shard_size:05d}.tar", samples)
    fit_autoencoder(staging, a.seed, a.latent_channels)
    _swap_in(staging, out)
    return out


def _write_holdout(root: Path, holdout: frozenset) -> None:
    """DIR/holdout.json: the colour:shape:direction combos no clip in DIR shows."""
    (root / HOLDOUT_FILE).write_text(json.dumps({"holdout": sorted(":".join(c) for c in holdout)}, indent=1) + "\n")


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the complete `staging` folder (the old one is removed only afterwards)."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidtron-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write generated clips as webdataset shards")
    s.add_argument("--out", required=True)
    s.add_argument("--clips", type=int, default=64)
    s.add_argument("--frames", type=int, default=9)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=32, help="clips per shard")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.add_argument("--format", choices=FORMATS, default="npy", help="npy arrays (default) or encoded mp4 / webm")
    s.add_argument("--durations", default="", help="frame counts to draw from, e.g. 5,9,17 (1 = png images)")
    s.add_argument("--sizes", default="", help="HxW sizes to draw from, e.g. 64x64,48x80")
    s.add_argument("--holdout", default="", help="colour:shape:direction combos no clip shows, e.g. red:circle:right")
    s.add_argument("--latent-channels", type=int, default=CHANNELS, help=LATENT_HELP)
    s.add_argument("--shape-size", default=size_range_text(), help="shape radius range lo,hi as fractions of min(H, W)")
    add_encode_parser(sub)
    f = sub.add_parser("fit-ae", help="fit the stand-in autoencoder on the clips in --root")
    f.add_argument("--root", required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--latent-channels", type=int, default=CHANNELS, help=LATENT_HELP)
    return p


@user_errors("vidtron-data")
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "synth":
        out = synth(a)
        print(f"wrote {a.clips} clips to {out}")
    elif a.cmd == "encode":
        print(run_encode(a))
    elif a.cmd == "fit-ae":
        fit_autoencoder(Path(a.root), a.seed, a.latent_channels)
        print(f"wrote {Path(a.root) / AE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
