"""Parameter names: ours <-> diffusers' `HunyuanVideoTransformer3DModel`.

The two layouts hold the same tensors (same shapes), so the mapping is a rename of module paths; the parameter
leaf (`weight`, `bias`) is kept. `{i}` stands for a block index. This table is the only place that knows
diffusers' names. One tensor is also reordered: the input columns of a single-stream block's output projection
(ours: G = gcd(D, M) groups of [D/G attention; M/G MLP], so tensor parallelism can shard it contiguously;
diffusers' `proj_out`: [attention (D); MLP (M)]); see `blocks.interleave_attn_mlp`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

_MLP = (("fc1", "linear_1"), ("fc2", "linear_2"))

# (our module path, diffusers module path)
RENAMES: tuple[tuple[str, str], ...] = (
    ("patch_embed", "x_embedder.proj"),
    *((f"cond_embed.time_mlp.{a}", f"time_text_embed.timestep_embedder.{b}") for a, b in _MLP),
    *((f"cond_embed.pooled_mlp.{a}", f"time_text_embed.text_embedder.{b}") for a, b in _MLP),
    *((f"cond_embed.guidance_mlp.{a}", f"time_text_embed.guidance_embedder.{b}") for a, b in _MLP),
    ("text_refiner.proj_in", "context_embedder.proj_in"),
    *(
        (f"text_refiner.cond_embed.time_mlp.{a}", f"context_embedder.time_text_embed.timestep_embedder.{b}")
        for a, b in _MLP
    ),
    *(
        (f"text_refiner.cond_embed.pooled_mlp.{a}", f"context_embedder.time_text_embed.text_embedder.{b}")
        for a, b in _MLP
    ),
    *(
        (f"text_refiner.blocks.{{i}}.{a}", f"context_embedder.token_refiner.refiner_blocks.{{i}}.{b}")
        for a, b in (
            ("norm1", "norm1"),
            ("attn.q", "attn.to_q"),
            ("attn.k", "attn.to_k"),
            ("attn.v", "attn.to_v"),
            ("attn.o", "attn.to_out.0"),
            ("norm2", "norm2"),
            ("mlp.fc1", "ff.net.0.proj"),
            ("mlp.fc2", "ff.net.2"),
            ("mod", "norm_out.linear"),
        )
    ),
    *(
        (f"double_blocks.{{i}}.{a}", f"transformer_blocks.{{i}}.{b}")
        for a, b in (
            ("img_mod", "norm1.linear"),
            ("txt_mod", "norm1_context.linear"),
            ("img_attn.q", "attn.to_q"),
            ("img_attn.k", "attn.to_k"),
            ("img_attn.v", "attn.to_v"),
            ("img_attn.q_norm", "attn.norm_q"),
            ("img_attn.k_norm", "attn.norm_k"),
            ("img_attn.o", "attn.to_out.0"),
            ("txt_attn.q", "attn.add_q_proj"),
            ("txt_attn.k", "attn.add_k_proj"),
            ("txt_attn.v", "attn.add_v_proj"),
            ("txt_attn.q_norm", "attn.norm_added_q"),
            ("txt_attn.k_norm", "attn.norm_added_k"),
            ("txt_attn.o", "attn.to_add_out"),
            ("img_mlp.fc1", "ff.net.0.proj"),
            ("img_mlp.fc2", "ff.net.2"),
            ("txt_mlp.fc1", "ff_context.net.0.proj"),
            ("txt_mlp.fc2", "ff_context.net.2"),
        )
    ),
    *(
        (f"single_blocks.{{i}}.{a}", f"single_transformer_blocks.{{i}}.{b}")
        for a, b in (
            ("mod", "norm.linear"),
            ("attn.q", "attn.to_q"),
            ("attn.k", "attn.to_k"),
            ("attn.v", "attn.to_v"),
            ("attn.q_norm", "attn.norm_q"),
            ("attn.k_norm", "attn.norm_k"),
            ("mlp_in", "proj_mlp"),
            ("out", "proj_out"),
        )
    ),
    ("final_layer.mod", "norm_out.linear"),
    ("final_layer.proj", "proj_out"),
)


def _compile(pattern: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in pattern.split("{i}")) + r"\.(weight|bias)")


def _substitute(pattern: str, groups: tuple[str, ...]) -> str:
    *indices, leaf = groups
    parts = pattern.split("{i}")
    return "".join(p + i for p, i in zip(parts, [*indices, ""])) + "." + leaf


_OURS_TO_DIFFUSERS = [(_compile(ours), theirs) for ours, theirs in RENAMES]
_DIFFUSERS_TO_OURS = [(_compile(theirs), ours) for ours, theirs in RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]], source: str) -> str:
    for pattern, target in table:
        match = pattern.fullmatch(key)
        if match:
            return _substitute(target, match.groups())
    raise KeyError(f"{key!r} is not a known {source} DiT parameter (see vidtron/models/dit/state_dict_adapter.py)")


def to_diffusers_key(key: str) -> str:
    """Our parameter name -> diffusers' name."""
    return _rename(key, _OURS_TO_DIFFUSERS, "vidtron")


def from_diffusers_key(key: str) -> str:
    """Diffusers' parameter name -> ours."""
    return _rename(key, _DIFFUSERS_TO_OURS, "diffusers")


_SINGLE_OUT = re.compile(r"single_blocks\.\d+\.out\.weight")


def _single_out_groups(weight: torch.Tensor) -> tuple[int, int, int]:
    """(G, D/G, M/G) of a single-stream output weight `[D, D + M]`."""
    D, M = weight.shape[0], weight.shape[1] - weight.shape[0]
    G = math.gcd(D, M)
    return G, D // G, M // G


def single_out_to_diffusers(weight: torch.Tensor) -> torch.Tensor:
    """Columns G x [D/G attention; M/G MLP] (ours) -> [attention (D); MLP (M)] (diffusers' proj_out)."""
    G, a_w, m_w = _single_out_groups(weight)
    w_DGw = weight.unflatten(1, (G, a_w + m_w))
    return torch.cat([w_DGw[..., :a_w].flatten(1), w_DGw[..., a_w:].flatten(1)], dim=1)


def single_out_from_diffusers(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of single_out_to_diffusers."""
    G, a_w, m_w = _single_out_groups(weight)
    D = G * a_w
    attn_DGa, mlp_DGm = weight[:, :D].unflatten(1, (G, a_w)), weight[:, D:].unflatten(1, (G, m_w))
    return torch.cat([attn_DGa, mlp_DGm], dim=2).flatten(1)


def to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers' (renamed; single-stream out columns reordered). Unknown keys raise KeyError."""
    return {
        to_diffusers_key(k): single_out_to_diffusers(v) if _SINGLE_OUT.fullmatch(k) else v
        for k, v in state_dict.items()
    }


def from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers' state dict -> ours (renamed; single-stream out columns reordered). Unknown keys raise KeyError."""
    out = {from_diffusers_key(k): v for k, v in state_dict.items()}
    return {k: single_out_from_diffusers(v) if _SINGLE_OUT.fullmatch(k) else v for k, v in out.items()}
