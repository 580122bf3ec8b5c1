"""Generated clips of moving coloured shapes with captions that say what moves where.

Deterministic per (seed, clip index). Each clip is uint8 [F, H, W, 3]; its caption names the shape, the
colour, the direction of motion and the starting region, so text conditioning matters.
A holdout set of (colour, shape, direction) combos keeps those combos out of the clips (for measuring whether
a model composes words it saw only apart); without one the stream is unchanged.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from vidtron.errors import ConfigError

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "magenta": (220, 50, 220),
}
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
Combo = tuple[str, str, str]  # (colour, shape, direction)
SIZE_RANGE = (0.12, 0.2)  # shape radius drawn from [lo, hi) as a fraction of min(H, W)


@dataclass(frozen=True)
class ClipSpec:
    """What one generated clip shows."""

    shape: str
    colour: str
    direction: str
    start_yx: tuple[float, float]  # centre at frame 0, as fractions of (H, W)
    size: float  # radius as a fraction of min(H, W)
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        region = _region_name(self.start_yx)
        return f"a {self.colour} {self.shape} moves {self.direction} from the {region}"


def _region_name(yx: tuple[float, float]) -> str:
    vert = "top" if yx[0] < 0.4 else "bottom" if yx[0] > 0.6 else "middle"
    horiz = "left" if yx[1] < 0.4 else "right" if yx[1] > 0.6 else "centre"
    return f"{vert} {horiz}"


def check_holdout(holdout: Collection[Combo], field: str = "holdout") -> frozenset[Combo]:
    """The holdout as a set of valid (colour, shape, direction) combos that leaves at least one combo to draw."""
    combos = frozenset(tuple(c) for c in holdout)
    for colour, shape, direction in combos:
        if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
            fix = f"colour in {list(COLOURS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}"
            raise ConfigError(field, f"{colour}:{shape}:{direction}", fix)
    if len(combos) >= len(COLOURS) * len(SHAPES) * len(DIRECTIONS):
        raise ConfigError(field, f"{len(combos)} combos", "holds out every combo; leave at least one to train on")
    return combos


def check_size_range(size_range: tuple[float, float], field: str = "size range") -> tuple[float, float]:
    """A radius range 0 < lo <= hi <= 0.25 (fractions of min(H, W)): a shape that large still fits the frame
    across its whole track (it starts 0.3 from the side it leaves and moves 0.4)."""
    lo, hi = (float(v) for v in size_range)
    if not 0 < lo <= hi <= 0.25:
        raise ConfigError(field, f"{lo},{hi}", f"give lo,hi with 0 < lo <= hi <= 0.25 (default {size_range_text()})")
    return lo, hi


def size_range_text(size_range: tuple[float, float] = SIZE_RANGE) -> str:
    """(0.12, 0.2) -> "0.12,0.2", the form `vidtron-data synth --shape-size` takes."""
    return ",".join(f"{v:g}" for v in size_range)


def clip_spec(
    seed: int, index: int, holdout: Collection[Combo] = (), size_range: tuple[float, float] = SIZE_RANGE
) -> ClipSpec:
    """Clip `index` of stream `seed`; a draw whose (colour, shape, direction) is held out is redrawn from
    (seed, index, attempt), so clips without held-out combos stay what they are without a holdout. Another
    `size_range` rescales each clip's radius and leaves every other draw as it is."""
    spec = _draw_spec(np.random.default_rng([seed, index]), size_range)
    attempt = 0
    while holdout and (spec.colour, spec.shape, spec.direction) in holdout:
        attempt += 1
        spec = _draw_spec(np.random.default_rng([seed, index, attempt]), size_range)
    return spec


def _draw_spec(rng: np.random.Generator, size_range: tuple[float, float]) -> ClipSpec:
    direction = str(rng.choice(list(DIRECTIONS)))
    dy, dx = DIRECTIONS[direction]
    # start on the side opposite to the motion so the shape crosses the frame
    start = [float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))]
    if dy:
        start[0] = 0.3 if dy > 0 else 0.7
    if dx:
        start[1] = 0.3 if dx > 0 else 0.7
    bg = tuple(int(v) for v in rng.integers(10, 60, size=3))
    return ClipSpec(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        direction=direction,
        start_yx=(start[0], start[1]),
        size=float(rng.uniform(*size_range)),
        background=bg,
    )


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    # triangle pointing up: inside when below the two slanted edges and above the base
    return (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] of the shape moving 0.4 of the frame over the clip."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = spec.size * min(height, width)
    dy, dx = DIRECTIONS[spec.direction]
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = np.array(spec.background, dtype=np.uint8)
    for f in range(frames):
        progress = 0.4 * f / max(frames - 1, 1)
        cy = (spec.start_yx[0] + dy * progress) * height
        cx = (spec.start_yx[1] + dx * progress) * width
        video[f][_shape_mask(spec.shape, yy, xx, cy, cx, r)] = colour
    return video
