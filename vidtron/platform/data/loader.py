"""The bucketed data stream: a layout-independent sequence of global batches, each one bucket's samples.

Epoch e's plan, drawn from (seed, e) only:
  1. each bucket's samples in a random order, cut into batches of the bucket's global batch (the last one short);
  2. with image_ratio > 0, image batches (image samples, or single frames of the videos when the data has no
     images) so that they are image_ratio of the epoch's batches; the image pool is walked pass after pass;
  3. all batches shuffled together.
The stream is epoch 0's batches, then epoch 1's, ...; the data position is one integer, `cursor` = global
batches consumed. Data-parallel rank r of dp takes rows [r * per, (r + 1) * per) of an n-sample batch,
per = ceil(n / dp), padded with weight-0 rows, so every rank of a step has the same bucket and shape and the
loss over the weight-1 rows is the same for any dp. Resuming at a cursor with another dp continues the same
stream: no sample skipped, none repeated. Ranks of one TP/CP group share a dp rank, so they get the same rows.

Legend: b rows on this rank, F frames, H, W pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from vidtron.errors import ConfigError
from vidtron.platform.config import DataConfig
from vidtron.platform.data.buckets import Bucket, assign_bucket, image_bucket_for, resolve_buckets
from vidtron.platform.data.index import LATENT_EXT, Entry, SampleIndex
from vidtron.platform.data.video import MEDIA_EXTS, DecodeRequest, frame_indices, make_decoder


def stable_int(*parts) -> int:
    """A 63-bit integer from the parts (same in every process and Python version)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(stable_int(*parts))


@dataclass(frozen=True)
class Item:
    sample: int  # position in SampleIndex.entries
    image: bool = False  # one frame of a video sample (image_ratio), not the whole sample


@dataclass(frozen=True)
class GlobalBatch:
    bucket: int  # position in BucketPlan.buckets
    items: tuple[Item, ...]


@dataclass
class LocalBatch:
    """One data-parallel rank's rows of a global batch."""

    bucket: Bucket
    epoch: int
    items: list[Item | None]  # None = padding
    positions: list[int]  # each row's position in the global batch (per-sample random draws key on it)
    weight: torch.Tensor  # [b] 1.0 = a sample to train on, 0.0 = padding or unreadable
    global_samples: int  # samples in the whole global batch


def _chunks(ids: list, size: int) -> list[tuple]:
    return [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]


