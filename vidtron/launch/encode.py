"""`vidtron-data encode`: VAE + text encoder over a dataset once -> latent shards for data.format=latent.

vidtron-data encode --root data/clips --out data/latents --buckets 9x64x64,17x48x80,1x64x64
vidtron-data encode --root data/hd --out data/latents --vae exports/vae --tile auto --tile-size 256 --tile-frames 17
torchrun --nproc_per_node 4 -m vidtron.launch.data encode --root ... --out ...   # ranks split the samples

Tiling (`--tile auto|on|off`, also in vidtron-sample's decode) runs the causal VAE tile by tile
(vidtron/models/vae/tiling.py): bounded memory for long, large clips, at a small error against the untiled VAE
(GroupNorm and mid-block attention statistics differ per tile). `auto` tiles a clip longer than --tile-frames or
wider / taller than --tile-size. The stand-in PCA autoencoder (no --vae) maps each patch on its own, so its memory
is linear in the clip and tiles would give the same result: it is never tiled, and `--tile on` without a VAE is
refused.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.models.text import build_text_encoder
from vidtron.models.text.config import TEXT_ENCODERS
from vidtron.models.vae import CausalVAE
from vidtron.models.vae.tiling import TilePlan, tiled_decode, tiled_encode
from vidtron.platform.config import BucketConfig, DataConfig, TextConfig
from vidtron.platform.data.latents import EncodeJob, encode_dataset
from vidtron.recipes.dit_t2v.stream import LatentEncoder, build_latent_encoder
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


TILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class VAETiling:
    """When and how the causal VAE encodes / decodes tile by tile (sizes in pixels / frames of the video)."""

    mode: str = "auto"  # auto: tile a clip larger than one tile; on: always; off: never
    tile_size: int = 256  # spatial tile edge (a multiple of 8)
    tile_frames: int = 17  # temporal clip length (4k+1)
    overlap: float = 0.25  # fraction of a tile shared with its neighbour, in [0, 0.5]
    blend: bool = True  # ramp-blend the overlaps (False: cut them in the middle)

    def __post_init__(self) -> None:
        if self.mode not in TILE_MODES:
            raise ConfigError("--tile", self.mode, f"choose one of {list(TILE_MODES)}")

    def tiles(self, frames: int, height: int, width: int) -> bool:
        """Whether a clip of this size (pixels) goes through the VAE in tiles."""
        if self.mode != "auto":
            return self.mode == "on"
        return frames > self.tile_frames or height > self.tile_size or width > self.tile_size

    def spec(self) -> dict:
        return dict(tile_size=self.tile_size, tile_frames=self.tile_frames, overlap=self.overlap, blend=self.blend)


def add_tile_arguments(p) -> None:
    """--tile, --tile-size, --tile-frames, --tile-overlap, --tile-blend (VAETiling's fields; its defaults)."""
    t = VAETiling()
    p.add_argument("--tile", default=t.mode, choices=TILE_MODES, help="VAE tiling: auto (clips above a tile), on, off")
    p.add_argument("--tile-size", type=int, default=t.tile_size, help="VAE tile edge in pixels (a multiple of 8)")
    p.add_argument("--tile-frames", type=int, default=t.tile_frames, help="VAE tile length in frames (4k+1)")
    p.add_argument("--tile-overlap", type=float, default=t.overlap, help="overlap as a fraction of a tile (0..0.5)")
    p.add_argument("--tile-blend", default=t.blend, action=argparse.BooleanOptionalAction, help="ramp the overlaps")


def tiling_from_args(a: argparse.Namespace) -> VAETiling:
    return VAETiling(a.tile, a.tile_size, a.tile_frames, a.tile_overlap, a.tile_blend)


class TiledLatentEncoder(LatentEncoder):
    """A LatentEncoder whose causal VAE encodes and decodes in tiles when `tiling` says so (the stand-in
    autoencoder is never tiled: it maps each patch on its own)."""

    def __init__(self, model: torch.nn.Module, tiling: VAETiling):
        super().__init__(model)
        self.tiling, self.vae = tiling, model if isinstance(model, CausalVAE) else None
        if self.vae is None and tiling.mode == "on":
            fix = "the stand-in autoencoder maps each patch on its own and needs no tiling; tiling applies to --vae"
            raise ConfigError("--tile", tiling.mode, fix)
        if self.vae is not None and tiling.mode != "off":
            TilePlan.build(self.vae, tiling.tile_size, tiling.tile_frames, tiling.overlap)  # bad sizes fail now
        self.tiled_calls = 0  # how many encode / decode calls went through tiles

    @torch.no_grad()
    def __call__(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        if self.vae is None or not self.tiling.tiles(*video_BCFHW.shape[2:]):
            return super().__call__(video_BCFHW)
        self.tiled_calls += 1
        mean, _ = tiled_encode(self.vae, video_BCFHW, **self.tiling.spec())
        return self.vae.to_dit_latents(mean)

    @torch.no_grad()
    def decode(self, z_BCfhw: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return super().decode(z_BCfhw)
        t, s = self.vae.config.temporal_compression_ratio, self.vae.config.spatial_compression_ratio
        f, h, w = z_BCfhw.shape[2:]
        if not self.tiling.tiles((f - 1) * t + 1, h * s, w * s):
            return super().decode(z_BCfhw)
        self.tiled_calls += 1
        return tiled_decode(self.vae, self.vae.from_dit_latents(z_BCfhw), **self.tiling.spec())


def build_tiled_encoder(root: str | Path, vae: str = "", tiling: VAETiling | None = None) -> TiledLatentEncoder:
    """The latent codec of a data root (stand-in autoencoder) or of a CausalVAE folder, tiled per `tiling`."""
    return TiledLatentEncoder(build_latent_encoder(root, vae).model, tiling or VAETiling())


def add_text_arguments(e) -> None:
    """The text encoder's options (TextConfig's fields; its defaults): the cached states are what training with the
    same text.* settings would compute."""
    t = TextConfig()
    e.add_argument("--text-encoder", default=t.encoder, choices=TEXT_ENCODERS)
    e.add_argument("--max-tokens", type=int, default=t.max_tokens, help="text tokens per caption (byte, words)")
    e.add_argument("--llm-path", default=t.llm_path, help="hf: local Llama / LLaVA-Llama folder (+ tokenizer)")
    e.add_argument("--clip-path", default=t.clip_path, help="hf: local CLIP text model folder (+ tokenizer)")
    e.add_argument("--template", default=t.template, help="hf: hunyuan-video, none, or a {} string")
    e.add_argument("--crop-start", type=int, default=t.crop_start, help="hf: template tokens cut; -1 = counted")
    e.add_argument("--hidden-layer-skip", type=int, default=t.hidden_layer_skip, help="hf: hidden_states[-(n+1)]")
    e.add_argument("--llm-max-tokens", type=int, default=t.llm_max_tokens, help="hf: LLM tokens after the crop")
    e.add_argument("--clip-max-tokens", type=int, default=t.clip_max_tokens, help="hf: CLIP tokens")
    e.add_argument("--text-device", default=t.device, help="hf: cpu, cuda, cuda:N or auto")
    e.add_argument("--text-dtype", default=t.dtype, help="hf: float32, bfloat16, float16 or auto")


def text_config(a: argparse.Namespace) -> TextConfig:
    return TextConfig(
        encoder=a.text_encoder,
        max_tokens=a.max_tokens,
        llm_path=a.llm_path,
        clip_path=a.clip_path,
        template=a.template,
        crop_start=a.crop_start,
        hidden_layer_skip=a.hidden_layer_skip,
        llm_max_tokens=a.llm_max_tokens,
        clip_max_tokens=a.clip_max_tokens,
        device=a.text_device,
        dtype=a.text_dtype,
    )


def add_encode_parser(sub) -> None:
    e = sub.add_parser("encode", help="write latent shards (VAE + text encoder) for data.format=latent")
    e.add_argument("--root", required=True, help="raw shards (npy / mp4 / webm / png samples with JSON captions)")
    e.add_argument("--out", required=True, help="folder for the latent shards (ranks may share it)")
    e.add_argument("--buckets", default="9x64x64", help="shapes FxHxW; each clip goes to its nearest bucket")
    e.add_argument("--frame-interval", type=int, default=1)
    e.add_argument("--vae", default="", help="CausalVAE folder (config.json + safetensors); default: the stand-in")
    e.add_argument("--flavor", default="dit-tiny", help="DiT flavor whose text dims the cached states match")
    add_text_arguments(e)
    add_tile_arguments(e)
    e.add_argument("--decoder", default="cpu", choices=("cpu", "dali"))
    e.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    e.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    e.add_argument("--shard-size", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)


def video_encoder(a: argparse.Namespace) -> TiledLatentEncoder:
    """The pixels -> latents function of an encode run: --vae (else the stand-in of --root), tiled per --tile*."""
    return build_tiled_encoder(a.root, a.vae, tiling_from_args(a))


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
    text = build_text_encoder(text_config(a), dit.text_dim, dit.pooled_dim)
    job = EncodeJob(
        data=data,
        out=Path(a.out),
        encode_video=video_encoder(a),
        encode_text=text.encode,
        rank=a.rank,
        world=a.world,
        shard_size=a.shard_size,
        seed=a.seed,
    )
    stats = encode_dataset(job)
    return f"rank {a.rank}/{a.world}: wrote {stats['written']} latent samples to {a.out}; skipped {stats['skipped']}"
