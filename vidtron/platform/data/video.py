"""Encoded media <-> uint8 frames: encode (synth), probe, frame sampling, resize + centre crop, CPU / DALI decode.

Every decoder has the same contract: a `DecodeRequest` (the member's bytes, its extension, the source frame
indices to keep, the bucket's height and width) -> uint8 [F, H, W, 3], or the exception that made it unreadable.
Members: video (mp4, webm, mkv, mov, avi) through PyAV or DALI, `video.npy` arrays, images (png, jpg, webp).
Legend: F frames, H, W pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vidtron.errors import ConfigError, DataError

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
NPY_EXT = "video.npy"
MEDIA_EXTS = (*VIDEO_EXTS, *IMAGE_EXTS, NPY_EXT)
_CODECS = {"mp4": ("libx264", "mpeg4"), "webm": ("libvpx-vp9", "libvpx")}


@dataclass(frozen=True)
class DecodeRequest:
    data: bytes  # the encoded member
    ext: str  # its extension (mp4, webm, video.npy, png, ...)
    indices: tuple[int, ...]  # source frames to keep, in order
    height: int  # output pixels
    width: int


def encode_video(frames_FHW3: np.ndarray, fmt: str = "mp4", fps: int = 8) -> bytes:
    """uint8 [F, H, W, 3] -> the bytes of an mp4 (H.264, else MPEG-4 part 2) or webm (VP9) file; 1 frame + png -> png."""
    if fmt in IMAGE_EXTS:
        buf = io.BytesIO()
        Image.fromarray(frames_FHW3[0]).save(buf, format="PNG" if fmt == "png" else "JPEG")
        return buf.getvalue()
    codec = next((c for c in _CODECS[fmt] if c in av.codecs_available), None)
    if codec is None:
        raise ConfigError("--format", fmt, f"this PyAV has none of the encoders {_CODECS[fmt]}; use mp4 or npy")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames_FHW3.shape[1], frames_FHW3.shape[2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames_FHW3:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def probe(data: bytes, ext: str) -> tuple[int, int, int]:
    """(frames, height, width) of an encoded member, reading headers (and packets when the count is missing)."""
    if ext == NPY_EXT:
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(buf)
        return int(shape[0]), int(shape[1]), int(shape[2])
    if ext in IMAGE_EXTS:
        with Image.open(io.BytesIO(data)) as img:
            return 1, img.height, img.width
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        return frames, stream.codec_context.height, stream.codec_context.width


def frame_indices(total: int, frames: int, interval: int, draw: int) -> tuple[int, ...]:
    """`frames` source indices `interval` apart, starting at a position chosen by the integer `draw`."""
    span = (frames - 1) * interval + 1
    if span > total:
        raise DataError(f"clip has {total} frames, needs {span} ({frames} frames every {interval})")
    start = draw % (total - span + 1)
    return tuple(start + i * interval for i in range(frames))


def cover_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The smallest (h, w) with the source's aspect ratio that covers (out_h, out_w)."""
    scale = max(out_h / height, out_w / width)
    return max(out_h, round(height * scale)), max(out_w, round(width * scale))


