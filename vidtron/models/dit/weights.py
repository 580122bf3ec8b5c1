"""`model.init_from`: fill a DiT (plain, TP / FSDP2-sharded, or on the meta device) from external weights, streaming.

Layouts, detected from the tensor names (vidtron/models/weights_load.py does the reading, sharding and checks):

    vidtron     our names: `vidtron-export --format safetensors` (one file, or a folder with its index)
    diffusers   HunyuanVideoTransformer3DModel (`diffusion_pytorch_model[-0000i-of-0000n].safetensors` + index):
                renamed by state_dict_adapter; a single-stream block's `proj_out` has its input columns permuted
                into our interleaved order (read column runs, then reordered)
    hunyuan     the original repository (`.pt` with a `module` key, or safetensors in that layout): fused tensors
                (q;k;v, q;k;v;mlp, the final (shift; scale)) are read only in the rows each of ours takes
                (hunyuan_adapter.original_layout is the fusion table)

Shapes: D model dim, M MLP hidden.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vidtron.models.dit.hunyuan_adapter import original_layout
from vidtron.models.dit.state_dict_adapter import _SINGLE_OUT, _single_out_groups, to_diffusers_key
from vidtron.models.weights_load import InitReport, LayoutFn, Piece, TensorPlan, check_weights, load_weights

FIELD = "model.init_from"


def single_out_columns(shape: torch.Size) -> torch.Tensor:
    """Source column of each of our columns of a single-stream output weight `[D, D + M]`: ours are G groups of
    [D/G attention; M/G MLP], diffusers' / the original's [attention (D); MLP (M)] (see state_dict_adapter)."""
    G, a_w, m_w = _single_out_groups(torch.empty(shape, device="meta"))
    D = G * a_w
    attn_Ga = torch.arange(D).view(G, a_w)
    mlp_Gm = (D + torch.arange(G * m_w)).view(G, m_w)
    return torch.cat([attn_Ga, mlp_Gm], dim=1).flatten()


def _cols(key: str, shape: torch.Size) -> torch.Tensor | None:
    return single_out_columns(shape) if _SINGLE_OUT.fullmatch(key) else None


def _diffusers_names(shapes: dict[str, torch.Size]) -> dict[str, str]:
    """Our name -> diffusers', for the names the adapter knows (others stay unplanned: a strict load refuses them)."""
    names = {}
    for key in shapes:
        try:
            names[key] = to_diffusers_key(key)
        except KeyError:
            continue
    return names


def vidtron_layout(shapes: dict[str, torch.Size]) -> dict[str, TensorPlan]:
    """Our names, tensors as they are."""
    return {k: TensorPlan.whole(k, s) for k, s in shapes.items()}


def diffusers_layout(shapes: dict[str, torch.Size]) -> dict[str, TensorPlan]:
    """diffusers' names; single-stream output columns permuted."""
    names = _diffusers_names(shapes)
    return {k: TensorPlan((Piece(names[k], 0, shapes[k][0]),), _cols(k, shapes[k])) for k in names}


def hunyuan_layout(shapes: dict[str, torch.Size]) -> dict[str, TensorPlan]:
    """The original repository's names: each of our tensors is rows of one or two fused tensors (the final
    modulation's halves are swapped: ours (scale; shift) = original rows [D:2D]; [0:D])."""
    ours_of = {theirs: k for k, theirs in _diffusers_names(shapes).items()}
    pieces: dict[str, list[tuple[int, Piece]]] = {}  # ours -> (first row in ours, piece)
    for name, parts in original_layout(ours_of).items():
        at = 0
        for part in parts:
            ours = ours_of[part.key]
            rows = shapes[ours][0] // part.chunks
            pieces.setdefault(ours, []).append((part.chunk * rows, Piece(name, at, rows)))
            at += rows
    return {k: TensorPlan(tuple(p for _, p in sorted(v)), _cols(k, shapes[k])) for k, v in pieces.items()}


LAYOUTS: dict[str, LayoutFn] = {"vidtron": vidtron_layout, "diffusers": diffusers_layout, "hunyuan": hunyuan_layout}


def load_initial_weights(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    field_name: str = FIELD,
) -> InitReport:
    """Fill the DiT `model` in place from `path`: our safetensors (file or folder), a diffusers folder, or an
    original HunyuanVideo `.pt` / safetensors, detected from the names. Each rank reads only the chunks its
    DTensor parameters hold; a model on the meta device is first materialized on `device`. Bad input raises
    ConfigError(`field_name`, path, fix) before any tensor is written. See weights_load.load_weights."""
    return load_weights(model, path, LAYOUTS, field_name=field_name, strict=strict, device=device)


def check_initial_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, field_name: str = FIELD
) -> InitReport:
    """The checks of `load_initial_weights` alone (names and shapes from the file headers; nothing written):
    `model` may be a DiT built on the meta device from the run's config."""
    return check_weights(model, path, LAYOUTS, field_name=field_name, strict=strict)
