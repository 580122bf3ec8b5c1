"""Block attention that returns the log-sum-exp, its backward, the merge of partial results, and a dense core.

These are the building blocks of context-parallel attention (ring, USP): a query block attends one key/value
block at a time, partial results are merged exactly with their log-sum-exp, and the backward recomputes each
block from the FINAL merged (out, lse) with the flash-attention formulas

    P = exp(scale * Q K^T - lse),  dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),
    dS = P * (dP - D),  dQ = scale * dS K,  dK = scale * dS^T Q.

Shape legend: B batch, N heads, Lq query rows, Lk key rows, Dh head dim.
Conventions: lse is fp32 `[B, N, Lq]`, the natural log of sum over valid keys of exp(scale * q.k); a row with no
valid key has lse = -inf, out = 0 and zero gradients. The public primitives return fp32 (accumulators); callers cast.
A key mask is `[B, Lk]` bool, True = valid key.

Implementations (`impl`):
  "math"   explicit fp32 softmax over materialised `[B, N, Lq, Lk]` scores; any device and dtype; the reference.
  "fused"  torch's own fused kernels that return the lse (no extra dependency). CPU: aten's
           `_scaled_dot_product_flash_attention_for_cpu` (+ `_backward`), any floating dtype, key masks as an
           additive 0 / -inf bias. CUDA: `_scaled_dot_product_flash_attention` (fp16 / bf16, no key mask, Dh % 8 == 0,
           Dh <= 256), else `_scaled_dot_product_efficient_attention` (key masks as an additive bias).
           Both backward ops take out and lse as inputs, so they accept the merged global (out, lse) of a ring.
  "flash"  flash-attn's private forward / backward (FA3's `flash_attn_interface` when installed, else FA2's
           `flash_attn.flash_attn_interface`, 2.6 or >= 2.7 API) on CUDA fp16 / bf16, Dh % 8 == 0, Dh <= 256; key
           masks run per sample on the valid keys.
  "auto"   flash when it applies, else fused.
`attention()` is the differentiable dense core; with impl="auto" it calls torch's SDPA, which dispatches to the same
fused kernels (and honours `torch.nn.attention.sdpa_kernel`, FLOP counters and torch.compile).
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _import_flash_attn():
    """flash-attn's interface module: FA3 (the Hopper build's top-level `flash_attn_interface`) or FA2; absent or
    broken on CPU-only installs (catch everything)."""
    errors = []
    for name in ("flash_attn_interface", "flash_attn.flash_attn_interface"):
        try:
            return importlib.import_module(name), None
        except Exception as err:  # noqa: BLE001
            errors.append(f"{name}: {type(err).__name__}: {err}")
    return None, "; ".join(errors)


_fa, _FLASH_IMPORT_ERROR = _import_flash_attn()

IMPLS = ("auto", "math", "fused", "flash")
_NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)
_aten = torch.ops.aten


def flash_available() -> bool:
    """True when flash-attn imported and CUDA is present."""
    return _fa is not None and torch.cuda.is_available()


def _flash_fits(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in _HALF and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _fused_fits(q: Tensor) -> bool:
    return q.device.type in ("cpu", "cuda") and q.is_floating_point()


def resolve_impl(impl: str, q: Tensor) -> str:
    """Return "math", "fused" or "flash" for `impl` in IMPLS and a query tensor; explain what is missing."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: choose one of {list(IMPLS)}")
    if impl == "flash":
        if not flash_available():
            raise RuntimeError(
                f"attention impl='flash' needs flash-attn and CUDA (import said: {_FLASH_IMPORT_ERROR}); "
                "install the gpu extra (pip install 'vidtron[gpu]') or use impl='fused'"
            )
        if not _flash_fits(q):
            raise ValueError("attention impl='flash' needs CUDA fp16/bf16 tensors with head dim % 8 == 0 and <= 256")
        return "flash"
    if impl == "fused" and not _fused_fits(q):
        raise ValueError(f"attention impl='fused' needs floating CPU or CUDA tensors, got {q.dtype} on {q.device}")
    if impl == "auto":
        if _flash_fits(q) and flash_available():
            return "flash"
        return "fused" if _fused_fits(q) else "math"
    return impl