def centre_crop(x_FHW3: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    top, left = (x_FHW3.shape[1] - out_h) // 2, (x_FHW3.shape[2] - out_w) // 2
    return np.ascontiguousarray(x_FHW3[:, top : top + out_h, left : left + out_w])


def resize_crop(x_FHW3: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (antialiased bilinear) to cover (out_h, out_w) keeping the aspect ratio, then centre-crop."""
    h, w = cover_size(x_FHW3.shape[1], x_FHW3.shape[2], out_h, out_w)
    if (h, w) != x_FHW3.shape[1:3]:
        t = torch.from_numpy(np.ascontiguousarray(x_FHW3)).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x_FHW3 = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return centre_crop(x_FHW3, out_h, out_w)


def _decode_av(req: DecodeRequest) -> np.ndarray:
    wanted, last, out = set(req.indices), max(req.indices), {}
    with av.open(io.BytesIO(req.data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                h, w = cover_size(frame.height, frame.width, req.height, req.width)
                out[i] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()  # swscale resize
            if i >= last:
                break
    missing = [i for i in req.indices if i not in out]
    if missing:
        raise DataError(f"video ends before frame {missing[0]} (decoded {len(out)} of {len(req.indices)} frames)")
    return centre_crop(np.stack([out[i] for i in req.indices]), req.height, req.width)


def decode_cpu(req: DecodeRequest) -> np.ndarray:
    """One request -> uint8 [F, H, W, 3] (raises on unreadable data)."""
    if req.ext in VIDEO_EXTS:
        return _decode_av(req)
    if req.ext == NPY_EXT:
        video = np.load(io.BytesIO(req.data), allow_pickle=False)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise DataError(f"video.npy must be uint8 [F, H, W, 3], got {video.dtype} {video.shape}")
        return resize_crop(video[list(req.indices)], req.height, req.width)
    if req.ext in IMAGE_EXTS:
        with Image.open(io.BytesIO(req.data)) as img:
            return resize_crop(np.array(img.convert("RGB"))[None], req.height, req.width)
    raise DataError(f"no decoder for member type {req.ext!r}")


class CpuDecoder:
    """PyAV / numpy / Pillow decoding in this process."""

    name = "cpu"

    def decode(self, requests: list[DecodeRequest]) -> list[np.ndarray | Exception]:
        out: list[np.ndarray | Exception] = []
        for req in requests:
            try:
                out.append(decode_cpu(req))
            except Exception as err:  # any decoder failure makes only this sample unreadable
                out.append(err)
        return out


class DaliDecoder:
    """GPU video decoding with NVIDIA DALI (`fn.experimental.decoders.video`, device="mixed").

    The global sampler, not DALI's reader, decides which samples a step uses (so resume and resharding stay
    exact): encoded bytes come in through `fn.external_source`, DALI decodes every frame of each clip on the
    GPU and resizes to cover the bucket; frame selection and the centre crop run on the result. Members that
    are not videos, and any batch DALI rejects, fall back to the CPU path sample by sample.
    """

    name = "dali"

    def __init__(self, device_id: int = 0, max_batch: int = 64):
        self._dali = import_dali()
        self.device_id, self.max_batch, self._pipe = device_id, max_batch, None

    def _build(self):
        fn, types = self._dali.fn, self._dali.types

        @self._dali.pipeline_def(batch_size=self.max_batch, num_threads=2, device_id=self.device_id)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            frames = fn.experimental.decoders.video(encoded, device="mixed")  # [F, H, W, 3] uint8 on the GPU
            return fn.resize(frames, size=size, mode="not_smaller")

        p = pipe()
        p.build()
        return p

    def decode(self, requests: list[DecodeRequest]) -> list[np.ndarray | Exception]:
        videos = [r for r in requests if r.ext in VIDEO_EXTS]
        if not videos or len(videos) != len(requests) or len(requests) > self.max_batch:
            return CpuDecoder().decode(requests)
        try:
            return [centre_crop(x[list(r.indices)], r.height, r.width) for x, r in zip(self._run(requests), requests)]
        except Exception:  # one bad clip fails DALI's whole batch: find it on the CPU
            return CpuDecoder().decode(requests)

    def _run(self, requests: list[DecodeRequest]) -> list[np.ndarray]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(r.data, dtype=np.uint8) for r in requests])
        self._pipe.feed_input("size", [np.array([r.height, r.width], dtype=np.float32) for r in requests])
        (out,) = self._pipe.run()
        out = out.as_cpu()
        return [np.asarray(out.at(i)) for i in range(len(requests))]


def import_dali():
    """The `nvidia.dali` module, or a ConfigError saying what is missing (no package, or no CUDA device)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except Exception as err:  # a broken install can raise more than ImportError
        raise ConfigError(
            "data.decoder",
            "dali",
            f"nvidia-dali is not importable ({type(err).__name__}: {err}); "
            "install nvidia-dali-cuda120 (the `gpu` extra) or use data.decoder=cpu",
        ) from err
    if not torch.cuda.is_available():
        raise ConfigError(
            "data.decoder", "dali", "DALI decodes on a CUDA GPU and none is visible; use data.decoder=cpu"
        )
    return dali


def make_decoder(kind: str, device_id: int = 0):
    """The decoder for data.decoder=cpu|dali."""
    if kind == "cpu":
        return CpuDecoder()
    if kind == "dali":
        return DaliDecoder(device_id)
    raise ConfigError("data.decoder", kind, "choose cpu or dali")
