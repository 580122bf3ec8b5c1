"""Block attention that returns the log-sum-exp, its backward, and the merge of partial results.

These are the building blocks of context-parallel attention (ring, USP): a query block attends one key/value
block at a time, partial results are merged exactly with their log-sum-exp, and the backward recomputes each
block from the final (out, lse) with the flash-attention formulas

    P = exp(scale * Q K^T - lse),  dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),
    dS = P * (dP - D),  dQ = scale * dS K,  dK = scale * dS^T Q.

Shape legend: B batch, N heads, Lq query rows, Lk key rows, Dh head dim.
Conventions: lse is fp32 `[B, N, Lq]`, the natural log of sum over valid keys of exp(scale * q.k); a row with no
valid key has lse = -inf and out = 0. Outputs and gradients of the primitives are fp32 accumulators; callers cast.

Implementations: "math" (explicit fp32 softmax; any device, any dtype; used for all CPU work) and "flash"
(flash-attn 2 primitives on CUDA, fp16/bf16, Dh % 8 == 0, Dh <= 256). "auto" picks flash when it applies.
A key mask (`[B, Lk]` bool, True = valid) is honoured by both: flash runs per sample on the valid keys.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

try:  # optional GPU extra; on CPU-only installs it is absent or raises at import (catch everything)
    from flash_attn import flash_attn_interface as _fa

    _FLASH_IMPORT_ERROR: str | None = None
except Exception as err:  # noqa: BLE001
    _fa = None
    _FLASH_IMPORT_ERROR = f"{type(err).__name__}: {err}"

IMPLS = ("auto", "math", "flash")
_NEG_INF = float("-inf")


def flash_available() -> bool:
    """True when flash-attn imported and CUDA is present."""
    return _fa is not None and torch.cuda.is_available()


def resolve_impl(impl: str, q: Tensor) -> str:
    """Return "math" or "flash" for `impl` in IMPLS and a query tensor; explain when flash was asked for but absent."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: choose one of {list(IMPLS)}")
    fits = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    if impl == "flash":
        if not flash_available():
            raise RuntimeError(
                f"attention impl='flash' needs flash-attn and CUDA (import said: {_FLASH_IMPORT_ERROR}); "
                "install the gpu extra (pip install 'vidtron[gpu]') or use impl='math'"
            )
        if not fits:
            raise ValueError("attention impl='flash' needs CUDA fp16/bf16 tensors with head dim % 8 == 0 and <= 256")
        return "flash"
    return "flash" if impl == "auto" and fits and flash_available() else "math"


def default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


# ---------------------------------------------------------------------------------------------------------------
# math implementation (fp32)
# ---------------------------------------------------------------------------------------------------------------
def _scores(q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    s_BNqk = torch.einsum("bnqd,bnkd->bnqk", q.float(), k.float()) * scale
    if key_mask is not None:
        s_BNqk = s_BNqk.masked_fill(~key_mask[:, None, None, :], _NEG_INF)
    return s_BNqk


def _probs(s_BNqk: Tensor, lse_BNq: Tensor) -> Tensor:
    """exp(s - lse), with rows whose lse is -inf (no valid key) giving zeros instead of NaN."""
    safe = torch.where(torch.isneginf(lse_BNq), torch.zeros_like(lse_BNq), lse_BNq)
    return torch.exp(s_BNqk - safe[..., None])


def _math_forward(q, k, v, key_mask, scale):
    s = _scores(q, k, key_mask, scale)  # [B, N, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)  # [B, N, Lq]
    out = _probs(s, lse) @ v.float()  # [B, N, Lq, Dh]
    return out, lse


def _math_backward(dout, q, k, v, lse, delta, key_mask, scale):
    p = _probs(_scores(q, k, key_mask, scale), lse)  # [B, N, Lq, Lk]
    dout = dout.float()
    dv = p.transpose(-1, -2) @ dout  # [B, N, Lk, Dh]
    dp = dout @ v.float().transpose(-1, -2)  # [B, N, Lq, Lk]
    ds = p * (dp - delta[..., None])  # [B, N, Lq, Lk]
    dq = (ds @ k.float()) * scale  # [B, N, Lq, Dh]
    dk = (ds.transpose(-1, -2) @ q.float()) * scale  # [B, N, Lk, Dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# flash-attn implementation (CUDA; layout [B, L, N, Dh] inside flash)
# ---------------------------------------------------------------------------------------------------------------
def _window_kwargs(fn) -> dict:
    params = inspect.signature(fn).parameters
    if "window_size_left" in params:  # flash-attn >= 2.7
        return {"window_size_left": -1, "window_size_right": -1}
    return {"window_size": (-1, -1)}  # flash-attn 2.6


def _flash_forward_dense(q, k, v, scale):
    """q, k, v [B, N, L, Dh] -> out fp32 [B, N, Lq, Dh], lse [B, N, Lq]."""
    fwd = _fa._flash_attn_forward
    out, lse, *_ = fwd(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
        softcap=0.0,
        alibi_slopes=None,
        return_softmax=False,
        **_window_kwargs(fwd),
    )
    return out.transpose(1, 2).float(), lse


def _flash_backward_dense(dout, q, k, v, out, lse, scale):
    bwd = _fa._flash_attn_backward
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, L, N, Dh]
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    bwd(
        dout.to(q.dtype).transpose(1, 2).contiguous(),
        q_,
        k_,
        v_,
        out.to(q.dtype).transpose(1, 2).contiguous(),
        lse.contiguous(),
        dq,
        dk,
        dv,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        rng_state=None,
        **_window_kwargs(bwd),
    )
    return tuple(t.transpose(1, 2).float() for t in (dq, dk, dv))


