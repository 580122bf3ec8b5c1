"""Parameter names and fusions: ours <-> the original HunyuanVideo repository (`hyvideo/modules/models.py`).

Shapes: D model dim, M MLP hidden, Dh head dim (dit-13b: D 3072, M 12288, Dh 128).

The mapping goes through diffusers' layout: ours -> diffusers is `state_dict_adapter` (which also owns every
reordering internal to our modules), diffusers -> original is `RULES` here, the inverse of diffusers'
`scripts/convert_hunyuan_video_to_diffusers.py`. The original layout fuses what diffusers keeps apart; every
original tensor is a concatenation along dim 0 of diffusers tensors (or of halves of one), in rule order:

    double_blocks.{i}.img_attn_qkv / txt_attn_qkv             [3D, D]      = q; k; v
    single_blocks.{i}.linear1                                 [3D + M, D]  = q; k; v; proj_mlp
    txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv  [3D, D]      = q; k; v
    final_layer.adaLN_modulation.1                            [2D, D]      = shift; scale  (diffusers: scale; shift)

`single_blocks.{i}.linear2` takes [attention (D); MLP (M)] input columns, like diffusers' `proj_out`. The block
modulations (img_mod, txt_mod, modulation, the refiner's adaLN_modulation) chunk in the same order in all three
layouts (shift, scale, gate, ...). Norms without affine parameters (img_norm1, pre_norm, norm_final, ...) have
no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from vidtron.models.dit.configs import DiTConfig
from vidtron.models.dit.state_dict_adapter import from_diffusers, to_diffusers, to_diffusers_key

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_TXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_TIME = (("mlp.0", "linear_1"), ("mlp.2", "linear_2"))


def _block(theirs: str, ours: str, table: tuple) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rules of one block kind: `(theirs suffix, diffusers suffixes)` under the two block prefixes."""
    as_tuple = [(t, d if isinstance(d, tuple) else (d,)) for t, d in table]
    return tuple((f"{theirs}.{t}", tuple(f"{ours}.{p}" for p in d)) for t, d in as_tuple)


# (original module path, diffusers module paths concatenated along dim 0 in this order); {i} is a block index
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in.proj", ("x_embedder.proj",)),
    *((f"time_in.{a}", (f"time_text_embed.timestep_embedder.{b}",)) for a, b in _TIME),
    *((f"guidance_in.{a}", (f"time_text_embed.guidance_embedder.{b}",)) for a, b in _TIME),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("txt_in.input_embedder", ("context_embedder.proj_in",)),
    *((f"txt_in.t_embedder.{a}", (f"context_embedder.time_text_embed.timestep_embedder.{b}",)) for a, b in _TIME),
    *((f"txt_in.c_embedder.{b}", (f"context_embedder.time_text_embed.text_embedder.{b}",)) for _, b in _TIME),
    *_block(
        "txt_in.individual_token_refiner.blocks.{i}",
        "context_embedder.token_refiner.refiner_blocks.{i}",
        (
            ("norm1", "norm1"),
            ("self_attn_qkv", _QKV),
            ("self_attn_proj", "attn.to_out.0"),
            ("norm2", "norm2"),
            ("mlp.fc1", "ff.net.0.proj"),
            ("mlp.fc2", "ff.net.2"),
            ("adaLN_modulation.1", "norm_out.linear"),
        ),
    ),
    *_block(
        "double_blocks.{i}",
        "transformer_blocks.{i}",
        (
            ("img_mod.linear", "norm1.linear"),
            ("img_attn_qkv", _QKV),
            ("img_attn_q_norm", "attn.norm_q"),
            ("img_attn_k_norm", "attn.norm_k"),
            ("img_attn_proj", "attn.to_out.0"),
            ("img_mlp.fc1", "ff.net.0.proj"),
            ("img_mlp.fc2", "ff.net.2"),
            ("txt_mod.linear", "norm1_context.linear"),
            ("txt_attn_qkv", _TXT_QKV),
            ("txt_attn_q_norm", "attn.norm_added_q"),
            ("txt_attn_k_norm", "attn.norm_added_k"),
            ("txt_attn_proj", "attn.to_add_out"),
            ("txt_mlp.fc1", "ff_context.net.0.proj"),
            ("txt_mlp.fc2", "ff_context.net.2"),
        ),
    ),
    *_block(
        "single_blocks.{i}",
        "single_transformer_blocks.{i}",
        (
            ("linear1", (*_QKV, "proj_mlp")),
            ("linear2", "proj_out"),
            ("q_norm", "attn.norm_q"),
            ("k_norm", "attn.norm_k"),
            ("modulation.linear", "norm.linear"),
        ),
    ),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)

HALVES_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})  # diffusers (scale, shift) -> original (shift, scale)


class Piece(NamedTuple):
    """Rows `[chunk * n / chunks, (chunk + 1) * n / chunks)` of the diffusers tensor `key` (n: its dim-0 size)."""

    key: str
    chunk: int = 0
    chunks: int = 1


def _compile(pattern: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in pattern.split("{i}")) + r"\.(weight|bias)")


def _substitute(pattern: str, groups: tuple[str, ...]) -> str:
    *indices, leaf = groups
    parts = pattern.split("{i}")
    return "".join(p + i for p, i in zip(parts, [*indices, ""])) + "." + leaf


