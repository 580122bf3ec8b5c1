"""`vidtron-data encode`: VAE + text encoder over a dataset once -> latent shards for data.format=latent.

vidtron-data encode --root data/clips --out data/latents --buckets 9x64x64,17x48x80,1x64x64
torchrun --nproc_per_node 4 -m vidtron.launch.data encode --root ... --out ...   # ranks split the samples
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vidtron.models.text import build_text_encoder
from vidtron.platform.config import BucketConfig, DataConfig
from vidtron.platform.data.latents import EncodeJob, encode_dataset
from vidtron.platform.errors import ConfigError
from vidtron.recipes.dit_t2v.stream import build_latent_encoder
from vidtron.recipes.dit_t2v.task import dit_config


def parse_buckets(text: str) -> list[BucketConfig]:
    """Parse "9x64x64,1x64x64" into bucket shapes (frames x height x width)."""
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            frames, height, width = (int(v) for v in part.lower().split("x"))
        except ValueError as err:
            raise ConfigError("--buckets", text, "give FRAMESxHEIGHTxWIDTH shapes like 9x64x64,1x64x64") from err
        out.append(BucketConfig(frames, height, width, max_batch=1))
    if not out:
        raise ConfigError("--buckets", text, "give at least one shape, e.g. 9x64x64")
    return out


def add_encode_parser(sub) -> None:
    e = sub.add_parser("encode", help="write latent shards (VAE + text encoder) for data.format=latent")
    e.add_argument("--root", required=True, help="raw shards (npy / mp4 / webm / png samples with JSON captions)")
    e.add_argument("--out", required=True, help="folder for the latent shards (ranks may share it)")
    e.add_argument("--buckets", default="9x64x64", help="shapes FxHxW; each clip goes to its nearest bucket")
    e.add_argument("--frame-interval", type=int, default=1)
    e.add_argument("--vae", default="", help="CausalVAE folder (config.json + safetensors); default: the stand-in")
    e.add_argument("--flavor", default="dit-tiny", help="DiT flavor whose text dims the cached states match")
    e.add_argument("--text-encoder", default="byte", choices=("byte", "hf"))
    e.add_argument("--max-tokens", type=int, default=32)
    e.add_argument("--llm-path", default="")
    e.add_argument("--clip-path", default="")
    e.add_argument("--decoder", default="cpu", choices=("cpu", "dali"))
    e.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    e.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    e.add_argument("--shard-size", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)


def run_encode(a: argparse.Namespace) -> str:
    if not 0 <= a.rank < a.world:
        raise ConfigError("--rank", a.rank, f"must be in [0, --world={a.world})")
    data = DataConfig(
        root=a.root,
        format="video",
        decoder=a.decoder,
        buckets=parse_buckets(a.buckets),
        frame_interval=a.frame_interval,
        vae=a.vae,
    )
    dit = dit_config(a.flavor)
    text = build_text_encoder(a.text_encoder, dit.text_dim, dit.pooled_dim, a.max_tokens, a.llm_path, a.clip_path)
    job = EncodeJob(
        data=data,
        out=Path(a.out),
        encode_video=build_latent_encoder(a.root, a.vae),
        encode_text=text.encode,
        rank=a.rank,
        world=a.world,
        shard_size=a.shard_size,
        seed=a.seed,
    )
    stats = encode_dataset(job)
    return f"rank {a.rank}/{a.world}: wrote {stats['written']} latent samples to {a.out}; skipped {stats['skipped']}"