class BucketPlan:
    """Which samples each global batch holds; depends only on the sample shapes, the buckets and the seed."""

    def __init__(self, groups: dict[int, list[Item]], image_pool: dict[int, list[Item]], buckets, seed, ratio):
        self.buckets, self.seed = buckets, seed
        self.groups = {k: v for k, v in groups.items() if v}  # bucket -> its items, in index order
        self.image_pool = {k: v for k, v in image_pool.items() if v}
        self.video_batches = sum(math.ceil(len(v) / buckets[k].batch) for k, v in self.groups.items())
        self.pass_batches = sum(math.ceil(len(v) / buckets[k].batch) for k, v in self.image_pool.items())
        self.image_batches = max(1, round(ratio / (1 - ratio) * self.video_batches)) if self.image_pool else 0
        self.batches_per_epoch = self.video_batches + self.image_batches
        if self.batches_per_epoch == 0:
            raise ConfigError("data.buckets", [b.name for b in buckets], "no sample fits any bucket")
        self._cache: dict[tuple, list[GlobalBatch]] = {}

    def _cached(self, key: tuple, build) -> list[GlobalBatch]:
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = build()
        return self._cache[key]

    def _cut(self, groups: dict[int, list[Item]], *salt) -> list[GlobalBatch]:
        out = []
        for k, items in sorted(groups.items()):
            order = _rng(self.seed, *salt, k).permutation(len(items))
            out += [GlobalBatch(k, c) for c in _chunks([items[i] for i in order], self.buckets[k].batch)]
        return out

    def _image_pass(self, p: int) -> list[GlobalBatch]:
        def build():
            batches = self._cut(self.image_pool, "image-pass", p)
            return [batches[i] for i in _rng(self.seed, "image-pass-order", p).permutation(len(batches))]

        return self._cached(("image", p), build)

    def epoch(self, e: int) -> list[GlobalBatch]:
        """Epoch e's global batches, in order."""

        def build():
            batches = self._cut(self.groups, "epoch", e)
            first = e * self.image_batches
            for j in range(first, first + self.image_batches):
                batches.append(self._image_pass(j // self.pass_batches)[j % self.pass_batches])
            return [batches[i] for i in _rng(self.seed, "epoch-order", e).permutation(len(batches))]

        return self._cached(("epoch", e), build)

    def at(self, cursor: int) -> tuple[int, GlobalBatch]:
        """(epoch, global batch) at stream position `cursor`."""
        e, i = divmod(cursor, self.batches_per_epoch)
        return e, self.epoch(e)[i]


def local_rows(n: int, dp_rank: int, dp: int) -> tuple[range, int]:
    """Positions of an n-sample global batch on rank dp_rank of dp, and the padded per-rank row count."""
    per = math.ceil(n / dp)
    return range(min(dp_rank * per, n), min((dp_rank + 1) * per, n)), per


class BucketLoader:
    """The bucketed stream over the shards of data.root: plan (cheap, no decoding) and per-rank batches."""

    def __init__(self, data: DataConfig, seed: int, patch: int = 2, patch_t: int = 1, device_id: int = 0):
        self.data, self.seed = data, seed
        self.latent = data.format == "latent"
        self.index = SampleIndex(data.root, (LATENT_EXT,) if self.latent else MEDIA_EXTS)
        self.buckets = resolve_buckets(data, patch, patch_t)
        self.interval = 1 if self.latent else data.frame_interval
        groups, pool = self._group()
        self.plan = BucketPlan(groups, pool, self.buckets, seed, data.image_ratio)
        self.decoder = None if self.latent else make_decoder(data.decoder, device_id)
        self.bad: set[int] = set()  # samples found unreadable while loading

    # ---- planning --------------------------------------------------------------------------------------------

    def _bucket_of(self, e: Entry) -> int | None:
        if self.latent:  # encoded at one bucket's shape: only that bucket fits
            shape = (e.frames, e.height, e.width)
            return next((k for k, b in enumerate(self.buckets) if (b.frames, b.height, b.width) == shape), None)
        return assign_bucket(e.frames, e.height, e.width, self.buckets, self.interval)

    def _image_bucket_of(self, e: Entry) -> int | None:
        if not self.latent:
            return image_bucket_for(e.height, e.width, self.buckets)
        shape = tuple(e.meta.get("image") or ())  # (1, H, W) of the cached first-frame latents, if any
        return next((k for k, b in enumerate(self.buckets) if (b.frames, b.height, b.width) == shape), None)

    def _group(self) -> tuple[dict[int, list[Item]], dict[int, list[Item]]]:
        groups: dict[int, list[Item]] = {}
        for sid, e in enumerate(self.index.entries):
            k = self._bucket_of(e)
            if k is None:
                self.index.skips.skip(self.index.where(e), e.key, "fits no bucket", f"{e.frames}x{e.height}x{e.width}")
            else:
                groups.setdefault(k, []).append(Item(sid))
        if self.data.image_ratio <= 0:
            return groups, {}
        pool = {k: v for k, v in groups.items() if self.buckets[k].is_image}
        if pool:  # the data has images: they form the image stream
            return {k: v for k, v in groups.items() if k not in pool}, pool
        for items in list(groups.values()):
            for item in items:
                k = self._image_bucket_of(self.index.entries[item.sample])
                if k is not None:
                    pool.setdefault(k, []).append(Item(item.sample, image=True))
        if not pool:
            raise ConfigError(
                "data.image_ratio",
                self.data.image_ratio,
                "the data has no images and no image bucket (frames: 1) takes frames of its videos; add one"
                + (" and re-run `vidtron-data encode` with it" if self.latent else ""),
            )
        return groups, pool

    def local_batch(self, cursor: int, dp_rank: int, dp: int) -> LocalBatch:
        """This rank's rows of the global batch at `cursor` (no decoding)."""
        epoch, gb = self.plan.at(cursor)
        n = len(gb.items)
        rows, per = local_rows(n, dp_rank, dp)
        items: list[Item | None] = [gb.items[i] for i in rows] + [None] * (per - len(rows))
        positions = list(rows) + [n + j for j in range(per - len(rows))]  # padding draws never collide
        weight = torch.tensor([0.0 if it is None else 1.0 for it in items])
        return LocalBatch(self.buckets[gb.bucket], epoch, items, positions, weight, n)

    # ---- loading ---------------------------------------------------------------------------------------------

    def _request(self, item: Item, bucket: Bucket, epoch: int) -> DecodeRequest:
        e = self.index.entries[item.sample]
        frames = 1 if item.image else bucket.frames
        interval = 1 if item.image else self.interval
        draw = stable_int(self.seed, "window", epoch, item.sample, item.image)
        idx = frame_indices(e.frames, frames, interval, draw)
        return DecodeRequest(self.index.read(e), e.media, idx, bucket.height, bucket.width)

    def _unreadable(self, sid: int, err: Exception) -> None:
        self.bad.add(sid)
        e = self.index.entries[sid]
        self.index.skips.skip(self.index.where(e), e.key, "unreadable media", f"{type(err).__name__}: {err}")

    def pixels(self, lb: LocalBatch) -> torch.Tensor:
        """uint8 [b, F, H, W, 3] of the rows (zeros where padded or unreadable; their weight becomes 0)."""
        b = lb.bucket
        out = np.zeros((len(lb.items), b.frames, b.height, b.width, 3), dtype=np.uint8)
        todo = [r for r, it in enumerate(lb.items) if it is not None and it.sample not in self.bad]
        requests, ok_rows = [], []
        for r in todo:
            try:
                requests.append(self._request(lb.items[r], b, lb.epoch))
                ok_rows.append(r)
            except Exception as err:  # e.g. fewer frames than its JSON claims
                self._unreadable(lb.items[r].sample, err)
        for r, video in zip(ok_rows, self.decoder.decode(requests)):
            if isinstance(video, Exception) or video.shape != out.shape[1:]:
                self._unreadable(lb.items[r].sample, video if isinstance(video, Exception) else ValueError(video.shape))
            else:
                out[r] = video
        lb.weight = lb.weight * torch.tensor([float(it is not None and it.sample not in self.bad) for it in lb.items])
        return torch.from_numpy(out)

    def captions(self, lb: LocalBatch) -> list[str]:
        return ["" if it is None else self.index.entries[it.sample].caption for it in lb.items]

    def read_latents(self, lb: LocalBatch, load) -> list[dict | None]:
        """Each row's cached tensors via `load(bytes) -> dict` (None where padded or unreadable; weight 0)."""
        rows: list[dict | None] = []
        for it in lb.items:
            if it is None or it.sample in self.bad:
                rows.append(None)
                continue
            try:
                rows.append(load(self.index.read(self.index.entries[it.sample]), it.image))
            except Exception as err:
                self._unreadable(it.sample, err)
                rows.append(None)
        lb.weight = lb.weight * torch.tensor([float(r is not None) for r in rows])
        return rows

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.index.skips.counts)
