"""A random-access index over webdataset shards: one entry per usable sample (shape, caption, byte range).

Samples are grouped webdataset-style (`<key>.<ext>` members of a .tar). A sample is usable when it has a JSON
member that parses and one media member (see `video.MEDIA_EXTS`, or `latents.safetensors`) whose shape is known
(from the JSON's frames/height/width, else probed from the media headers). Unusable samples are skipped,
counted by reason and logged with their shard and key; a shard with nothing usable raises DataError. Entry
order (shards sorted by name, members in tar order) is the same in every process, so a sample id means the
same sample on every rank.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vidtron.errors import DataError
from vidtron.platform.data.shards import list_shards
from vidtron.platform.data.video import MEDIA_EXTS, probe

LATENT_EXT = "latents.safetensors"
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: key up to the basename's first dot
log = logging.getLogger("vidtron.data")


@dataclass(frozen=True)
class Entry:
    shard: int  # position in SampleIndex.shards
    key: str
    media: str  # extension of the media member: mp4, webm, video.npy, png, latents.safetensors, ...
    offset: int  # byte offset of the media member's data in the shard
    size: int  # its length in bytes
    frames: int  # pixel frames (latent shards: of the bucket the sample was encoded at)
    height: int
    width: int
    caption: str
    meta: dict = field(default_factory=dict, compare=False, repr=False)


class SkipLog:
    """Unusable samples: counted by reason and logged once per (shard, key)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples: list[tuple[str, str, str]] = []  # (shard file name, key, reason)
        self._seen: set[tuple[str, str]] = set()

    def skip(self, shard: Path, key: str, reason: str, detail: str = "") -> None:
        if (shard.name, key) in self._seen:
            return
        self._seen.add((shard.name, key))
        self.counts[reason] += 1
        self.samples.append((shard.name, key, reason))
        log.warning("skipping sample %r of shard %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _members(path: Path, skips: SkipLog) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {ext: member} in tar order; a truncated or corrupt tail is logged and what came before kept."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                m = _KEY_EXT.match(member.name)
                if member.isfile() and m:
                    groups.setdefault(m.group(1), {})[m.group(2)] = member
            if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks
                raise tarfile.ReadError(f"ends at byte {os.path.getsize(path)} without the end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError) as err:
        skips.skip(path, f"<after {len(groups)} samples>", "truncated or corrupt tar", str(err))
    return groups


def _shape(meta: dict, data_fn, ext: str) -> tuple[int, int, int]:
    if all(isinstance(meta.get(k), int) for k in ("frames", "height", "width")):
        return meta["frames"], meta["height"], meta["width"]
    if ext == LATENT_EXT:
        raise DataError("latent sample JSON lacks frames/height/width")
    return probe(data_fn(), ext)


class Unusable(ValueError):
    """Why a sample cannot be used: a short `reason` (the count's key) and a `detail`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _entry(path: Path, shard: int, key: str, members: dict, exts: tuple[str, ...], size: int) -> Entry:
    """The sample's Entry; raises Unusable when it cannot be used."""
    media = next((e for e in exts if e in members), None)
    if media is None:
        raise Unusable("no media member", f"has {sorted(members)}; wants one of {list(exts)}")
    if "json" not in members:
        raise Unusable("no json member")
    if any(m.offset_data + m.size > size for m in members.values()):
        raise Unusable("cut off by the end of the shard")
    try:
        meta = json.loads(_read(path, members["json"].offset_data, members["json"].size))
        if not isinstance(meta, dict):
            raise TypeError(f"JSON is a {type(meta).__name__}, not an object")
    except Exception as err:
        raise Unusable("bad json", f"{type(err).__name__}: {err}") from err
    m = members[media]
    try:
        frames, height, width = _shape(meta, lambda: _read(path, m.offset_data, m.size), media)
    except Exception as err:
        raise Unusable("unreadable media", f"{media}: {type(err).__name__}: {err}") from err
    caption = str(meta.get("caption", ""))
    return Entry(shard, key, media, m.offset_data, m.size, frames, height, width, caption, meta)


class SampleIndex:
    """Every usable sample of the shards under `root`, with a per-process file cache for reads."""

    def __init__(self, root: str | Path, exts: tuple[str, ...] = MEDIA_EXTS):
        self.root = Path(root)
        self.shards = list_shards(root)
        self.skips = SkipLog()
        self.entries: list[Entry] = []
        for i, path in enumerate(self.shards):
            found = self._scan(path, i, exts)
            if not found:
                raise DataError(
                    f"shard {path} has no readable sample ({dict(self.skips.counts)} skipped so far); "
                    "regenerate or remove it"
                )
            self.entries += found

    def _scan(self, path: Path, shard: int, exts: tuple[str, ...]) -> list[Entry]:
        size = os.path.getsize(path)
        found = []
        for key, members in _members(path, self.skips).items():
            try:
                found.append(_entry(path, shard, key, members, exts, size))
            except Unusable as err:
                self.skips.skip(path, key, err.reason, err.detail)
        return found

    def read(self, entry: Entry) -> bytes:
        """The media member's bytes."""
        return _read(self.shards[entry.shard], entry.offset, entry.size)

    def where(self, entry: Entry) -> Path:
        return self.shards[entry.shard]

    def __len__(self) -> int:
        return len(self.entries)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write one shard of `(key, {ext: bytes})` samples via a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: byte-identical per seed
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