def default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _empty_rows(out: Tensor, lse: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Samples with no valid key: out = 0, lse = -inf (kernels disagree on what they return there)."""
    if key_mask is None:
        return out, lse
    empty_B = ~key_mask.any(dim=1)  # [B]
    return out.masked_fill(empty_B[:, None, None, None], 0.0), lse.masked_fill(empty_B[:, None, None], _NEG_INF)


def _finite_lse(lse: Tensor) -> Tensor:
    """lse for a backward kernel: -inf rows (no valid key anywhere) become 0; their keys are all masked, so P = 0."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).float().contiguous()


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


def _math_backward(dout, q, k, v, out, lse, key_mask, scale, delta=None):
    delta = attention_delta(dout, out) if delta is None else delta  # [B, N, Lq]
    p = _probs(_scores(q, k, key_mask, scale), lse)  # [B, N, Lq, Lk]
    dout = dout.float()
    dv = p.transpose(-1, -2) @ dout  # [B, N, Lk, Dh]
    dp = dout @ v.float().transpose(-1, -2)  # [B, N, Lq, Lk]
    ds = p * (dp - delta[..., None])  # [B, N, Lq, Lk]
    dq = (ds @ k.float()) * scale  # [B, N, Lq, Dh]
    dk = (ds.transpose(-1, -2) @ q.float()) * scale  # [B, N, Lk, Dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# fused implementation: torch's own kernels (outputs in the input dtype, lse fp32)
# ---------------------------------------------------------------------------------------------------------------
def _additive_bias(key_mask: Tensor, dtype: torch.dtype, align: int = 1) -> Tensor:
    """`[B, Lk]` bool -> additive bias `[B, 1, 1, Lk]` (0 valid, -inf masked), its rows stored `align`-aligned."""
    B, Lk = key_mask.shape
    store = torch.zeros(B, 1, 1, -(-Lk // align) * align, dtype=dtype, device=key_mask.device)
    store[..., :Lk].masked_fill_(~key_mask[:, None, None, :], _NEG_INF)
    return store[..., :Lk]


def _cpu_forward(q, k, v, key_mask, scale):
    bias = None if key_mask is None else _additive_bias(key_mask, q.dtype)  # [B, 1, 1, Lk]
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out, lse.float()  # lse comes back as a strided [B, N, Lq] view, natural log


def _cpu_backward(dout, q, k, v, out, lse, key_mask, scale):
    bias = None if key_mask is None else _additive_bias(key_mask, q.dtype)
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, _finite_lse(lse), 0.0, False, attn_mask=bias, scale=scale
    )


def _cuda_uses_flash(q: Tensor, key_mask: Tensor | None) -> bool:
    return key_mask is None and q.dtype in _HALF and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _efficient_bias(q: Tensor, k: Tensor, key_mask: Tensor | None) -> Tensor | None:
    """The mem-efficient kernel's bias: `[B, N, Lq, Lk]`, expanded from 16-aligned `[B, 1, 1, Lk]` storage."""
    if key_mask is None:
        return None
    return _additive_bias(key_mask, q.dtype, align=16).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _cuda_forward(q, k, v, key_mask, scale):
    if _cuda_uses_flash(q, key_mask):
        out, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse
    bias = _efficient_bias(q, k, key_mask)
    out, lse, *_ = _aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[2]]  # its lse rows are padded to a multiple of 32


def _cuda_backward(dout, q, k, v, out, lse, key_mask, scale):
    dout, out, lse = dout.to(q.dtype), out.to(q.dtype), _finite_lse(lse)
    Lq, Lk = q.shape[2], k.shape[2]
    if _cuda_uses_flash(q, key_mask):  # no dropout: the philox state is not read
        seed, offset = (torch.zeros(s, dtype=torch.uint64, device=q.device) for s in ((2,), ()))
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, Lq, Lk, 0.0, False, seed, offset, scale=scale
        )
    lse = F.pad(lse, (0, -Lq % 32))  # the padded layout its forward returns
    seed, offset = (torch.zeros((), dtype=torch.int64, device=q.device) for _ in range(2))
    bias, grad_mask = _efficient_bias(q, k, key_mask), [True, True, True, False]
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse, seed, offset, 0.0, grad_mask, False, scale=scale
    )
    return dq, dk, dv


def _fused_forward(q, k, v, key_mask, scale):
    fwd = _cuda_forward if q.is_cuda else _cpu_forward
    return _empty_rows(*fwd(q, k, v, key_mask, scale), key_mask)


