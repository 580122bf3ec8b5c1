"""The log-sum-exp block attention kernels (vidtron/kernels/lse_attention.py) against the explicit fp32 reference.

Every implementation is checked the way the ring uses it: each key block's forward gives (out, lse), the blocks are
merged by log-sum-exp, and each block's backward takes the FINAL merged (out, lse). References: "math" (explicit fp32
softmax) computed on the same (possibly bf16-rounded) inputs, and plain autograd through a masked softmax.

Tolerances (max abs error; values and gradients are O(1)):
  fp32  1e-5  fused (torch's flash-for-CPU kernel) vs math differ only in summation order (observed <= 6e-7);
  bf16  2e-2  out / grads: the kernels round their outputs to bf16 (eps 7.8e-3, observed <= 4e-3), lse 1e-3.
GPU tests (`-m gpu`, skipped without CUDA) use relative tolerances: fp32 1e-3 (TF32 may be on), bf16 3e-2.

Shape legend: B batch, N heads, Lq query rows, Lk key rows, Dh head dim.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vidtron.kernels import lse_attention as la
from vidtron.kernels.attention import DenseAttention

B, N, LQ, LK, DH = 2, 3, 9, 20, 16
BLOCKS = [(0, 6), (6, 13), (13, 20)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16]


def make_data(dtype=torch.float32, device="cpu", seed=0, lq=LQ, lk=LK, dh=DH):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, lq, dh, generator=g)  # [B, N, Lq, Dh]
    k, v = torch.randn(B, N, lk, dh, generator=g), torch.randn(B, N, lk, dh, generator=g)  # [B, N, Lk, Dh]
    dout = torch.randn(B, N, lq, dh, generator=g)
    key_mask = torch.ones(B, lk, dtype=torch.bool)  # [B, Lk]
    key_mask[0, 2:5] = False
    key_mask[1, 6:13] = False  # sample 1: the middle block is fully masked
    return [t.to(device) for t in (q.to(dtype), k.to(dtype), v.to(dtype), dout, key_mask)]


def reference(q, k, v, dout, key_mask):
    """Autograd through an explicit masked softmax in fp32 (on the given, possibly bf16-rounded, inputs)."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, N, Lq, Lk]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1).nan_to_num() @ v
    out.backward(dout.float())
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def blockwise(q, k, v, dout, key_mask, impl):
    """Forward block by block with merges, then each block's backward from the merged (out, lse)."""
    out, lse = la.block_attention(q, k[:, :, :0], v[:, :, :0])
    masks = [None if key_mask is None else key_mask[:, a:b] for a, b in BLOCKS]
    for (a, b), m in zip(BLOCKS, masks):
        o_b, l_b = la.block_attention(q, k[:, :, a:b], v[:, :, a:b], m, impl=impl)
        out, lse = la.merge_lse(out, lse, o_b, l_b)
    grads = [
        la.block_attention_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out.to(q.dtype), lse, m, impl=impl)
        for (a, b), m in zip(BLOCKS, masks)
    ]  # per block: (dq share, dk, dv)
    dq = sum(g[0] for g in grads)  # [B, N, Lq, Dh]
    dk, dv = (torch.cat([g[i] for g in grads], dim=2) for i in (1, 2))  # [B, N, Lk, Dh]
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def assert_close(got: dict, want: dict, dtype, what: str):
    for key in ("out", "lse", "dq", "dk", "dv"):
        if key not in got:
            continue
        a, b = got[key].float(), want[key].float()
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{what} {key}: -inf pattern differs"
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        tol = (LSE_TOL if key == "lse" else TOL)[dtype]
        assert err <= tol, f"{what} {key}: max abs error {err:.2e} > {tol}"


# ---------------------------------------------------------------------------------------------------------------
# fused (CPU) vs the math reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
@pytest.mark.parametrize("impl", ["fused", "math", "auto"])
def test_blockwise_forward_backward_matches_reference(dtype, masked, impl):
    q, k, v, dout, key_mask = make_data(dtype)
    key_mask = key_mask if masked else None
    assert_close(blockwise(q, k, v, dout, key_mask, impl), reference(q, k, v, dout, key_mask), dtype, impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_equals_math_on_strided_ring_slices(dtype):
    """The ring passes slices of a stacked [2, B, N, L, Dh] K/V buffer (non-contiguous along L)."""
    q, k, v, dout, key_mask = make_data(dtype, seed=3)
    kv = torch.stack([k, v])[:, :, :, :11]  # [2, B, N, 11, Dh]
    got = la.block_attention(q, kv[0], kv[1], key_mask[:, :11], impl="fused")
    want = la.block_attention(q, kv[0].contiguous(), kv[1].contiguous(), key_mask[:, :11], impl="math")
    assert_close(dict(out=got[0], lse=got[1]), dict(out=want[0], lse=want[1]), dtype, "strided")


@pytest.mark.parametrize("impl", ["fused", "math"])
def test_empty_rows_give_zero_out_minus_inf_lse_and_zero_grads(impl):
    q, k, v, dout, key_mask = make_data()
    key_mask[1] = False  # sample 1 has no valid key at all
    out, lse = la.block_attention(q, k, v, key_mask, impl=impl)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
    grads = la.block_attention_backward(dout, q, k, v, out, lse, key_mask, impl=impl)
    for g in grads:
        assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))
    none = la.block_attention(q, k[:, :, :0], v[:, :, :0], impl=impl)  # no keys: the identity of the merge
    assert torch.equal(none[0], torch.zeros_like(none[0])) and torch.isneginf(none[1]).all()


