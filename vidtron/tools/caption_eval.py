"""Caption following, measured: detect what a generated-shapes clip shows and score it against its caption.

The clips of `vidtron.platform.data.synth` show one shape of one palette colour moving over a dark uniform
background, captioned "a <colour> <shape> moves <direction> from the <vertical> <horizontal>". From decoded
frames alone this module finds
    colour     the palette colour the most pixels show (nearest among the palette and the frame's background,
               and within CLOSE_DIST of it),
    shape      the synth template (circle, square, triangle) that best overlaps the largest blob of that colour,
               summed over frames,
    direction  the larger axis of the blob centre's straight-line motion over the clip, and its sign,
    region     the start region of the fitted track at frame 0 (synth's own region names),
and always gives a best guess (noise still gets an answer, so an untrained model scores about chance).
Accuracy is per attribute and overall (a sample counts when every attribute its caption names is right).

Legend: F frames, H, W pixels, K palette colours, N samples.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence
from scipy import ndimage

from vidtron.errors import ConfigError, DataError
from vidtron.platform.data.shards import read_clips
from vidtron.platform.data.synth import COLOURS, DIRECTIONS, SHAPES, ClipSpec, render_clip

ATTRIBUTES = ("colour", "shape", "direction", "region")
PALETTE_K3 = np.array(list(COLOURS.values()), dtype=np.float32)  # [K, 3]
CAPTION_RE = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) moves (?P<direction>\w+)(?: from the (?P<region>\w+ \w+))?$"
)

AREA_PER_R2 = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # mask area / r^2 of synth's shapes
CENTROID_DY_PER_R = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}  # centroid below the centre, in r
CLOSE_DIST = 100.0  # RGB distance within which a pixel counts as showing a palette colour
MAX_DETECT_SIDE = 64  # frames larger than this (e.g. 4x GIFs) are strided down first


@dataclass(frozen=True)
class Detection:
    """What a clip shows, as synth's vocabulary."""

    colour: str
    shape: str
    direction: str
    region: str


def parse_caption(caption: str) -> dict[str, str]:
    """Caption "a red circle moves right from the middle left" -> {colour, shape, direction[, region]}."""
    m = CAPTION_RE.match(caption.strip())
    if m is None:
        raise ConfigError("caption", caption, "expected 'a <colour> <shape> moves <direction> [from the <v> <h>]'")
    return {k: v for k, v in m.groupdict().items() if v is not None}


def _background_3(frame_HW3: np.ndarray) -> np.ndarray:
    """The frame's background colour: the per-channel median (the shape covers under a fifth of the frame)."""
    return np.median(frame_HW3.reshape(-1, 3), axis=0)