def _fused_backward(dout, q, k, v, out, lse, key_mask, scale):
    bwd = _cuda_backward if q.is_cuda else _cpu_backward
    dq, dk, dv = bwd(dout, q, k, v, out, lse, key_mask, scale)
    if key_mask is not None:  # samples with no valid key get exact zeros whatever the kernel did there
        empty_B = ~key_mask.any(dim=1)[:, None, None, None]
        dq, dk, dv = (g.masked_fill(empty_B, 0.0) for g in (dq, dk, dv))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# flash-attn implementation (CUDA; layout [B, L, N, Dh] inside flash)
# ---------------------------------------------------------------------------------------------------------------
def _accepted(fn, **candidates) -> dict:
    """The keyword arguments of `candidates` that `fn` takes. flash-attn's private API moved: 2.6 takes
    window_size=(l, r); 2.7+ window_size_left / _right and wraps the function in a torch custom op (whose `_init_fn`
    is the plain function); FA3 has no dropout / alibi / return_softmax and names causal `is_causal` in backward."""
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    return {name: value for name, value in candidates.items() if name in params}


_NO_WINDOW = dict(window_size=(-1, -1), window_size_left=-1, window_size_right=-1)
_PLAIN = dict(dropout_p=0.0, causal=False, softcap=0.0, alibi_slopes=None, **_NO_WINDOW)


def _unpack_flash_forward(res: tuple) -> tuple[Tensor, Tensor]:
    """(out, lse) from `_flash_attn_forward`'s tuple: 2.6 returns (out, q, k, v, out_padded, softmax_lse, S_dmask,
    rng_state); 2.7+ returns (out_padded, softmax_lse, S_dmask, rng_state); FA3 (out, softmax_lse, out_accum,
    softmax_lse_accum)."""
    if len(res) == 8:
        return res[0], res[5]
    if len(res) == 4:
        return res[0], res[1]
    raise RuntimeError(
        f"flash-attn's _flash_attn_forward returned {len(res)} values; vidtron reads the 2.6 (8) and 2.7+ / 3 (4) "
        "layouts: use impl='fused'"
    )


def _flash_forward_dense(q, k, v, scale):
    """q, k, v [B, N, L, Dh] -> out [B, N, Lq, Dh] (input dtype), lse fp32 [B, N, Lq]."""
    fwd = _fa._flash_attn_forward
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, L, N, Dh]
    res = fwd(q_, k_, v_, **_accepted(fwd, softmax_scale=scale, return_softmax=False, **_PLAIN))
    out, lse = _unpack_flash_forward(tuple(res))
    return out[..., : q.shape[-1]].transpose(1, 2), lse.float()


def _flash_backward_dense(dout, q, k, v, out, lse, scale):
    bwd = _fa._flash_attn_backward
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, L, N, Dh]
    dout_, out_ = (t.to(q.dtype).transpose(1, 2).contiguous() for t in (dout, out))
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    grads = dict(dq=dq, dk=dk, dv=dv)  # filled in place (2.6 also returns them, 2.7+ and FA3 return softmax_d)
    extra = dict(softmax_scale=scale, is_causal=False, deterministic=False, rng_state=None, **_PLAIN)
    bwd(dout_, q_, k_, v_, out_, _finite_lse(lse), **_accepted(bwd, **grads, **extra))
    return tuple(t.transpose(1, 2) for t in (dq, dk, dv))


def _flash_forward(q, k, v, key_mask, scale):
    if key_mask is None:
        return _flash_forward_dense(q, k, v, scale)
    out = q.new_zeros(q.shape)  # [B, N, Lq, Dh]
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
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
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
_FORWARD = {"math": _math_forward, "fused": _fused_forward, "flash": _flash_forward}
_BACKWARD = {"fused": _fused_backward, "flash": _flash_backward}


def _no_keys(q: Tensor, k: Tensor) -> bool:
    return k.shape[2] == 0 or q.shape[2] == 0


def _forward(q, k, v, key_mask, scale, impl):
    """(out in the kernel's dtype, lse fp32) for a resolved impl; no keys at all gives the identity of the merge."""
    if _no_keys(q, k):
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:-1], _NEG_INF, dtype=torch.float32)
    return _FORWARD[impl](q, k, v, key_mask, scale)


