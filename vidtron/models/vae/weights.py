"""`vae.init_from`: fill a CausalVAE (plain, FSDP2-sharded, or on the meta device) from external weights, streaming.

Layouts, detected from the tensor names (vidtron/models/weights_load.py does the reading, sharding and checks):

    vidtron     our names (`vidtron-export --format safetensors` of a recipe=vae checkpoint)
    diffusers   AutoencoderKLHunyuanVideo (`diffusion_pytorch_model[-0000i-of-0000n].safetensors` + index), renamed by
                state_dict_adapter (tensors are never changed, only renamed)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vidtron.models.vae.state_dict_adapter import to_diffusers
from vidtron.models.weights_load import InitReport, LayoutFn, TensorPlan, check_weights, load_weights

FIELD = "vae.init_from"


def vidtron_layout(shapes: dict[str, torch.Size]) -> dict[str, TensorPlan]:
    """Our names, tensors as they are."""
    return {k: TensorPlan.whole(k, s) for k, s in shapes.items()}


def diffusers_layout(shapes: dict[str, torch.Size]) -> dict[str, TensorPlan]:
    """diffusers' names (a rename per tensor)."""
    theirs = to_diffusers(dict.fromkeys(shapes))  # renames keys only; the values are never looked at
    return {k: TensorPlan.whole(t, shapes[k]) for k, t in zip(shapes, theirs)}


LAYOUTS: dict[str, LayoutFn] = {"vidtron": vidtron_layout, "diffusers": diffusers_layout}


def load_initial_weights(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    field_name: str = FIELD,
) -> InitReport:
    """Fill the CausalVAE `model` in place from `path`: a diffusers AutoencoderKLHunyuanVideo folder or our
    safetensors, detected from the names. Each rank reads only the chunks its DTensor parameters hold; a model on
    the meta device is first materialized on `device`. Bad input raises ConfigError(`field_name`, path, fix)
    before any tensor is written. See weights_load.load_weights."""
    return load_weights(model, path, LAYOUTS, field_name=field_name, strict=strict, device=device)


def check_initial_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, field_name: str = FIELD
) -> InitReport:
    """The checks of `load_initial_weights` alone (names and shapes from the file headers; nothing written):
    `model` may be a CausalVAE built on the meta device from the run's config."""
    return check_weights(model, path, LAYOUTS, field_name=field_name, strict=strict)
