"""Generated clips as encoded media (mp4, webm, npy; 1-frame clips as png), with varied durations and sizes.

`vidtron-data synth --format mp4 --durations 5,9,17 --sizes 64x64,48x80` writes these, so the decode, bucket
and resize paths run on real files. Clip i's duration and size are drawn from the lists by (seed, i).
Legend: F frames, H, W pixels.
"""

from __future__ import annotations

import io
import json

import numpy as np

from vidtron.errors import ConfigError, DataError
from vidtron.platform.data.index import SampleIndex
from vidtron.platform.data.synth import SIZE_RANGE, Combo, check_holdout, check_size_range, clip_spec, render_clip
from vidtron.platform.data.video import DecodeRequest, centre_crop, decode_cpu, encode_video

FORMATS = ("npy", "mp4", "webm")


def parse_durations(text: str) -> list[int]:
    """Parse "5,9,17" into [5, 9, 17]; each 4k+1 (1 = an image)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError("--durations", text, "give frame counts like 5,9,17") from err
    bad = [d for d in out if d < 1 or (d - 1) % 4]
    if not out or bad:
        raise ConfigError("--durations", text, f"each must be 4k+1 (1 = an image); bad: {bad}")
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse "64x64,48x80" into [(64, 64), (48, 80)] as (height, width); multiples of 16."""
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError("--sizes", text, "give HxW sizes like 64x64,48x80") from err
    bad = [s for s in out if len(s) != 2 or min(s) < 16 or s[0] % 16 or s[1] % 16]
    if not out or bad:
        raise ConfigError("--sizes", text, f"each must be HxW with multiples of 16; bad: {bad}")
    return out  # type: ignore[return-value]


def parse_holdout(text: str) -> frozenset[Combo]:
    """Parse "red:circle:right,blue:square:up" into {(colour, shape, direction), ...}; "" = none."""
    combos = []
    for item in (s.strip() for s in text.split(",")):
        parts = item.split(":")
        if item and len(parts) != 3:
            raise ConfigError("--holdout", item, "give colour:shape:direction triples, e.g. red:circle:right")
        if item:
            combos.append(tuple(parts))
    return check_holdout(combos, "--holdout")


def parse_size_range(text: str) -> tuple[float, float]:
    """Parse "0.18,0.25" into (0.18, 0.25): the shapes' radius range as fractions of min(H, W)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ConfigError("--shape-size", text, "give the radius range as lo,hi, e.g. 0.18,0.25") from err
    return check_size_range((lo, hi), "--shape-size")


def media_sample(
    seed: int,
    index: int,
    fmt: str,
    durations: list[int],
    sizes: list[tuple[int, int]],
    fps: int = 8,
    holdout: frozenset[Combo] = frozenset(),
    size_range: tuple[float, float] = SIZE_RANGE,
) -> tuple[str, dict[str, bytes]]:
    """Clip `index` as (key, {media ext: bytes, "json": bytes}); `holdout` combos are never drawn."""
    rng = np.random.default_rng([seed, index, 7])
    frames = durations[int(rng.integers(len(durations)))]
    height, width = sizes[int(rng.integers(len(sizes)))]
    spec = clip_spec(seed, index, holdout, size_range)
    video = render_clip(spec, frames, height, width)  # [F, H, W, 3]
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, video, allow_pickle=False)
        ext, data = "video.npy", buf.getvalue()
    else:
        ext = "png" if frames == 1 else fmt
        data = encode_video(video, ext, fps)
    meta = {"caption": spec.caption, "shape": spec.shape, "colour": spec.colour, "direction": spec.direction}
    meta |= {"frames": frames, "height": height, "width": width, "fps": fps, "seed": seed, "index": index}
    return f"{index:07d}", {ext: data, "json": json.dumps(meta).encode()}


def fit_clips(root) -> list[np.ndarray]:
    """Every readable clip under root, decoded whole and cut to one common shape (for fitting the stand-in AE):
    the shortest 4k+1 length and the smallest 8-divisible size, centre-cropped; images only when nothing else."""
    index = SampleIndex(root)
    entries = [e for e in index.entries if e.frames > 1] or index.entries
    frames = 4 * ((min(e.frames for e in entries) - 1) // 4) + 1
    height = min(e.height for e in entries) // 8 * 8
    width = min(e.width for e in entries) // 8 * 8
    out = []
    for e in entries:
        req = DecodeRequest(index.read(e), e.media, tuple(range(frames)), e.height, e.width)
        try:
            out.append(centre_crop(decode_cpu(req), height, width))
        except Exception as err:  # skip it like training would
            index.skips.skip(index.where(e), e.key, "unreadable media", f"{type(err).__name__}: {err}")
    if not out:
        raise DataError(f"data root {root}: no readable clip to fit the autoencoder on")
    return out