def _nearest_labels(video_FHW3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: 0 when the frame's background is nearest, else 1 + the nearest palette colour; and whether
    that palette colour is close (not just nearest). Both [F, H, W]."""
    labels = np.empty(video_FHW3.shape[:3], dtype=np.int64)
    close = np.empty(video_FHW3.shape[:3], dtype=bool)
    for f, frame in enumerate(video_FHW3.astype(np.float32)):
        refs_R3 = np.concatenate([_background_3(frame)[None], PALETTE_K3])  # [1 + K, 3]
        dist_HWR = ((frame[:, :, None, :] - refs_R3) ** 2).sum(-1)
        labels[f] = dist_HWR.argmin(-1)
        close[f] = (labels[f] > 0) & (dist_HWR.min(-1) <= CLOSE_DIST**2)
    return labels, close


def _pick_colour(video_FHW3: np.ndarray, labels_FHW: np.ndarray, close_FHW: np.ndarray) -> int:
    """Palette index with the most close pixels, else the most nearest pixels, else the one nearest the most
    off-background pixel."""
    for pixels in (labels_FHW[close_FHW], labels_FHW.ravel()):
        votes_K = np.bincount(pixels, minlength=1 + len(PALETTE_K3))[1:]
        if votes_K.any():
            return int(votes_K.argmax())
    frames = video_FHW3.astype(np.float32)
    bg_F3 = np.stack([_background_3(f) for f in frames])
    far = ((frames - bg_F3[:, None, None]) ** 2).sum(-1)  # [F, H, W]
    pixel_3 = frames.reshape(-1, 3)[far.argmax()]
    return int(((PALETTE_K3 - pixel_3) ** 2).sum(-1).argmin())


def _largest_blob(mask_HW: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a mask (stray pixels of the same colour elsewhere dropped)."""
    blobs, n = ndimage.label(mask_HW, structure=np.ones((3, 3)))
    if n <= 1:
        return mask_HW
    sizes = np.bincount(blobs.ravel())[1:]
    return blobs == 1 + int(sizes.argmax())


def _template_iou(mask_HW: np.ndarray, shape: str) -> tuple[float, tuple[float, float]]:
    """IoU of `mask` with synth's `shape` of the same area centred on the mask (centre as fractions of H, W)."""
    h, w = mask_HW.shape
    ys, xs = mask_HW.nonzero()
    r = float(np.sqrt(len(ys) / AREA_PER_R2[shape]))
    cy, cx = float(ys.mean()) - CENTROID_DY_PER_R[shape] * r, float(xs.mean())  # synth: pixel i at coordinate i
    spec = ClipSpec(shape, "white", "right", (cy / h, cx / w), r / min(h, w), (0, 0, 0))
    template = render_clip(spec, 1, h, w)[0, :, :, 0] > 0  # [H, W]
    union = np.logical_or(template, mask_HW).sum()
    return float(np.logical_and(template, mask_HW).sum() / max(union, 1)), (cy / h, cx / w)


def _fit_track(masks_FHW: np.ndarray) -> tuple[str, str, np.ndarray]:
    """(shape, direction, start centre yx): best template by summed IoU; the centre's straight-line track."""
    frames = [f for f in range(len(masks_FHW)) if masks_FHW[f].any()]
    if not frames:
        return SHAPES[0], next(iter(DIRECTIONS)), np.array([0.5, 0.5])
    fits = {s: [_template_iou(masks_FHW[f], s) for f in frames] for s in SHAPES}
    shape = max(SHAPES, key=lambda s: sum(iou for iou, _ in fits[s]))
    centres_N2 = np.array([c for _, c in fits[shape]])
    t_N = np.array(frames, dtype=np.float64) / max(len(masks_FHW) - 1, 1)
    if len(frames) > 1 and np.ptp(t_N) > 0:
        slope_2, start_2 = np.polyfit(t_N, centres_N2, 1)  # centre(t) = start + slope * t, t in [0, 1]
    else:
        slope_2, start_2 = np.zeros(2), centres_N2[0]
    axis = int(np.abs(slope_2).argmax())
    sign = float(np.sign(slope_2[axis])) or 1.0
    direction = next(d for d, v in DIRECTIONS.items() if v[axis] == sign)
    return shape, direction, start_2


def _downsample(video_FHW3: np.ndarray) -> np.ndarray:
    step = max(1, min(video_FHW3.shape[1:3]) // MAX_DETECT_SIDE)
    return video_FHW3[:, ::step, ::step]


def detect(video_FHW3: np.ndarray) -> Detection:
    """What a uint8 [F, H, W, 3] clip shows (always a best guess)."""
    if video_FHW3.ndim != 4 or video_FHW3.shape[-1] != 3:
        raise ConfigError("video.shape", tuple(video_FHW3.shape), "expected uint8 [F, H, W, 3]")
    video = _downsample(video_FHW3)
    labels_FHW, close_FHW = _nearest_labels(video)
    k = _pick_colour(video, labels_FHW, close_FHW)
    shape, direction, start_yx = _fit_track(np.stack([_largest_blob(m) for m in labels_FHW == k + 1]))
    return Detection(list(COLOURS)[k], shape, direction, region_name(start_yx))


def region_name(yx) -> str:
    """Synth's name ("top left", ...) of the region a start centre (fractions of H, W) lies in."""
    spec = ClipSpec(
        SHAPES[0], next(iter(COLOURS)), next(iter(DIRECTIONS)), (float(yx[0]), float(yx[1])), 0.1, (0, 0, 0)
    )
    return parse_caption(spec.caption)["region"]


def score(detection: Detection, caption: str) -> dict[str, bool]:
    """Per attribute the caption names: does the detection match it."""
    want = parse_caption(caption)
    return {attr: getattr(detection, attr) == value for attr, value in want.items()}


def evaluate(videos: list[np.ndarray], captions: list[str]) -> dict:
    """Accuracy per attribute and overall (every named attribute right) of N clips vs their captions, plus
    the per-sample detections."""
    if len(videos) != len(captions) or not videos:
        raise ConfigError("videos/captions", (len(videos), len(captions)), "give one caption per clip, >= 1")
    rows = []
    for video, caption in zip(videos, captions):
        found = detect(video)
        rows.append({"caption": caption, "detected": asdict(found), "correct": score(found, caption)})
    return {"n": len(rows), **accuracy(rows), "samples": rows}


def accuracy(rows: list[dict]) -> dict:
    """{"accuracy": {attribute: fraction, ..., "overall": fraction}} over rows with "correct" dicts."""
    acc = {}
    for attr in ATTRIBUTES:
        named = [r["correct"][attr] for r in rows if attr in r["correct"]]
        if named:
            acc[attr] = sum(named) / len(named)
    acc["overall"] = sum(all(r["correct"].values()) for r in rows) / max(len(rows), 1)
    return {"accuracy": acc}


# Held out of the demo's training clips: each colour twice (two shapes, two directions), each shape 4 times,
# each direction 3 times, so every word is seen in training but never in these combinations.
DEFAULT_HOLDOUT = (
    "red:circle:left,red:square:up,green:square:right,green:triangle:down,blue:triangle:left,blue:circle:down,"
    "yellow:circle:up,yellow:triangle:right,white:square:down,white:circle:right,magenta:triangle:up,magenta:square:left"
)
_START_SIDE = {"right": "left", "left": "right", "down": "top", "up": "bottom"}  # synth starts opposite the motion


def caption_for(combo: tuple[str, str, str], k: int) -> str:
    """A training-style caption of `combo`; its start region is the side opposite the motion and the k-th
    (mod 3) position along the other axis."""
    colour, shape, direction = combo
    if direction in ("left", "right"):
        region = f"{('top', 'middle', 'bottom')[k % 3]} {_START_SIDE[direction]}"
    else:
        region = f"{_START_SIDE[direction]} {('left', 'centre', 'right')[k % 3]}"
    return f"a {colour} {shape} moves {direction} from the {region}"


def prompts_for(combos, per_combo: int, first: int = 0) -> list[str]:
    """`per_combo` captions for each combo, start regions cycling (shifted by `first` and the combo index)."""
    return [caption_for(c, first + i + j) for i, c in enumerate(combos) for j in range(per_combo)]


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def combo_of(caption: str) -> tuple[str, str, str]:
    want = parse_caption(caption)
    return want["colour"], want["shape"], want["direction"]


def split_by_holdout(result: dict, holdout) -> dict:
    """{"held_out": accuracy, "seen": accuracy} (with their sample counts) of an `evaluate` result."""
    out = {}
    for name, keep in (("held_out", True), ("seen", False)):
        rows = [r for r in result["samples"] if (combo_of(r["caption"]) in holdout) == keep]
        if rows:
            out[name] = {"n": len(rows), **accuracy(rows)}
    return out


def format_table(results: dict[str, dict]) -> str:
    """One line per named result ({"n", "accuracy"}): n and each attribute's accuracy in percent."""
    cols = [*ATTRIBUTES, "overall"]
    lines = [f"{'':<28}{'n':>5}" + "".join(f"{c:>11}" for c in cols)]
    for name, res in results.items():
        acc = res["accuracy"]
        cells = "".join(f"{100 * acc[c]:>10.1f}%" if c in acc else f"{'-':>11}" for c in cols)
        lines.append(f"{name:<28}{res['n']:>5}" + cells)
    return "\n".join(lines)


def read_gif(path: str | Path) -> np.ndarray:
    """A GIF's frames as uint8 [F, H, W, 3]."""
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def read_samples(folder: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """The clips (sample_i.gif) and captions (sample_i.txt) `vidtron-sample` wrote into `folder`, by i."""
    folder = Path(folder)
    gifs = sorted(folder.glob("sample_*.gif"), key=lambda p: int(p.stem.split("_")[-1]))
    if not gifs:
        raise ConfigError("--samples", str(folder), "holds no sample_*.gif; write some with vidtron-sample")
    missing = [g.with_suffix(".txt").name for g in gifs if not g.with_suffix(".txt").exists()]
    if missing:
        raise DataError(f"{folder}: no caption file for {missing[:3]} (vidtron-sample writes sample_i.txt next to it)")
    return [read_gif(g) for g in gifs], [g.with_suffix(".txt").read_text().strip() for g in gifs]


def read_training_clips(root: str | Path, limit: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Up to `limit` (0 = all) clips and captions from the webdataset shards of a `vidtron-data synth` folder."""
    clips = read_clips(root)[: limit or None]
    return [c.video for c in clips], [c.caption for c in clips]


def read_holdout(root: str | Path) -> frozenset[tuple[str, str, str]]:
    """The combos a synth data folder held out (its holdout.json), or none."""
    path = Path(root) / "holdout.json"
    if not path.exists():
        return frozenset()
    return frozenset(tuple(c.split(":")) for c in json.loads(path.read_text())["holdout"])


def evaluate_folder(folder: str | Path, holdout=frozenset()) -> dict:
    """`evaluate` on the samples `vidtron-sample` wrote into `folder`, plus its held-out / seen split."""
    videos, captions = read_samples(folder)
    result = evaluate(videos, captions)
    return {**result, "split": split_by_holdout(result, holdout)} if holdout else result
