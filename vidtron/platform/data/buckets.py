"""Duration x aspect-ratio buckets: which shape each sample trains at, and each bucket's global batch.

A bucket is a pixel shape (frames, height, width) plus the global batch of a step drawn from it. The batch is
global (split over the data-parallel ranks) so the data stream does not depend on the layout; a bucket's
per-rank memory is batch / dp samples of its shape. `frames == 1` makes an image bucket.

A clip goes to the bucket whose aspect ratio is closest to its own, among those it is long enough for
(`(frames - 1) * interval + 1` source frames); ties prefer no upscaling, then more frames, then more pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vidtron.errors import ConfigError
from vidtron.platform.config import DataConfig

VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # pixel -> latent compression of both autoencoders


@dataclass(frozen=True)
class Bucket:
    frames: int  # pixel frames (1 = images)
    height: int  # pixels
    width: int  # pixels
    batch: int  # global batch of a step drawn from this bucket

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def latent_shape(self) -> tuple[int, int, int]:
        """(f, h, w) of this bucket's latents."""
        return 1 + (self.frames - 1) // VAE_TEMPORAL, self.height // VAE_SPATIAL, self.width // VAE_SPATIAL

    def tokens(self, patch: int = 2, patch_t: int = 1) -> int:
        """DiT video tokens of one sample."""
        f, h, w = self.latent_shape()
        return (f // patch_t) * (h // patch) * (w // patch)

    def span(self, interval: int) -> int:
        """Source frames a clip needs to fill this bucket when taking every `interval`-th frame."""
        return (self.frames - 1) * interval + 1


def resolve_buckets(data: DataConfig, patch: int = 2, patch_t: int = 1) -> list[Bucket]:
    """The configured buckets with their global batches (max_batch, or bucket_tokens // tokens)."""
    specs = data.buckets or []
    if not specs:
        return [Bucket(data.frames, data.height, data.width, data.batch_size)]
    out = []
    for spec in specs:
        batch = spec.max_batch
        if batch == 0:
            tokens = Bucket(spec.frames, spec.height, spec.width, 1).tokens(patch, patch_t)
            batch = max(1, data.bucket_tokens // tokens)
        out.append(Bucket(spec.frames, spec.height, spec.width, batch))
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise ConfigError("data.buckets", names, "each (frames, height, width) may appear only once")
    return out


def _aspect_gap(h: int, w: int, bucket: Bucket) -> float:
    return round(abs(math.log(h / w) - math.log(bucket.height / bucket.width)), 6)


def assign_bucket(frames: int, height: int, width: int, buckets: list[Bucket], interval: int = 1) -> int | None:
    """Index of the bucket a (frames, height, width) sample trains in, or None when none fits it."""
    image = frames == 1
    best, best_key = None, None
    for i, b in enumerate(buckets):
        if b.is_image != image or b.span(interval) > frames:
            continue
        upscale = b.height > height or b.width > width
        key = (_aspect_gap(height, width, b), upscale, -b.frames, -b.height * b.width)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def image_bucket_for(height: int, width: int, buckets: list[Bucket]) -> int | None:
    """The image bucket a single frame of a (height, width) clip trains in."""
    return assign_bucket(1, height, width, buckets)
