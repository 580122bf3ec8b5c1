"""Analytic training FLOPs and parameter counts of the HunyuanVideo DiT (`vidtron.models.dit`).

Shapes: B batch, F, H, W latent frames / height / width, V video tokens (F/pt * H/p * W/p), T text tokens
(padded length: dense attention computes the padding too), L = V + T joint tokens, D model dim, M MLP hidden,
Mr refiner MLP hidden, E text-encoder width, P output channels per token (patch volume x out channels).

Counted: every matmul (linears, the patch-embed conv) and the two attention matmuls QK^T and PV, at
2 FLOPs per multiply-add, as `torch.utils.flop_counter.FlopCounterMode` counts them. Not counted: norms,
activations, RoPE, modulation, softmax (elementwise work, a few percent at most).

Backward: by convention 2x forward (grad of the input and of the weight, each a matmul of the forward's
size), total = 3x forward. `total_executed` is what autograd actually runs: the first matmul of every input
that needs no gradient (patch embed, text projection, the first linear of each conditioning MLP) skips its
input gradient.

Parameters: `params_non_embedding` counts the transformer blocks (dual-stream, single-stream, refiner),
the analogue of Kaplan et al.'s non-embedding N; the embedders (patch embed, conditioning MLPs, the
refiner's conditioning and input projection) and the final layer are left out. `flops_6nd` is the
6 * N * tokens approximation with N = params_non_embedding and tokens = video tokens.
"""

from __future__ import annotations

import math

from vidtron.models.dit.configs import DiTConfig
from vidtron.models.dit.layers import TIME_FREQ_DIM


def _mm(rows: int, d_in: int, d_out: int) -> int:
    """FLOPs of a [rows, d_in] x [d_in, d_out] matmul (2 per multiply-add)."""
    return 2 * rows * d_in * d_out


def _linear_params(d_in: int, d_out: int) -> int:
    """Weight + bias of nn.Linear(d_in, d_out)."""
    return d_in * d_out + d_out


def _attention(batch: int, q_len: int, k_len: int, dim: int) -> int:
    """QK^T [B, N, Lq, Dh] x [B, N, Dh, Lk] plus PV [B, N, Lq, Lk] x [B, N, Lk, Dh]; N * Dh = dim."""
    return 2 * _mm(batch * q_len, dim, k_len)


def video_tokens(cfg: DiTConfig, latent_shape: tuple[int, int, int]) -> int:
    """V = (F/pt) (H/p) (W/p) for a latent clip (F, H, W); ValueError if the patch does not divide it."""
    if len(latent_shape) != 3 or any(not isinstance(n, int) or n < 1 for n in latent_shape):
        raise ValueError(f"latent_shape={latent_shape!r}: give three positive ints (F, H, W) in latent units")
    if any(n % p for n, p in zip(latent_shape, cfg.patch)):
        raise ValueError(f"latent_shape={latent_shape!r}: F, H, W must be divisible by the patch {cfg.patch}")
    return math.prod(n // p for n, p in zip(latent_shape, cfg.patch))


def _cond_widths(cfg: DiTConfig) -> list[int]:
    """Input width of each conditioning MLP (input -> D -> D): the DiT's time, pooled-text, [guidance], then
    the refiner's time and mean-text MLPs."""
    widths = [TIME_FREQ_DIM, cfg.pooled_dim] + ([TIME_FREQ_DIM] if cfg.guidance_embeds else [])
    return widths + [TIME_FREQ_DIM, cfg.text_dim]


def forward_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, batch: int = 1) -> dict:
    """Forward FLOPs per component for `batch` clips of `latent_shape` (F, H, W) and `text_len` text tokens."""
    B, V, T = batch, video_tokens(cfg, latent_shape), text_len
    L, D, M, E = V + T, cfg.hidden_size, cfg.mlp_hidden, cfg.text_dim
    Mr, P = int(D * cfg.mlp_ratio), math.prod(cfg.patch) * cfg.out_channels
    nd, ns, nr = cfg.num_double_blocks, cfg.num_single_blocks, cfg.num_refiner_blocks
    per_double = 2 * _mm(B, D, 6 * D) + _mm(B * L, D, 4 * D) + 2 * _mm(B * L, D, M)  # mods, q/k/v/o, MLP
    per_single = _mm(B, D, 3 * D) + _mm(B * L, D, 3 * D + M) + _mm(B * L, D + M, D)  # mod, q/k/v + mlp_in, out
    per_refiner = _mm(B * T, D, 4 * D) + 2 * _mm(B * T, D, Mr) + _mm(B, D, 2 * D)  # q/k/v/o, MLP, gate mod
    return {
        "patch_embed": _mm(B * V, cfg.in_channels * math.prod(cfg.patch), D),
        "conditioning": sum(_mm(B, w, D) + _mm(B, D, D) for w in _cond_widths(cfg)),
        "text_refiner": _mm(B * T, E, D) + nr * per_refiner,
        "text_refiner_attention": nr * _attention(B, T, T, D),
        "double_linear": nd * per_double,
        "double_attention": nd * _attention(B, L, L, D),
        "single_linear": ns * per_single,
        "single_attention": ns * _attention(B, L, L, D),
        "final_layer": _mm(B, D, 2 * D) + _mm(B * V, D, P),
    }


