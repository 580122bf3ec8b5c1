"""Webdataset shards of clips: writing (atomically, shard by shard) and reading with clear errors.

A sample is `<key>.video.npy` (uint8 [F, H, W, 3], loaded with allow_pickle=False) and `<key>.json`
(caption and metadata).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from vidtron.errors import DataError


@dataclass
class Clip:
    key: str
    video: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    meta: dict


def write_shard(path: Path, samples: list[tuple[str, np.ndarray, dict]]) -> None:
    """Write one .tar shard via a temporary file renamed into place (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed mtime: byte-identical shards per seed
        for key, video, meta in samples:
            buf = io.BytesIO()
            np.save(buf, video, allow_pickle=False)
            sink.write({"__key__": key, "video.npy": buf.getvalue(), "json": json.dumps(meta).encode()})
    os.replace(tmp, path)


def list_shards(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r}: no such folder; create one with `vidtron-data synth --out {root}`")
    shards = sorted(root.glob("*.tar"))
    if not shards:
        raise DataError(
            f"data.root={str(root)!r}: no *.tar shards inside; write some with `vidtron-data synth --out {root}`"
        )
    return shards


def _decode(sample: dict, shard: Path) -> Clip:
    key = sample.get("__key__", "?")
    try:
        video = np.load(io.BytesIO(sample["video.npy"]), allow_pickle=False)
        meta = json.loads(sample["json"])
    except Exception as err:
        raise DataError(f"shard {shard} sample {key!r} is unreadable ({err}); regenerate or remove the shard") from err
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise DataError(
            f"shard {shard} sample {key!r}: video must be uint8 [F, H, W, 3], got {video.dtype} {video.shape}"
        )
    return Clip(key=key, video=video, caption=str(meta.get("caption", "")), meta=meta)


def _all(urls):
    return urls


def read_shard(shard: Path) -> Iterator[Clip]:
    """Yield the clips of one shard; a corrupt or truncated shard raises DataError naming it."""
    try:
        # every rank reads what it is given: the global sampler, not webdataset, splits the data
        pipeline = wds.WebDataset(
            str(shard), shardshuffle=False, empty_check=False, nodesplitter=_all, workersplitter=_all
        )
        for sample in pipeline:
            yield _decode(sample, shard)
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"shard {shard} is corrupt or truncated ({type(err).__name__}: {err}); regenerate or remove it"
        ) from err


def read_clips(root: str | Path) -> list[Clip]:
    clips = [clip for shard in list_shards(root) for clip in read_shard(shard)]
    if not clips:
        raise DataError(
            f"data.root={str(root)!r}: the shards hold no samples; regenerate them with `vidtron-data synth`"
        )
    return clips
