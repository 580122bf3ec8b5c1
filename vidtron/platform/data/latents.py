"""Latent shards: encode a dataset once (VAE + text encoder), then train from the cached tensors.

Each sample becomes `<key>.latents.safetensors` holding
    latents [C, f, h, w]         the clip at its bucket's shape, in the DiT's latent space
    image_latents [C, 1, h', w'] its first sampled frame at the image bucket of its aspect ratio (when one exists)
    text_states [T, D], text_mask [T] (uint8), text_pooled [P]
plus `<key>.json` (caption, the bucket's frames/height/width, `image`: [1, H', W'], the source shard and key).
The output folder also gets `text_uncond.safetensors` (the empty caption, for caption dropout) and
`encode.json`. Rank r of w encodes samples r, r + w, ... into `latents-r<r>-<n>.tar`; shards are written
atomically, so ranks can share one folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save, save_file

from vidtron.errors import DataError
from vidtron.models.text.encoders import TextBatch
from vidtron.platform.config import DataConfig
from vidtron.platform.data.buckets import Bucket, assign_bucket, image_bucket_for, resolve_buckets
from vidtron.platform.data.index import SampleIndex, write_tar
from vidtron.platform.data.loader import stable_int
from vidtron.platform.data.video import MEDIA_EXTS, DecodeRequest, frame_indices, make_decoder

UNCOND_FILE = "text_uncond.safetensors"
VideoEncoder = Callable[[torch.Tensor], torch.Tensor]  # float [B, 3, F, H, W] in [-1, 1] -> latents [B, C, f, h, w]


def to_model_input(videos_BFHW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1]."""
    x = torch.as_tensor(videos_BFHW3).permute(0, 4, 1, 2, 3)
    return x.float() / 127.5 - 1.0


def save_uncond(out: Path, uncond: TextBatch) -> None:
    tmp = out / (UNCOND_FILE + ".tmp")
    save_file({"states": uncond.states, "mask": uncond.mask.to(torch.uint8), "pooled": uncond.pooled}, str(tmp))
    os.replace(tmp, out / UNCOND_FILE)


def load_uncond(root: str | Path) -> TextBatch:
    path = Path(root) / UNCOND_FILE
    if not path.exists():
        raise DataError(f"data.root={str(root)!r} has no {UNCOND_FILE}; write latent shards with `vidtron-data encode`")
    t = load_file(str(path))
    return TextBatch(states=t["states"], mask=t["mask"].bool(), pooled=t["pooled"])


def load_latent_sample(data: bytes, image: bool = False) -> dict[str, torch.Tensor]:
    """One cached sample: latents [C, f, h, w] (the image latents when `image`), states, mask, pooled."""
    t = load_tensors(data)
    if image and "image_latents" not in t:
        raise DataError("sample has no image_latents; re-run `vidtron-data encode` with an image bucket")
    return {
        "latents": t["image_latents" if image else "latents"],
        "states": t["text_states"],
        "mask": t["text_mask"].bool(),
        "pooled": t["text_pooled"],
    }


@dataclass
class EncodeJob:
    data: DataConfig  # root (the raw shards), buckets, frame_interval, decoder
    out: Path  # where the latent shards go
    encode_video: VideoEncoder
    encode_text: Callable[[list[str]], TextBatch]
    rank: int = 0
    world: int = 1
    shard_size: int = 32
    seed: int = 0  # picks each clip's frame window (as epoch 0 of training would)


def _pixels(index: SampleIndex, decoder, sid: int, bucket: Bucket, interval: int, seed: int) -> np.ndarray:
    e = index.entries[sid]
    span_interval = 1 if bucket.is_image else interval
    idx = frame_indices(e.frames, bucket.frames, span_interval, stable_int(seed, "window", 0, sid, bucket.is_image))
    (video,) = decoder.decode([DecodeRequest(index.read(e), e.media, idx, bucket.height, bucket.width)])
    if isinstance(video, Exception):
        raise video
    return video


def _encode_one(job: EncodeJob, index, decoder, buckets, sid: int) -> tuple[dict, dict] | None:
    """(tensors, json meta) of one sample, or None when it is skipped."""
    e = index.entries[sid]
    k = assign_bucket(e.frames, e.height, e.width, buckets, job.data.frame_interval)
    if k is None:
        index.skips.skip(index.where(e), e.key, "fits no bucket", f"{e.frames}x{e.height}x{e.width}")
        return None
    b = buckets[k]
    meta = {"caption": e.caption, "frames": b.frames, "height": b.height, "width": b.width}
    meta["source"] = [index.where(e).name, e.key]

    def latents(bucket: Bucket) -> torch.Tensor:  # [C, f, h, w]
        pixels = _pixels(index, decoder, sid, bucket, job.data.frame_interval, job.seed)
        return job.encode_video(to_model_input(pixels[None]))[0]

    try:
        tensors = {"latents": latents(b)}
        ki = None if b.is_image else image_bucket_for(e.height, e.width, buckets)
        if ki is not None:
            tensors["image_latents"] = latents(buckets[ki])
            meta["image"] = [1, buckets[ki].height, buckets[ki].width]
    except Exception as err:
        index.skips.skip(index.where(e), e.key, "unreadable media", f"{type(err).__name__}: {err}")
        return None
    return tensors, meta


def _shard_members(job: EncodeJob, done: list[tuple[str, dict, dict]]) -> list[tuple[str, dict[str, bytes]]]:
    text = job.encode_text([meta["caption"] for _, _, meta in done])
    out = []
    for i, (key, tensors, meta) in enumerate(done):
        tensors = tensors | {"text_states": text.states[i], "text_mask": text.mask[i].to(torch.uint8)}
        tensors["text_pooled"] = text.pooled[i]
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        out.append((key, {"latents.safetensors": blob, "json": json.dumps(meta).encode()}))
    return out


def encode_dataset(job: EncodeJob) -> dict:
    """Encode this rank's share of the dataset; returns {"written": n, "skipped": {reason: count}}."""
    index = SampleIndex(job.data.root, MEDIA_EXTS)
    buckets = resolve_buckets(job.data)
    decoder = make_decoder(job.data.decoder)
    job.out.mkdir(parents=True, exist_ok=True)
    mine = list(range(job.rank, len(index), job.world))
    written, shard_no = 0, 0
    for first in range(0, len(mine), job.shard_size):
        done = []
        with torch.no_grad():
            for sid in mine[first : first + job.shard_size]:
                result = _encode_one(job, index, decoder, buckets, sid)
                if result is not None:
                    done.append((index.entries[sid].key, *result))
        if done:
            write_tar(job.out / f"latents-r{job.rank:03d}-{shard_no:05d}.tar", _shard_members(job, done))
            written, shard_no = written + len(done), shard_no + 1
    if job.rank == 0:
        save_uncond(job.out, job.encode_text([""]))
        info = {"source": str(job.data.root), "buckets": [b.name for b in buckets], "world": job.world}
        (job.out / "encode.json").write_text(json.dumps(info, indent=1))
    return {"written": written, "skipped": dict(index.skips.counts)}
