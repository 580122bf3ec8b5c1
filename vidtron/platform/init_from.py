"""`model.init_from` / `vae.init_from`: start a run from existing weights, in any layout the run uses.

    init_from(model, path, kind="dit")   # or kind="vae"

dispatches on what `path` is:
- a vidtron training checkpoint folder (`runs/x/checkpoints/step_N`: manifest.json + DCP `.metadata`): only the
  model weights are loaded (optimizer, data position and RNG are not: this is a fresh run), through DCP, which
  reshards by parameter name into whatever layout the model has (plain, TP, FSDP2);
- anything else: vidtron/models/{dit,vae}/weights.py (our safetensors, diffusers, original HunyuanVideo), which
  read only each rank's chunks.

Both check names and shapes first and raise one ConfigError(field, path, fix) (`model.init_from` or
`vae.init_from`) before any tensor is written. Call it after the model is parallelized (or built on the meta
device and parallelized: pass `device` to materialize it), before the optimizer is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor

from vidtron.errors import ConfigError
from vidtron.models.dit import weights as dit_weights
from vidtron.models.vae import weights as vae_weights
from vidtron.models.weights_load import InitReport, check_match, materialize, model_tensors
from vidtron.platform.checkpoint import MANIFEST, SafeFileSystemReader, committed_checkpoints
from vidtron.platform.export import checkpoint_sources


class Kind(NamedTuple):
    """One kind of model `init_from` fills."""

    field_name: str  # the config field named in errors
    load: Callable[..., InitReport]  # external weights -> the model (models/<kind>/weights.py)
    check: Callable[..., InitReport]  # the same checks, nothing loaded
    prefix: str  # where the model's tensors are in a training checkpoint (`model.<prefix><name>`)


KINDS = {
    "dit": Kind(dit_weights.FIELD, dit_weights.load_initial_weights, dit_weights.check_initial_weights, ""),
    # a recipe=vae checkpoint holds model.vae.* next to the discriminator's model.disc.*
    "vae": Kind(vae_weights.FIELD, vae_weights.load_initial_weights, vae_weights.check_initial_weights, "vae."),
}


def is_training_checkpoint(path: str | Path) -> bool:
    """A DCP checkpoint folder as the trainer writes it (`.metadata` present)."""
    return (Path(path) / ".metadata").is_file()


def _kind(kind: str, path: str | Path) -> Kind:
    """The Kind called `kind`; refuses a run folder (`runs/x` is not a checkpoint), naming the one to give."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    steps = committed_checkpoints(path) if Path(path).is_dir() else []
    if steps:
        fix = f"is a run folder; give one of its checkpoints, e.g. {steps[-1]}"
        raise ConfigError(KINDS[kind].field_name, str(path), fix)
    return KINDS[kind]


def init_from(
    model: nn.Module,
    path: str | Path,
    *,
    kind: str = "dit",
    strict: bool = True,
    device: torch.device | str | None = None,
) -> InitReport:
    """Fill `model` (a DiT for kind="dit", a CausalVAE for kind="vae") in place from `path`: a training checkpoint
    folder (model weights only) or external weights (see the module docstring). Every rank calls it; for a
    checkpoint folder it is a collective (DCP), for external weights each rank reads on its own."""
    spec = _kind(kind, path)
    if not is_training_checkpoint(path):
        return spec.load(model, path, strict=strict, device=device)
    return load_checkpoint_weights(
        model, path, prefix=spec.prefix, field_name=spec.field_name, strict=strict, device=device
    )


def check_init_from(model: nn.Module, path: str | Path, *, kind: str = "dit", strict: bool = True) -> InitReport:
    """Every check `init_from` makes (path, layout, names, shapes), from file headers or DCP metadata only; nothing
    is read or written, so `model` may be built on the meta device from the config before any process starts."""
    spec = _kind(kind, path)
    if not is_training_checkpoint(path):
        return spec.check(model, path, strict=strict)
    missing, unexpected = _check_checkpoint(model, Path(path), spec.prefix, spec.field_name, strict)
    return InitReport(str(path), "dcp", [], sorted(missing), unexpected)


def _check_checkpoint(
    model: nn.Module, ckpt: Path, prefix: str, field_name: str, strict: bool
) -> tuple[set[str], list[str]]:
    """(missing, unexpected) model tensors of a committed checkpoint, by name and shape (its DCP metadata)."""
    if not (ckpt / MANIFEST).is_file():
        fix = "is a DCP folder without manifest.json (an uncommitted or torn save); use a committed step_N folder"
        raise ConfigError(field_name, str(ckpt), fix)
    have = {k: s.shape for k, s in checkpoint_sources(ckpt, prefix).items()}
    if not have:
        raise ConfigError(field_name, str(ckpt), f"the checkpoint holds no model tensors named model.{prefix}*")
    want = {k: t.shape for k, t in model_tensors(model).items()}
    return check_match(field_name, str(ckpt), want, have, strict, "checkpoint")


def load_checkpoint_weights(
    model: nn.Module,
    ckpt: str | Path,
    *,
    prefix: str = "",
    field_name: str = dit_weights.FIELD,
    strict: bool = True,
    device: torch.device | str | None = None,
) -> InitReport:
    """Only the model tensors `model.<prefix><name>` of a committed DCP checkpoint, loaded in place into `model`'s
    tensors of the same names (DCP reads the saved chunks that overlap each rank's local ones). Collective."""
    ckpt = Path(ckpt)
    missing, unexpected = _check_checkpoint(model, ckpt, prefix, field_name, strict)
    materialized = materialize(model, device)
    targets = {k: t.detach() for k, t in model_tensors(model).items() if k not in missing}
    dcp.load({"model": {prefix + k: t for k, t in targets.items()}}, storage_reader=SafeFileSystemReader(str(ckpt)))
    local_bytes = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in targets.values())
    return InitReport(str(ckpt), "dcp", list(targets), sorted(missing), unexpected, local_bytes, materialized)
