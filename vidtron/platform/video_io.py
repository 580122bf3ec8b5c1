"""Writing clips for people to look at: GIF (Pillow) and MP4 (PyAV, H.264 when available).

Frames are uint8 [F, H, W, 3]. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video_3FHW: torch.Tensor) -> np.ndarray:
    """A decoded clip [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    x = ((video_3FHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8, scale: int = 1) -> Path:
    path = Path(path)
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    tmp = path.with_name(path.name + ".tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    os.replace(tmp, path)
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.mp4")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """uint8 [F, H, W, 3] frames of a video file."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