@pytest.mark.parametrize("impl", ["auto", "fused", "math"])
def test_dense_attention_core_empty_sample(impl):
    """attention() and DenseAttention: a sample without valid keys gives zeros and zero grads, with every backend
    (including SDPA's math backend, which would give NaN on an empty row)."""
    q, k, v, dout, key_mask = make_data(seed=5)
    key_mask[0] = False
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(backend):
            out = la.attention(*x, key_mask, impl=impl)
        (out * dout).sum().backward()
        ref = reference(q, k, v, dout, key_mask)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert (out[1] - ref["out"][1]).abs().max() <= 1e-5
        for t, name in zip(x, ("dq", "dk", "dv")):
            assert torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
            assert (t.grad - ref[name]).abs().max() <= 1e-5, (impl, backend, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["auto", "fused", "math"])
def test_dense_attention_module_matches_reference(dtype, impl):
    q, k, v, dout, _ = make_data(dtype, seed=7, lk=LQ)
    text_mask = torch.tensor([[True, True, True], [True, False, False]])  # the last 3 keys are text
    key_mask = la.joint_key_mask(text_mask, LQ)  # [B, LQ]
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = DenseAttention(impl)(*x, text_mask)
    assert out.dtype == dtype
    out.float().mul(dout).sum().backward()
    got = dict(out=out, dq=x[0].grad, dk=x[1].grad, dv=x[2].grad)
    assert_close(got, reference(q, k, v, dout, key_mask), dtype, f"DenseAttention({impl})")


def test_resolve_impl():
    x = torch.zeros(1, 1, 1, 8)
    assert la.resolve_impl("auto", x) == "fused"
    assert la.resolve_impl("auto", x.bfloat16()) == "fused"
    assert la.resolve_impl("math", x) == "math"
    with pytest.raises(ValueError, match="choose one of"):
        la.resolve_impl("xformers", x)
    with pytest.raises(ValueError, match="floating CPU or CUDA"):
        la.resolve_impl("fused", x.long())


# ---------------------------------------------------------------------------------------------------------------
# flash-attn adapter, on CPU, against fake flash_attn_interface modules in the 2.6 and 2.7+ layouts
# ---------------------------------------------------------------------------------------------------------------
def _fake_forward(q, k, v, softmax_scale):
    """The math reference in flash-attn's layout: q, k, v [B, L, N, Dh] -> out [B, Lq, N, Dh], lse [B, N, Lq]."""
    out, lse = la._math_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, softmax_scale)
    return out.transpose(1, 2).to(q.dtype), lse


def _fake_backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale):
    assert lse.dtype == torch.float32 and lse.is_contiguous() and torch.isfinite(lse).all()
    t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
    grads = la._math_backward(*t, lse, None, softmax_scale)
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g.transpose(1, 2))
    return la.attention_delta(t[0], t[4])


def fake_flash_26():
    """flash-attn 2.6: window_size tuple; forward returns (out, q, k, v, out_padded, softmax_lse, S_dmask, rng)."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            return_softmax):  # fmt: skip
        assert window_size == (-1, -1) and dropout_p == 0.0 and not causal
        out, lse = _fake_forward(q, k, v, softmax_scale)
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, rng_state=None):  # fmt: skip
        assert window_size == (-1, -1)
        delta = _fake_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale)
        return dq, dk, dv, delta

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward, _flash_attn_backward=_flash_attn_backward)


class _CustomOpLike:
    """Like torch.library.custom_op's CustomOpDef (as flash-attn >= 2.7 wraps its functions): `_init_fn` holds the
    plain function, the object itself only takes *args, **kwargs."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


