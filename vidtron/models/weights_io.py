"""Lazy, sliceable readers of weight files, shared by the model folders' `init_from` loaders (weights_load.py).

    safetensors   one file, or a folder of them (through its one `*.safetensors.index.json` when there is one):
                  `safe_open(...).get_slice(name)[box]` reads just the box
    torch file    `torch.load(weights_only=True, mmap=True)` (never an arbitrary unpickle): a flat state dict, or
                  one under `module` (original HunyuanVideo checkpoints); boxes are views into the mapped file

Each source counts the bytes it returns (`bytes_read`). A path that is not one of these is a ConfigError naming
the field (`model.init_from`, `vae.init_from`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from vidtron.errors import ConfigError

Box = tuple[slice, ...]  # one contiguous range per dim of a global tensor
_FEW = 3  # names shown in an error message
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # weights-only torch files a folder may hold instead of safetensors


class TensorSource:
    """Named tensors on disk; `read(key, box)` returns just that box. Counts the bytes it returns."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def shapes(self) -> dict[str, torch.Size]:
        raise NotImplementedError

    def _read(self, key: str, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def read(self, key: str, box: Box) -> torch.Tensor:
        out = self._read(key, box)
        self.bytes_read += out.nbytes
        return out


class SafetensorsSource(TensorSource):
    """Tensors of safetensors files (`key -> file`), opened lazily, read by slice."""

    def __init__(self, files: dict[str, Path], stack: ExitStack):
        super().__init__()
        self.files, self.stack, self.handles = files, stack, {}
        self._shapes = {k: torch.Size(self._handle(k).get_slice(k).get_shape()) for k in files}

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.handles[path]

    def shapes(self) -> dict[str, torch.Size]:
        return self._shapes

    def _read(self, key: str, box: Box) -> torch.Tensor:
        return self._handle(key).get_slice(key)[box or ...]


class TorchSource(TensorSource):
    """A torch file read with `torch.load(weights_only=True, mmap=True)`: views into the mapped file."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.state = state

    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.state.items()}

    def _read(self, key: str, box: Box) -> torch.Tensor:
        return self.state[key][box or ...]


def _no_weights(field_name: str, path: Path, why: str) -> ConfigError:
    fix = (
        f"{why}; give a safetensors file, a folder of safetensors (vidtron-export, diffusers save_pretrained; "
        "with its *.safetensors.index.json when sharded), a HunyuanVideo .pt, or a checkpoint folder (step_N)"
    )
    return ConfigError(field_name, str(path), fix)


def _keys(path: Path, field_name: str) -> list[str]:
    """The tensor names of one safetensors file (its header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise _no_weights(field_name, path, f"is not a readable safetensors file ({err})") from err


def _indexed_files(index: Path, field_name: str) -> dict[str, Path]:
    """key -> file of a Hugging Face `*.safetensors.index.json` (its `weight_map`)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _no_weights(field_name, index, f"is not a readable safetensors index ({err!r})") from err
    absent = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if absent:
        raise _no_weights(field_name, index.parent, f"its index names files that are missing: {absent[:_FEW]}")
    return {k: index.parent / f for k, f in weight_map.items()}


def _safetensors_files(folder: Path, field_name: str) -> dict[str, Path]:
    """key -> file of a folder: through its one `*.safetensors.index.json`, else every `*.safetensors` file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise _no_weights(field_name, folder, f"holds several indexes {[p.name for p in indexes]}; keep one")
    if indexes:
        return _indexed_files(indexes[0], field_name)
    return {k: path for path in sorted(folder.glob("*.safetensors")) for k in _keys(path, field_name)}


def _torch_state(path: Path, field_name: str) -> dict[str, torch.Tensor]:
    """A weights-only, memory-mapped torch file: a flat state dict, or one under `module` (HunyuanVideo's)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means: not a weights file we accept
        raise _no_weights(field_name, path, f"is not a safetensors or weights-only torch file ({err})") from err
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        obj = obj["module"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _no_weights(field_name, path, "is a torch file but not a state dict of tensors (or {'module': ...})")
    return obj


def _one_torch_file(folder: Path, field_name: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES)
    if len(found) != 1:
        raise _no_weights(field_name, folder, f"holds no *.safetensors and not exactly one {TORCH_SUFFIXES} file")
    return found[0]


def _source(path: Path, field_name: str, stack: ExitStack) -> TensorSource:
    if path.is_file() and path.suffix != ".safetensors":
        return TorchSource(_torch_state(path, field_name))
    if path.is_file():
        return SafetensorsSource(dict.fromkeys(_keys(path, field_name), path), stack)
    files = _safetensors_files(path, field_name)
    if files:
        return SafetensorsSource(files, stack)
    return TorchSource(_torch_state(_one_torch_file(path, field_name), field_name))


@contextmanager
def open_source(path: str | Path, field_name: str) -> Iterator[TensorSource]:
    """The tensors of `path` (a safetensors file, a folder of them, or a torch file), read lazily; files stay
    open until the context ends. Anything else is a ConfigError naming `field_name`."""
    path = Path(path)
    if not path.exists():
        raise _no_weights(field_name, path, "does not exist")
    if path.is_dir() and (path / ".metadata").is_file():
        raise _no_weights(field_name, path, "is a DCP training checkpoint: load it with vidtron.platform.init_from")
    with ExitStack() as stack:
        yield _source(path, field_name, stack)