def _flash_forward(q, k, v, key_mask, scale):
    if key_mask is None:
        return _flash_forward_dense(q, k, v, scale)
    out = q.new_zeros(q.shape, dtype=torch.float32)  # [B, N, Lq, Dh]
    lse = q.new_full(q.shape[:-1], _NEG_INF, dtype=torch.float32)  # [B, N, Lq]
    for b in range(q.shape[0]):  # per sample on its valid keys only
        keep = key_mask[b]
        if keep.any():
            o_b, l_b = _flash_forward_dense(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep], scale)
            out[b], lse[b] = o_b[0], l_b[0]
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, key_mask, scale):
    if key_mask is None:
        return _flash_backward_dense(dout, q, k, v, out, lse, scale)
    dq = q.new_zeros(q.shape, dtype=torch.float32)
    dk = k.new_zeros(k.shape, dtype=torch.float32)
    dv = v.new_zeros(v.shape, dtype=torch.float32)
    for b in range(q.shape[0]):
        keep = key_mask[b]
        if keep.any():
            sl = slice(b, b + 1)
            g = _flash_backward_dense(dout[sl], q[sl], k[sl, :, keep], v[sl, :, keep], out[sl], lse[sl], scale)
            dq[b], dk[b, :, keep], dv[b, :, keep] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# public primitives
# ---------------------------------------------------------------------------------------------------------------
def block_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, scale: float | None = None, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Softmax attention of q `[B, N, Lq, Dh]` over k, v `[B, N, Lk, Dh]` -> (out fp32 `[B, N, Lq, Dh]`, lse fp32
    `[B, N, Lq]`). `key_mask` `[B, Lk]` bool, True = valid key; None = all valid."""
    scale = default_scale(q, scale)
    if k.shape[2] == 0:  # no keys at all: the identity of the merge
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:-1], _NEG_INF, dtype=torch.float32)
    if resolve_impl(impl, q) == "flash":
        return _flash_forward(q, k, v, key_mask, scale)
    return _math_forward(q, k, v, key_mask, scale)


def attention_delta(dout: Tensor, out: Tensor) -> Tensor:
    """D = rowsum(dout * out) in fp32: `[B, N, Lq, Dh]` x2 -> `[B, N, Lq]`."""
    return (dout.float() * out.float()).sum(-1)


def block_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), fp32, of one key/value block given the FINAL merged out and lse of the query rows.

    dout, out `[B, N, Lq, Dh]`; lse `[B, N, Lq]`; k, v `[B, N, Lk, Dh]`. dq is this block's share (sum the shares
    over blocks); dk, dv are complete for this block and these queries. `delta` = attention_delta(dout, out) may be
    passed to reuse it across blocks (math path).
    """
    scale = default_scale(q, scale)
    if k.shape[2] == 0:
        return q.new_zeros(q.shape, dtype=torch.float32), k.float(), v.float()
    if resolve_impl(impl, q) == "flash":
        return _flash_backward(dout, q, k, v, out, lse, key_mask, scale)
    delta = attention_delta(dout, out) if delta is None else delta
    return _math_backward(dout, q, k, v, lse, delta, key_mask, scale)


def merge_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint key sets: out `[B, N, Lq, Dh]`, lse `[B, N, Lq]` (fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only where both are -inf
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a, w_b = torch.exp(lse_a - safe)[..., None], torch.exp(lse_b - safe)[..., None]  # [B, N, Lq, 1]
    return w_a * out_a + w_b * out_b, lse


# ---------------------------------------------------------------------------------------------------------------
# a differentiable dense core built on the primitives (default inner core of Ulysses)
# ---------------------------------------------------------------------------------------------------------------
class _BlockAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, impl):
        out, lse = block_attention(q, k, v, key_mask, scale, impl)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.scale, ctx.impl = scale, impl
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, key_mask, ctx.scale, ctx.impl)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def joint_key_mask(text_mask: Tensor | None, seq_len: int) -> Tensor | None:
    """Key mask `[B, L]` for a `[video; text]` sequence of length L whose last T keys follow `text_mask` `[B, T]`."""
    if text_mask is None:
        return None
    video = text_mask.new_ones(text_mask.shape[0], seq_len - text_mask.shape[1])  # [B, L - T]
    return torch.cat([video, text_mask.bool()], dim=1)


class LseDenseAttention(nn.Module):
    """Dense joint attention with the attn_core contract: (q, k, v `[B, N, L, Dh]`, text_mask `[B, T]`) -> `[B, N, L,
    Dh]`; every query attends all video keys and the valid text keys (the last T). Backward via the primitives."""

    def __init__(self, scale: float | None = None, impl: str = "auto"):
        super().__init__()
        self.scale, self.impl = scale, impl

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        key_mask = joint_key_mask(text_mask, k.shape[2])  # [B, L] or None
        return _BlockAttentionFn.apply(q, k, v, key_mask, self.scale, self.impl)