def fake_flash_27():
    """flash-attn >= 2.7: window_size_left / _right; forward returns (out_padded, softmax_lse, S_dmask, rng_state);
    backward fills dq, dk, dv in place and returns softmax_d."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                            alibi_slopes, return_softmax):  # fmt: skip
        assert (window_size_left, window_size_right) == (-1, -1)
        out, lse = _fake_forward(q, k, v, softmax_scale)
        return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):  # fmt: skip
        return _fake_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale)

    return types.SimpleNamespace(
        _flash_attn_forward=_CustomOpLike(_flash_attn_forward), _flash_attn_backward=_CustomOpLike(_flash_attn_backward)
    )


def fake_flash_3():
    """flash-attn 3 (hopper `flash_attn_interface`): many optional varlen / paged / fp8 arguments with defaults, no
    dropout; forward returns (out, softmax_lse, out_accum, softmax_lse_accum); backward takes dq, dk, dv after the
    varlen arguments, `is_causal`, and returns softmax_d."""

    def _flash_attn_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                            causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0,
                            num_splits=1, sm_margin=0):  # fmt: skip
        assert out_ is None and cu_seqlens_q is None and not causal and softcap == 0.0
        out, lse = _fake_forward(q, k, v, softmax_scale)
        return out, lse, torch.empty(0), torch.empty(0)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
                             sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
                             softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1,
                             softcap=0.0, deterministic=False, sm_margin=0):  # fmt: skip
        assert dq is not None and dk is not None and dv is not None and not is_causal
        return _fake_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale)

    return types.SimpleNamespace(
        _flash_attn_forward=_CustomOpLike(_flash_attn_forward), _flash_attn_backward=_CustomOpLike(_flash_attn_backward)
    )


@pytest.mark.parametrize(
    "fake", [fake_flash_26, fake_flash_27, fake_flash_3], ids=["flash-attn-2.6", "flash-attn-2.7", "flash-attn-3"]
)
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
def test_flash_attn_adapter_reads_both_layouts(monkeypatch, fake, masked):
    monkeypatch.setattr(la, "_fa", fake())
    monkeypatch.setattr(la, "resolve_impl", lambda impl, q: impl)  # the fakes run on CPU
    q, k, v, dout, key_mask = make_data(seed=11)
    key_mask = key_mask if masked else None
    assert_close(blockwise(q, k, v, dout, key_mask, "flash"), reference(q, k, v, dout, key_mask), torch.float32, "fa")


def test_flash_attn_unknown_layout_explains(monkeypatch):
    fake = types.SimpleNamespace(_flash_attn_forward=lambda *a, **kw: (1, 2, 3))
    monkeypatch.setattr(la, "_fa", fake)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="returned 3 values"):
        la._flash_forward(q, q, q, None, 1.0)


@pytest.mark.skipif(la.flash_available(), reason="flash-attn is present here")
def test_flash_request_without_flash_attn_explains():
    with pytest.raises(RuntimeError, match="flash-attn"):
        la.resolve_impl("flash", torch.zeros(1, 1, 1, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
def test_cuda_op_calls_fit_the_op_schemas_on_meta(dtype, masked):
    """The CUDA fused path's aten calls (flash, or mem-efficient with an expanded bias and a 32-padded lse) against
    the ops' schemas and meta kernels: argument order, shapes and dtypes, without a GPU."""
    q = torch.empty(B, N, 300, 64, device="meta", dtype=dtype)  # [B, N, Lq, Dh]
    k = torch.empty(B, N, LK, 64, device="meta", dtype=dtype)  # [B, N, Lk, Dh]
    key_mask = torch.ones(B, LK, dtype=torch.bool, device="meta") if masked else None
    out, lse = la._cuda_forward(q, k, k, key_mask, 0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, dtype, q.shape[:-1], torch.float32)
    grads = la._cuda_backward(out, q, k, k, out, lse, key_mask, 0.125)
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, dtype), (k.shape, dtype), (k.shape, dtype)]


# ---------------------------------------------------------------------------------------------------------------
# CUDA (make test-gpu)
# ---------------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def _assert_rel(got: dict, want: dict, dtype, what: str):
    for key in ("out", "lse", "dq", "dk", "dv"):
        a, b = got[key].float().cpu(), want[key].float().cpu()
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{what} {key}: -inf pattern differs"
        err = ((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp_min(1e-6)).item()
        assert err <= GPU_TOL[dtype], f"{what} {key}: relative error {err:.2e} > {GPU_TOL[dtype]}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["flash-or-efficient", "efficient-bias"])
def test_cuda_fused_matches_reference(dtype, masked):
    """bf16 without a mask runs aten's flash kernel, everything else the memory-efficient one (Lq = 300 is not a
    multiple of 32, so the padded lse layout of the efficient kernel is exercised)."""
    q, k, v, dout, key_mask = make_data(dtype, "cuda", seed=13, lq=300, lk=LK, dh=64)
    key_mask = key_mask if masked else None
    want = reference(q, k, v, dout, key_mask)
    _assert_rel(blockwise(q, k, v, dout, key_mask, "fused"), want, dtype, "cuda fused")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_cuda_dense_attention_matches_reference(impl):
    q, k, v, dout, key_mask = make_data(torch.bfloat16, "cuda", seed=17, lq=LK, dh=64)
    key_mask[1] = False  # an empty sample
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = la.attention(*x, key_mask, impl=impl)
    out.float().mul(dout).sum().backward()
    got = dict(out=out, lse=torch.zeros(1), dq=x[0].grad, dk=x[1].grad, dv=x[2].grad)
    want = dict(reference(q, k, v, dout, key_mask), lse=torch.zeros(1))
    _assert_rel(got, want, torch.bfloat16, f"cuda attention({impl})")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not la.flash_available(), reason="needs flash-attn")
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
def test_cuda_flash_attn_matches_reference(masked):
    q, k, v, dout, key_mask = make_data(torch.bfloat16, "cuda", seed=19, lq=300, lk=LK, dh=64)
    key_mask = key_mask if masked else None
    want = reference(q, k, v, dout, key_mask)
    _assert_rel(blockwise(q, k, v, dout, key_mask, "flash"), want, torch.bfloat16, "flash-attn")
