"""Block-sparse flash-style attention in Triton (forward only), the "triton" backend of SSTA.

Shape legend:
    B batch, N heads, Dh head dim; nb_q, nb_k query / key blocks; bs tokens per block
    K most kept key blocks of any query block; BLOCK_M x BLOCK_N the kernel's query x key tile, BLOCK_D >= Dh

One program handles BLOCK_M query rows of one query block for one (batch, head). It walks the list of kept
key blocks of its query block (built on the host from the block mask), and inside each kept block the keys in
BLOCK_N chunks, with an online softmax in fp32. Padding keys (key_valid False) get -inf scores; a row with no
valid key returns zeros. fp32 inputs use IEEE dots (no TF32) so results match the torch backend to ~1e-6.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 is set before
this module is imported (inputs are then upcast to fp32 after loading: bf16 is wrong in the interpreter).
Importing never fails: without a usable triton, `block_sparse_attention_triton` raises a RuntimeError.
"""

from __future__ import annotations

import math
import os

import torch

from vidtron.errors import ConfigError
from vidtron.kernels.ssta.inputs import expand_inputs
from vidtron.kernels.ssta.mask import kept_block_indices

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or broken (e.g. no driver): the torch backend still works
    triton, tl = None, None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, when the kernel is defined

if triton is not None:

    @triton.jit
    def _bsa_fwd_kernel(
        Q,
        K,
        V,
        Out,
        KV_IDX,
        KV_CNT,
        KEY_VALID,
        scale,
        n_heads,
        nb_q,
        nb_k,
        k_max,
        BS: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Q, Out: [B*N, nb_q, BS, DH]; K, V: [B*N, nb_k, BS, DH]; KV_IDX: [B*N, nb_q, k_max] int32;
        # KV_CNT: [B*N, nb_q] int32; KEY_VALID: [B, nb_k, BS] int8. All contiguous.
        N_SUB: tl.constexpr = (BS + BLOCK_M - 1) // BLOCK_M
        pid_m = tl.program_id(0)  # query block * N_SUB + row chunk
        bn = tl.program_id(1).to(tl.int64)  # batch * N + head
        qb = pid_m // N_SUB
        rows = (pid_m % N_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows inside the block
        dcol = tl.arange(0, BLOCK_D)
        row_ok, d_ok = rows < BS, dcol < DH
        q_off = ((bn * nb_q + qb) * BS + rows[:, None]) * DH + dcol[None, :]  # [BLOCK_M, BLOCK_D]
        q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        b = bn // n_heads
        count = tl.load(KV_CNT + bn * nb_q + qb)
        for j in range(0, count):
            kb = tl.load(KV_IDX + (bn * nb_q + qb) * k_max + j).to(tl.int64)  # kept key block
            for s in range(0, BS, BLOCK_N):
                cols = s + tl.arange(0, BLOCK_N)
                col_ok = cols < BS
                valid = tl.load(KEY_VALID + (b * nb_k + kb) * BS + cols, mask=col_ok, other=0) != 0  # [BLOCK_N]
                kv_rows = (bn * nb_k + kb) * BS + cols
                kt = tl.load(K + kv_rows[None, :] * DH + dcol[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                v = tl.load(V + kv_rows[:, None] * DH + dcol[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    kt, v = kt.to(tl.float32), v.to(tl.float32)
                if IEEE:
                    qk = tl.dot(q, kt, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
                else:
                    qk = tl.dot(q, kt)
                qk = tl.where(valid[None, :], qk * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp finite
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if IEEE:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows with no valid key -> 0
        tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def _check_no_grad(*tensors: torch.Tensor) -> None:
    """The kernel has no backward: refuse inputs autograd would track, instead of returning a detached result."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ConfigError(
            "ssta.backend",
            "triton",
            "is forward only and got inputs that require grad: run it under torch.no_grad() / torch.inference_mode()"
            " (sampling), or use backend='torch' to train through SSTA",
        )


def _check_device(q: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("ssta backend 'triton' needs triton: pip install 'triton==3.*' (or use backend='torch')")
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "ssta backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing vidtron.kernels.ssta"
        )


def block_sparse_attention_triton(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    block_mask: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton backend of `block_sparse_attention` (same arguments and result; forward only: inputs that require
    grad, with grad mode on, raise ConfigError)."""
    _check_no_grad(q_blocks, k_blocks, v_blocks)
    _check_device(q_blocks)
    B, N, nb_q, bs, Dh = q_blocks.shape
    nb_k = k_blocks.shape[2]
    mask_BNqk, valid_Bkbs = expand_inputs(q_blocks, k_blocks, v_blocks, block_mask, key_valid)
    idx_BNqK, count_BNq = kept_block_indices(mask_BNqk)
    if idx_BNqK.shape[-1] == 0:  # nothing kept anywhere: keep one (never read) slot for a valid pointer
        idx_BNqK = torch.zeros(B, N, nb_q, 1, dtype=torch.long, device=q_blocks.device)
    idx = idx_BNqK.to(torch.int32).contiguous()  # [B, N, nb_q, K]
    count = count_BNq.to(torch.int32).contiguous()  # [B, N, nb_q]
    valid = valid_Bkbs.to(torch.int8).contiguous()  # [B, nb_k, bs]
    q, k, v = q_blocks.contiguous(), k_blocks.contiguous(), v_blocks.contiguous()
    out = torch.empty_like(q)  # [B, N, nb_q, bs, Dh]
    fp32 = q.dtype == torch.float32
    block_m = min(64, _pow2_at_least(bs))
    block_n = min(32 if fp32 else 64, _pow2_at_least(bs))  # fp32, Dh 128: ~74 KB of shared memory at 2 stages
    grid = (nb_q * math.ceil(bs / block_m), B * N)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(Dh)
    args = (q, k, v, out, idx, count, valid, sm_scale, N, nb_q, nb_k, idx.shape[-1])
    meta = dict(BS=bs, DH=Dh, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2_at_least(Dh))
    meta |= dict(UPCAST=q.device.type == "cpu", IEEE=fp32, num_stages=2 if fp32 else 3)
    _bsa_fwd_kernel[grid](*args, **meta)
    return out