_DIFFUSERS = [(_compile(d), r) for r, (_, paths) in enumerate(RULES) for d in paths]
_THEIRS = [(_compile(theirs), r) for r, (theirs, _) in enumerate(RULES)]


def _match(key: str, table: list[tuple[re.Pattern, int]], source: str) -> tuple[int, tuple[str, ...]]:
    for pattern, rule in table:
        match = pattern.fullmatch(key)
        if match:
            return rule, match.groups()
    raise KeyError(f"{key!r} is not a known {source} DiT parameter (see vidtron/models/dit/hunyuan_adapter.py)")


def _pieces(rule: int, groups: tuple[str, ...]) -> tuple[Piece, ...]:
    theirs, paths = RULES[rule]
    keys = [_substitute(p, groups) for p in paths]
    if theirs in HALVES_SWAPPED:
        return (Piece(keys[0], 1, 2), Piece(keys[0], 0, 2))
    return tuple(Piece(k) for k in keys)


def original_layout(diffusers_keys: Iterable[str]) -> dict[str, tuple[Piece, ...]]:
    """Original parameter name -> the pieces of diffusers tensors it concatenates (dim 0, in order). Raises
    KeyError for an unknown name or a fused tensor whose pieces are not all given."""
    keys = list(dict.fromkeys(diffusers_keys))  # in the given order (the model's): blocks stay together
    layout: dict[str, tuple[Piece, ...]] = {}
    for key in keys:
        rule, groups = _match(key, _DIFFUSERS, "diffusers")
        layout.setdefault(_substitute(RULES[rule][0], groups), _pieces(rule, groups))
    missing = sorted({p.key for pieces in layout.values() for p in pieces} - set(keys))
    if missing:
        raise KeyError(f"fused original tensors need {missing}, which are missing from the state dict")
    return layout


def hunyuan_groups(keys: Iterable[str]) -> list[list[str]]:
    """Our parameter names grouped so that each group converts (`to_hunyuan`) to whole original tensors."""
    ours = {to_diffusers_key(k): k for k in keys}
    return [list(dict.fromkeys(ours[p.key] for p in pieces)) for pieces in original_layout(ours).values()]


def _rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    return t.chunk(piece.chunks, dim=0)[piece.chunk] if piece.chunks > 1 else t


def to_hunyuan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the original HunyuanVideo one (fused tensors are new, renamed ones shared). The keys
    may be any union of `hunyuan_groups`."""
    theirs = to_diffusers(state_dict)
    out = {}
    for name, pieces in original_layout(theirs).items():
        parts = [_rows(theirs[p.key], p) for p in pieces]
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def _split_rows(t: torch.Tensor, pieces: tuple[Piece, ...], hidden: int) -> list[torch.Tensor]:
    """Cut an original tensor into its pieces: halves for a swapped tensor, otherwise every piece but the
    last is D rows (a q, k or v projection) and the last takes the rest (v, or the MLP input)."""
    if pieces[0].chunks > 1:
        return list(t.chunk(len(pieces), dim=0))
    sizes = [hidden] * (len(pieces) - 1)
    return list(t.split([*sizes, t.shape[0] - sum(sizes)], dim=0))


def from_hunyuan(state_dict: Mapping[str, torch.Tensor], hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """The original HunyuanVideo state dict -> ours (split tensors are copies). `hidden_size` (D) defaults to
    the width of `img_in.proj.weight`. Unknown keys raise KeyError."""
    hidden = hidden_size or state_dict["img_in.proj.weight"].shape[0]
    chunks: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        pieces = _pieces(*_match(name, _THEIRS, "HunyuanVideo"))
        if len(pieces) == 1:
            chunks.setdefault(pieces[0].key, {})[0] = tensor
            continue
        for piece, part in zip(pieces, _split_rows(tensor, pieces, hidden)):
            chunks.setdefault(piece.key, {})[piece.chunk] = part.clone()
    theirs = {
        k: parts[0] if len(parts) == 1 else torch.cat([parts[c] for c in sorted(parts)]) for k, parts in chunks.items()
    }
    return from_diffusers(theirs)


def to_hunyuan_config(cfg: DiTConfig) -> dict:
    """Constructor arguments of the original `HYVideoDiffusionTransformer` (plus the text widths and RoPE base
    it takes from its command-line args). The original builds a 2-block token refiner; the weights hold
    `num_refiner_blocks` (`txt_in.individual_token_refiner.blocks.{i}`). An image-to-video DiT adds the original's
    `i2v_condition_type` argument (same weights)."""
    i2v = {"i2v_condition_type": cfg.image_condition} if cfg.image_condition else {}
    return {
        "_class_name": "HYVideoDiffusionTransformer",
        "patch_size": list(cfg.patch),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "hidden_size": cfg.hidden_size,
        "heads_num": cfg.num_heads,
        "mlp_width_ratio": cfg.mlp_ratio,
        "mlp_act_type": "gelu_tanh",
        "mm_double_blocks_depth": cfg.num_double_blocks,
        "mm_single_blocks_depth": cfg.num_single_blocks,
        "rope_dim_list": list(cfg.rope_axes_dim),
        "rope_theta": cfg.rope_theta,
        "qkv_bias": True,
        "qk_norm": True,
        "qk_norm_type": "rms",
        "guidance_embed": cfg.guidance_embeds,
        "text_projection": "single_refiner",
        "text_states_dim": cfg.text_dim,
        "text_states_dim_2": cfg.pooled_dim,
        **i2v,
    }
