"""Streaming export of a DCP training checkpoint to consolidated, sharded safetensors.

Each format writes a folder with `config.json` and weights named like Hugging Face's sharded files
(`<prefix>.safetensors`, or `<prefix>-0000i-of-0000n.safetensors` + `<prefix>.safetensors.index.json`). Which
model a checkpoint holds (a DiT, or a `recipe=vae` run's causal VAE next to its discriminator) and the formats of
each are in `export_models.py`:

    DiT          safetensors (ours), diffusers (HunyuanVideoTransformer3DModel), hunyuan (the original repository)
    causal VAE   diffusers (AutoencoderKLHunyuanVideo), safetensors (ours)

The conversion is the in-memory one (`to_diffusers`, `to_hunyuan`), applied to one group of tensors at a time:
a format's `groups` says which of our tensors convert together (a fused q;k;v needs its three pieces).

Memory: the export holds about one output shard. Everything is planned on the meta device from the DCP
metadata (names, shapes, dtypes: the conversion of meta tensors gives the output names and sizes), groups are
packed into shards of at most `max_shard_bytes`, and for each shard DCP loads just that shard's source tensors
(allocated in the output dtype: DCP casts while copying) -- resharding whatever layout saved them (FSDP, HSDP,
one process). Groups are converted one by one, each group's sources dropped as its outputs appear, so the peak
is the shard plus the largest group. The folder is written to `<out>.tmp-<pid>/` and renamed to `<out>` when
complete; a failed export leaves no output folder behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from vidtron.errors import ConfigError, DataError
from vidtron.platform.checkpoint import MANIFEST, SafeFileSystemReader, verify
from vidtron.platform.export_models import (
    ALL_FORMATS,
    DIT,
    ExportModel,
    Format,
    ModelConfig,
    StateDict,
    expected_shapes,
    export_model,
)
from vidtron.platform.manifest import fsync_path

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS: dict[str, Format] = DIT.formats  # the DiT's; `export_models.ALL_FORMATS` names every model's


class Source(NamedTuple):
    """One model tensor of the checkpoint, from the DCP metadata."""

    shape: torch.Size
    dtype: torch.dtype


class Group(NamedTuple):
    """Our tensors that convert together, and the output tensors (name -> bytes) they become."""

    sources: list[str]
    outputs: dict[str, int]

    @property
    def nbytes(self) -> int:
        return sum(self.outputs.values())


@dataclass
class ExportReport:
    """What an export wrote, and the most bytes of tensors it held at once."""

    out: Path
    files: list[str]  # weight files, in order
    total_bytes: int  # bytes of all output tensors
    largest_shard_bytes: int  # bytes of tensors in the largest weight file
    peak_held_bytes: int  # most bytes of tensors alive at once (a shard's sources/outputs + one group's new tensors)
    num_tensors: int


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '1000' -> 1000 (Hugging Face's max_shard_size syntax)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match:
        raise ConfigError("--max-shard-size", text, "give a size such as 5GB, 500MB, 2GiB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    size = int(number * base ** " KMGT".index(unit.rstrip("I") or " "))
    if size < 1:
        raise ConfigError("--max-shard-size", text, "must be at least 1 byte")
    return size


def checkpoint_sources(ckpt: Path, prefix: str = "", root: str = "model") -> dict[str, Source]:
    """Our parameter name -> shape and dtype, for every model tensor of a DCP checkpoint whose name starts with
    `prefix` (stripped; "vae." picks a recipe=vae run's VAE), under the top-level key `root` ("model", or "ema"
    for the EMA weights); nothing is loaded."""
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    start = f"{root}." + prefix
    return {
        fqn.removeprefix(start): Source(md.size, md.properties.dtype)
        for fqn, md in metadata.items()
        if fqn.startswith(start) and isinstance(md, TensorStorageMetadata)
    }


def check_sources(sources: dict[str, Source], cfg: ModelConfig, model: ExportModel | None = None) -> None:
    """The checkpoint holds exactly the parameters (names and shapes) of `model` (by default the kind `cfg`
    describes) built with `cfg`."""
    model = model or export_model(cfg)
    want = expected_shapes(model, cfg)
    missing, extra = sorted(set(want) - set(sources)), sorted(set(sources) - set(want))
    wrong = sorted(k for k in set(want) & set(sources) if tuple(want[k]) != tuple(sources[k].shape))
    if missing or extra or wrong:
        detail = f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}"
        raise DataError(
            f"the checkpoint's model tensors do not match its config ({detail}); is it a vidtron {model.name}?"
        )


def plan_groups(fmt: Format, sources: dict[str, Source], dtype: torch.dtype | None) -> list[Group]:
    """Convert meta tensors of the checkpoint's shapes group by group: the output names and sizes, no memory."""
    groups = []
    for keys in fmt.groups(sources):
        meta = {k: torch.empty(sources[k].shape, dtype=dtype or sources[k].dtype, device="meta") for k in keys}
        groups.append(Group(keys, {name: t.nbytes for name, t in fmt.convert(meta).items()}))
    return groups


def plan_shards(groups: list[Group], max_bytes: int) -> list[list[Group]]:
    """Pack groups, in order, into shards of at most `max_bytes` (a larger group gets a shard of its own)."""
    shards: list[list[Group]] = [[]]
    for group in groups:
        if shards[-1] and sum(g.nbytes for g in shards[-1]) + group.nbytes > max_bytes:
            shards.append([])
        shards[-1].append(group)
    return [s for s in shards if s]