def _backward(dout, q, k, v, out, lse, key_mask, scale, impl, delta=None):
    """(dq, dk, dv) in the kernel's dtype for a resolved impl."""
    if _no_keys(q, k):
        return tuple(t.new_zeros(t.shape, dtype=torch.float32) for t in (q, k, v))
    if impl == "math":
        return _math_backward(dout, q, k, v, out, lse, key_mask, scale, delta)
    return _BACKWARD[impl](dout, q, k, v, out, lse, key_mask, scale)


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, scale: float | None = None, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Softmax attention of q `[B, N, Lq, Dh]` over k, v `[B, N, Lk, Dh]` -> (out fp32 `[B, N, Lq, Dh]`, lse fp32
    `[B, N, Lq]`). `key_mask` `[B, Lk]` bool, True = valid key; None = all valid."""
    out, lse = _forward(q, k, v, key_mask, default_scale(q, scale), resolve_impl(impl, q))
    return out.float(), lse


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
    passed to reuse it across blocks (math path; the fused and flash kernels compute it themselves).
    """
    impl = resolve_impl(impl, q)
    grads = _backward(dout, q, k, v, out, lse, key_mask, default_scale(q, scale), impl, delta)
    return tuple(g.float() for g in grads)


def merge_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint key sets: out `[B, N, Lq, Dh]`, lse `[B, N, Lq]` (fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only where both are -inf
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a, w_b = torch.exp(lse_a - safe)[..., None], torch.exp(lse_b - safe)[..., None]  # [B, N, Lq, 1]
    return w_a * out_a + w_b * out_b, lse


# ---------------------------------------------------------------------------------------------------------------
# the differentiable dense core
# ---------------------------------------------------------------------------------------------------------------
class _BlockAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, impl):
        out, lse = _forward(q, k, v, key_mask, scale, impl)
        out = out.to(q.dtype)  # [B, N, Lq, Dh]
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.scale, ctx.impl = scale, impl
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        grads = _backward(dout, q, k, v, out, lse, key_mask, ctx.scale, ctx.impl)
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None, None, None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """torch SDPA with a `[B, Lk]` key mask; samples with no valid key attend everything, then are zeroed (so no
    backend sees an empty row and their gradients are exactly 0)."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty_B = ~key_mask.any(dim=1)  # [B]
    mask_B11L = (key_mask | empty_B[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11L, scale=scale)  # [B, N, Lq, Dh]
    return out.masked_fill(empty_B[:, None, None, None], 0.0)


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, scale: float | None = None, impl: str = "auto"
) -> Tensor:
    """Differentiable dense attention: q `[B, N, Lq, Dh]`, k, v `[B, N, Lk, Dh]`, key_mask `[B, Lk]` -> out
    `[B, N, Lq, Dh]` in q's dtype. "auto": torch SDPA (fused kernels); "math" / "fused" / "flash": the primitives
    above with their own backward."""
    scale = default_scale(q, scale)
    if impl == "auto":
        return _sdpa(q, k, v, key_mask, scale)
    return _BlockAttentionFn.apply(q, k, v, key_mask, scale, resolve_impl(impl, q))


def joint_key_mask(text_mask: Tensor | None, seq_len: int) -> Tensor | None:
    """Key mask `[B, L]` for a `[video; text]` sequence of length L whose last T keys follow `text_mask` `[B, T]`."""
    if text_mask is None:
        return None
    video = text_mask.new_ones(text_mask.shape[0], seq_len - text_mask.shape[1], dtype=torch.bool)  # [B, L - T]
    return torch.cat([video, text_mask.bool()], dim=1)


class LseDenseAttention(nn.Module):
    """Dense joint attention with the attn_core contract: (q, k, v `[B, N, L, Dh]`, text_mask `[B, T]`) -> `[B, N, L,
    Dh]`; every query attends all video keys and the valid text keys (the last T). impl: see `attention`."""

    def __init__(self, scale: float | None = None, impl: str = "auto"):
        super().__init__()
        self.scale, self.impl = scale, impl

    def forward(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None = None) -> Tensor:
        key_mask = joint_key_mask(text_mask, k.shape[2])  # [B, L] or None
        return attention(q, k, v, key_mask, self.scale, self.impl)