def _skipped_input_grads(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, batch: int) -> int:
    """Backward FLOPs autograd skips: input gradients of the first matmul applied to each input tensor."""
    B, V, D = batch, video_tokens(cfg, latent_shape), cfg.hidden_size
    skipped = _mm(B * V, cfg.in_channels * math.prod(cfg.patch), D)  # patch embed: latents need no grad
    skipped += _mm(B * text_len, cfg.text_dim, D)  # refiner proj_in: text states need no grad
    return skipped + sum(_mm(B, w, D) for w in _cond_widths(cfg))  # fc1 of each conditioning MLP


def param_counts(cfg: DiTConfig) -> dict:
    """Parameters of `DiT(cfg)`: total, non-embedding (transformer blocks) and per component."""
    D, Dh, M = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden
    Mr, P = int(D * cfg.mlp_ratio), math.prod(cfg.patch) * cfg.out_channels
    qkvo = 4 * _linear_params(D, D)
    double = 2 * (_linear_params(D, 6 * D) + qkvo + 2 * Dh + _linear_params(D, M) + _linear_params(M, D))
    single = _linear_params(D, 3 * D) + 3 * _linear_params(D, D) + 2 * Dh
    single += _linear_params(D, M) + _linear_params(D + M, D)
    refiner = 4 * D + qkvo + _linear_params(D, Mr) + _linear_params(Mr, D) + _linear_params(D, 2 * D)
    blocks = cfg.num_double_blocks * double + cfg.num_single_blocks * single + cfg.num_refiner_blocks * refiner
    embed = cfg.in_channels * math.prod(cfg.patch) * D + D  # patch-embed conv
    embed += sum(_linear_params(w, D) + _linear_params(D, D) for w in _cond_widths(cfg))
    embed += _linear_params(cfg.text_dim, D)  # refiner proj_in
    final = _linear_params(D, 2 * D) + _linear_params(D, P)
    return {"params": blocks + embed + final, "params_non_embedding": blocks, "params_embedding": embed + final}


def dit_train_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int, batch: int = 1) -> dict:
    """Training FLOPs of one optimizer step of `DiT(cfg)` on `batch` clips.

    Args:
        cfg: the model config.
        latent_shape: (F, H, W) of one latent clip (after the VAE), divisible by the patch.
        text_len: text tokens per clip as fed to the model (padded length, e.g. `text.max_tokens`).
        batch: clips per step.

    Returns:
        ``forward``, ``backward`` (2x forward), ``total`` (3x forward), ``total_executed`` (what autograd
        runs, see the module docstring), ``breakdown`` (forward FLOPs per component), ``attention_fraction``,
        ``params``, ``params_non_embedding``, ``video_tokens`` (B V), ``seq_len`` (L), ``flops_6nd``
        (6 N tokens, N non-embedding) and ``ratio_6nd`` (flops_6nd / total).
    """
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len={text_len!r}: give the padded text length, an int >= 0 (e.g. 32)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}: give the clips per step, an int >= 1")
    parts = forward_flops(cfg, latent_shape, text_len, batch)
    fwd = sum(parts.values())
    attention = parts["text_refiner_attention"] + parts["double_attention"] + parts["single_attention"]
    params = param_counts(cfg)
    tokens = batch * video_tokens(cfg, latent_shape)
    flops_6nd = 6 * params["params_non_embedding"] * tokens
    return {
        "forward": fwd,
        "backward": 2 * fwd,
        "total": 3 * fwd,
        "total_executed": 3 * fwd - _skipped_input_grads(cfg, latent_shape, text_len, batch),
        "breakdown": parts,
        "attention_fraction": attention / fwd,
        **params,
        "video_tokens": tokens,
        "seq_len": tokens // batch + text_len,
        "flops_6nd": flops_6nd,
        "ratio_6nd": flops_6nd / (3 * fwd),
    }