def load_sources(
    ckpt: Path,
    keys: list[str],
    sources: dict[str, Source],
    dtype: torch.dtype | None,
    prefix: str = "",
    root: str = "model",
) -> StateDict:
    """Just these model tensors of the checkpoint (names without `prefix`), full (DCP reshards any saved layout),
    cast to `dtype`."""
    state = {prefix + k: torch.empty(sources[k].shape, dtype=dtype or sources[k].dtype) for k in keys}
    dcp.load({root: state}, storage_reader=SafeFileSystemReader(str(ckpt)))
    return {k.removeprefix(prefix): v for k, v in state.items()}


def convert_shard(fmt: Format, shard: list[Group], loaded: StateDict) -> tuple[StateDict, int]:
    """Convert group by group, dropping each group's sources as its outputs appear; returns the outputs and the
    most bytes of tensors alive at once."""
    alive = sum(t.nbytes for t in loaded.values())
    peak, out = alive, {}
    for group in shard:
        part = {k: loaded.pop(k) for k in group.sources}
        converted = fmt.convert(part)
        fresh = _bytes_not_in(converted, part)  # new tensors (fused, reordered); renamed ones share storage
        peak = max(peak, alive + fresh)
        alive += fresh - _bytes_not_in(part, converted)
        out |= converted
        del part, converted
    return out, peak


def _bytes_not_in(state: StateDict, other: StateDict) -> int:
    """Bytes of the tensors of `state` whose storage no tensor of `other` shares."""
    ptrs = {t.untyped_storage().data_ptr() for t in other.values()}
    return sum(t.nbytes for t in state.values() if t.untyped_storage().data_ptr() not in ptrs)


def _return_freed_memory() -> None:
    """Hand the heap memory of the freed shard back to the OS (glibc keeps it otherwise, and RSS creeps up)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _shard_files(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _fsync_write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    fsync_path(path)


def _write_json(path: Path, obj: dict) -> None:
    _fsync_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield `<out>.tmp-<pid>/`; rename it to `out` on success, remove it on any failure."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)  # an empty `out` folder is replaced atomically
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", str(out), "exists and is not an empty folder; choose a new folder")


def check_checkpoint(ckpt: Path) -> None:
    if not (ckpt / MANIFEST).is_file() or not (ckpt / ".metadata").is_file():
        fix = (
            "is not a committed checkpoint folder (with manifest.json and .metadata), e.g. run/checkpoints/step_000200"
        )
        raise ConfigError("--ckpt", str(ckpt), fix)


def check_format(fmt: str, model: ExportModel) -> Format:
    """`model`'s Format called `fmt`, or a ConfigError naming the formats this checkpoint supports."""
    if fmt in model.formats:
        return model.formats[fmt]
    if fmt in ALL_FORMATS:
        raise ConfigError("--format", fmt, f"does not apply to a {model.name} checkpoint; choose {list(model.formats)}")
    raise ConfigError("--format", fmt, f"choose one of {ALL_FORMATS}")


def export_checkpoint(
    ckpt: Path,
    fmt: str,
    out: Path,
    cfg: ModelConfig,
    max_shard_bytes: int = 5 * 10**9,
    dtype: torch.dtype | None = None,
    check_files: bool = True,
    weights: str = "model",
) -> ExportReport:
    """Export the model weights of the checkpoint `ckpt` (a DiT with `cfg`, or with a VAEConfig the VAE of a
    recipe=vae checkpoint) to the folder `out` in `fmt`; `weights` = "model" or "ema" (the EMA of a run with
    trainer.ema_decay > 0)."""
    ckpt, out = Path(ckpt), Path(out)
    model = export_model(cfg)
    spec = check_format(fmt, model)
    check_checkpoint(ckpt)
    check_output(out)
    if check_files and (problem := verify(ckpt)) is not None:
        raise DataError(f"checkpoint {ckpt} is damaged ({problem}); export another one")
    sources = checkpoint_sources(ckpt, model.prefix, weights)
    if not sources and weights == "ema":
        raise ConfigError("--weights", weights, f"{ckpt} has no EMA weights: train with trainer.ema_decay > 0")
    check_sources(sources, cfg, model)
    shards = plan_shards(plan_groups(spec, sources, dtype), max_shard_bytes)
    files = _shard_files(spec.weights, len(shards))
    peak = 0
    with staged_folder(out) as tmp:
        for shard, file in zip(shards, files):
            loaded = load_sources(ckpt, [k for g in shard for k in g.sources], sources, dtype, model.prefix, weights)
            tensors, held = convert_shard(spec, shard, loaded)
            peak = max(peak, held)
            _fsync_write(tmp / file, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
            del loaded, tensors
            _return_freed_memory()
        _write_index(tmp, spec.weights, shards, files)
        _write_json(tmp / "config.json", spec.config(cfg))
    sizes = [sum(g.nbytes for g in shard) for shard in shards]
    return ExportReport(out, files, sum(sizes), max(sizes), peak, sum(len(g.outputs) for s in shards for g in s))


def _write_index(folder: Path, prefix: str, shards: list[list[Group]], files: list[str]) -> None:
    """`<prefix>.safetensors.index.json` (Hugging Face's format) when the weights span several files."""
    if len(files) < 2:
        return
    weight_map = {name: f for shard, f in zip(shards, files) for g in shard for name in g.outputs}
    total = sum(g.nbytes for shard in shards for g in shard)
    _write_json(
        folder / f"{prefix}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
