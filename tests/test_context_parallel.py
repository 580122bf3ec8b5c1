"""Context-parallel attention (ring, Ulysses, USP) equals dense attention in forward and backward, on gloo ranks.

Every rank builds the same full q, k, v `[B, N, Lv + T, Dh]` from a fixed seed, takes its video chunk plus the
replicated text, and runs the core. Per-rank loss: (video rows * the global video weights' chunk).sum() + (text rows
* THIS rank's own text weights).sum(); padding rows get weight 0. The dense reference computes the sum of these
losses over the CP ranks with one copy of the text. Checks: video rows and their grads equal the reference rows;
every rank's text rows equal the reference; the SUM over ranks of the text grads equals the reference text grads.
The cores run their default block kernel (impl="auto": torch's fused flash-for-CPU forward / backward, the backward
fed the merged global out and lse). Tolerance 1e-5 in fp32: the math is the same up to summation order; observed max
errors <= 1.5e-6 on gradients of magnitude ~1-10.

Shape legend: B batch, N heads, Lv video tokens, T text tokens, Dh head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vidtron.errors import ConfigError
from vidtron.kernels.lse_attention import (
    LseDenseAttention,
    block_attention,
    block_attention_backward,
    flash_available,
    merge_lse,
    resolve_impl,
)
from vidtron.parallel.context import (
    UlyssesAttention,
    build_cp_attention,
    check_ulysses_heads,
    gather_video_tokens,
    local_video_len,
    shard_video_tokens,
)
from vidtron.parallel.dims import ParallelDims
from vidtron.testing.multirank import run_ranks

B, N, DH, T = 2, 4, 8, 5
TEXT_VALID = (5, 3)  # valid text tokens per sample
TOL = 1e-5

# (world, layout name, ParallelDims kwargs, video lengths)
LAYOUTS = {
    2: [
        ("ring", dict(cp=2, cp_mode="ring"), (24, 23)),
        ("ulysses", dict(cp=2, cp_mode="ulysses"), (24, 23)),
    ],
    4: [
        ("ring", dict(cp=4, cp_mode="ring"), (24, 21, 5)),
        ("ulysses", dict(cp=4, cp_mode="ulysses"), (24, 21)),
        ("usp2x2", dict(cp=4, cp_mode="usp", ulysses=2), (24, 21, 5)),
        ("ring_dp2", dict(dp_shard=2, cp=2, cp_mode="ring"), (24, 23)),
    ],
}
CASES = [(w, name, lv) for w, layouts in LAYOUTS.items() for name, _, lvs in layouts for lv in lvs]


# ---------------------------------------------------------------------------------------------------------------
# data and the dense reference
# ---------------------------------------------------------------------------------------------------------------
def make_case(video_len: int, cp: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 1000 * video_len + cp)
    q, k, v = (torch.randn(B, N, video_len + T, DH, generator=g) for _ in range(3))  # [B, N, Lv + T, Dh]
    text_mask = torch.arange(T)[None, :] < torch.tensor(TEXT_VALID)[:, None]  # [B, T]
    w_vid = torch.randn(B, N, video_len, DH, generator=g)  # loss weights of the video rows
    w_txt = torch.randn(cp, B, N, T, DH, generator=g)  # each CP rank's own text-row weights
    return dict(q=q, k=k, v=v, text_mask=text_mask, w_vid=w_vid, w_txt=w_txt, video_len=video_len)


def dense_attention(q, k, v, text_mask):
    """Explicit softmax over video keys + valid text keys: `[B, N, L, Dh]` -> `[B, N, L, Dh]`."""
    key_mask = torch.cat([torch.ones(B, q.shape[2] - T, dtype=torch.bool), text_mask], dim=1)  # [B, L]
    s = (q @ k.transpose(-1, -2)) * DH**-0.5  # [B, N, L, L]
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def dense_reference(case: dict) -> dict:
    """Out and grads of sum over CP ranks of the per-rank losses, with one copy of the text."""
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    out = dense_attention(q, k, v, case["text_mask"])
    lv = case["video_len"]
    loss = (out[:, :, :lv] * case["w_vid"]).sum() + (out[:, :, lv:] * case["w_txt"].sum(0)).sum()
    loss.backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


# ---------------------------------------------------------------------------------------------------------------
# what each rank runs
# ---------------------------------------------------------------------------------------------------------------
def local_inputs(x: torch.Tensor, video_len: int, cp_rank: int, cp: int) -> torch.Tensor:
    vid = shard_video_tokens(x[:, :, :video_len], cp_rank, cp, dim=2)  # [B, N, Lv_local, Dh]
    return torch.cat([vid, x[:, :, video_len:]], dim=2).detach().requires_grad_()  # [B, N, Lv_local + T, Dh]


def run_core(core, case: dict, cp_rank: int, cp: int) -> dict:
    lv, lv_local = case["video_len"], local_video_len(case["video_len"], cp)
    q, k, v = (local_inputs(case[n], lv, cp_rank, cp) for n in "qkv")
    core.video_len = lv
    out = core(q, k, v, case["text_mask"])  # [B, N, Lv_local + T, Dh]
    w_vid = shard_video_tokens(case["w_vid"], cp_rank, cp, dim=2)  # padding rows: weight 0
    loss = (out[:, :, :lv_local] * w_vid).sum() + (out[:, :, lv_local:] * case["w_txt"][cp_rank]).sum()
    loss.backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def rank_main(world: int) -> dict:
    results = {}
    for name, dims_kwargs, video_lens in LAYOUTS[world]:
        dims = ParallelDims(**dims_kwargs)
        dims.build_mesh("cpu", timeout_s=GROUP_TIMEOUT_S)
        cp_rank, group_id = dims.mesh["cp"].get_local_rank(), dims.mesh["dp_shard"].get_local_rank()
        core = build_cp_attention(dims, heads=N)
        results[f"{name}/timeouts"] = _group_timeouts(dims, core)
        for video_len in video_lens:
            rec = run_core(core, make_case(video_len, dims.cp), cp_rank, dims.cp)
            results[f"{name}/{video_len}"] = dict(rec, cp_rank=cp_rank, group=group_id, cp=dims.cp)
    results["extra"] = extra_checks(dist.group.WORLD)
    return results


GROUP_TIMEOUT_S = 123.0  # trainer.collective_timeout_s reaches every mesh group (torch's subgroup default: 1800 s)


def _group_timeouts(dims: ParallelDims, core) -> list[float]:
    """Collective timeouts (s) of every mesh dim's group, the flattened ones, and a USP core's own two groups."""
    groups = [dims.mesh[n].get_group() for n in ("dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp")]
    groups += [core.ulysses_group, core.ring_group] if hasattr(core, "ring_group") else []
    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]


def extra_checks(group) -> dict:
    """Ulysses' heads check on a real group, and gather_video_tokens forward/backward."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    try:
        UlyssesAttention(group, heads=world + 1)
        err = ""
    except ConfigError as e:
        err = str(e)
    g = torch.Generator().manual_seed(7)
    full, w = torch.randn(B, 7, 3, generator=g), torch.randn(world, B, 7, 3, generator=g)  # x_BLD, per-rank weights
    x = shard_video_tokens(full, rank, world).detach().requires_grad_()
    gathered = gather_video_tokens(x, group, video_len=7)  # [B, 7, 3]
    (gathered * w[rank]).sum().backward()
    return dict(err=err, gathered=gathered.detach(), grad=x.grad, expect_grad=shard_video_tokens(w.sum(0), rank, world))


@pytest.fixture(scope="module")
def rank_results():
    cache = {}

    def get(world: int) -> list:
        if world not in cache:
            cache[world] = run_ranks(rank_main, world, args=(world,))
        return cache[world]

    return get


# ---------------------------------------------------------------------------------------------------------------
# multi-rank tests
# ---------------------------------------------------------------------------------------------------------------
def _cp_groups(records: list) -> list[list[dict]]:
    groups = {}
    for rec in records:
        groups.setdefault(rec["group"], []).append(rec)
    return [sorted(g, key=lambda r: r["cp_rank"]) for g in groups.values()]


def _assert_close(got, want, what):
    err = (got - want).abs().amax().item() if got.numel() else 0.0
    assert err <= TOL, f"{what}: max abs error {err:.3e} > {TOL}"


@pytest.mark.parametrize("world,layout,video_len", CASES, ids=[f"w{w}-{n}-Lv{lv}" for w, n, lv in CASES])
def test_cp_attention_matches_dense(rank_results, world, layout, video_len):
    records = [r[f"{layout}/{video_len}"] for r in rank_results(world)]
    cp = records[0]["cp"]
    ref = dense_reference(make_case(video_len, cp))
    lv_local = local_video_len(video_len, cp)
    for ranks in _cp_groups(records):
        assert len(ranks) == cp
        for key in ("out", "dq", "dk", "dv"):
            video = torch.cat([r[key][:, :, :lv_local] for r in ranks], dim=2)  # [B, N, cp*Lv_local, Dh]
            _assert_close(video[:, :, :video_len], ref[key][:, :, :video_len], f"{key} video rows")
            if key != "out":
                _assert_close(video[:, :, video_len:], torch.zeros(()), f"{key} padding rows")
            if key == "out":  # each rank's text rows are the full text rows
                for r in ranks:
                    _assert_close(r[key][:, :, lv_local:], ref[key][:, :, video_len:], f"out text rows, rank {r}")
            else:  # replicated text: the sum over ranks of the grads is the true grad
                text = sum(r[key][:, :, lv_local:] for r in ranks)
                _assert_close(text, ref[key][:, :, video_len:], f"{key} text rows summed over ranks")


@pytest.mark.parametrize("world", [2, 4])
def test_mesh_groups_get_the_collective_timeout(rank_results, world):
    for rec in rank_results(world):
        timeouts = {name: t for name, t in rec.items() if name.endswith("/timeouts")}
        assert timeouts and all(t == [GROUP_TIMEOUT_S] * len(t) for t in timeouts.values()), timeouts
    usp = [t for rec in rank_results(world) for name, t in rec.items() if name.startswith("usp") and "/time" in name]
    assert world == 2 or (usp and all(len(t) == 8 for t in usp)), usp  # the USP core's own groups too


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_heads_error_and_gather_tokens(rank_results, world):
    extras = [r["extra"] for r in rank_results(world)]
    for rank, ex in enumerate(extras):
        assert "parallel.ulysses" in ex["err"] and "valid Ulysses degrees" in ex["err"], ex["err"]
        assert ex["gathered"].shape == (B, 7, 3)
        _assert_close(ex["grad"], ex["expect_grad"], f"gather_video_tokens grad, rank {rank}")
    for ex in extras[1:]:
        assert torch.equal(ex["gathered"], extras[0]["gathered"])


# ---------------------------------------------------------------------------------------------------------------
# single-process tests of the primitives
# ---------------------------------------------------------------------------------------------------------------
def _blocks_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 7, DH, generator=g)  # [B, N, Lq, Dh]
    k, v = torch.randn(B, N, 13, DH, generator=g), torch.randn(B, N, 13, DH, generator=g)  # [B, N, Lk, Dh]
    key_mask = torch.ones(B, 13, dtype=torch.bool)
    key_mask[0, 5:7] = False
    key_mask[1, 4:9] = False  # sample 1: block [4, 9) is fully masked
    return q, k, v, key_mask, [(0, 4), (4, 9), (9, 13)]


def _dense_masked(q, k, v, key_mask):
    s = (q @ k.transpose(-1, -2)) * DH**-0.5
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def test_lse_merge_equals_dense():
    q, k, v, key_mask, blocks = _blocks_data()
    out, lse = block_attention(q, k[:, :, :0], v[:, :, :0])  # the empty block is the identity of the merge
    for a, b in blocks:
        o_b, l_b = block_attention(q, k[:, :, a:b], v[:, :, a:b], key_mask[:, a:b])
        out, lse = merge_lse(out, lse, o_b, l_b)
    ref_out, ref_lse = _dense_masked(q, k, v, key_mask)
    _assert_close(out, ref_out, "merged out")
    _assert_close(lse, ref_lse, "merged lse")


def test_block_backward_equals_autograd():
    q, k, v, key_mask, blocks = _blocks_data(seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = _dense_masked(q, k, v, key_mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    dq = torch.zeros_like(q)
    for a, b in blocks:
        m = key_mask[:, a:b]
        dq_b, dk_b, dv_b = block_attention_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse.detach(), m)
        dq += dq_b
        _assert_close(dk_b, k.grad[:, :, a:b], f"dk block {a}:{b}")
        _assert_close(dv_b, v.grad[:, :, a:b], f"dv block {a}:{b}")
    _assert_close(dq, q.grad, "dq summed over blocks")


def test_lse_dense_core_matches_reference():
    case = make_case(video_len=6, cp=1)
    ref_q, ref_k, ref_v = (case[n].clone().requires_grad_() for n in "qkv")
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    ref = dense_attention(ref_q, ref_k, ref_v, case["text_mask"])
    out = LseDenseAttention()(q, k, v, case["text_mask"])
    w = torch.randn_like(out)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    _assert_close(out, ref, "out")
    for got, want, name in ((q, ref_q, "dq"), (k, ref_k, "dk"), (v, ref_v, "dv")):
        _assert_close(got.grad, want.grad, name)


def test_shard_video_tokens_pads_at_the_end():
    x = torch.arange(2 * 7).reshape(2, 7, 1).float()  # x_BLD, Lv = 7
    chunks = [shard_video_tokens(x, r, 3) for r in range(3)]  # 3 tokens per rank, 2 of padding
    assert [c.shape[1] for c in chunks] == [3, 3, 3]
    assert torch.equal(torch.cat(chunks, 1)[:, :7], x)
    assert torch.equal(chunks[2][:, 1:], torch.zeros(2, 2, 1))


def test_ulysses_heads_error_names_valid_degrees():
    check_ulysses_heads(24, 8)
    with pytest.raises(ConfigError, match=r"valid Ulysses degrees: \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        check_ulysses_heads(24, 5)


@pytest.mark.skipif(flash_available(), reason="flash-attn is present here")
def test_flash_request_without_flash_attn_explains():
    with pytest.raises(RuntimeError, match="flash-attn"):
        resolve_impl("flash", torch.zeros(1, 1, 1, 8))
    assert resolve_impl("auto", torch.zeros(1, 1, 1, 8)) == "fused"  # torch's fused kernel on CPU


def test_reference_agrees_with_the_dit_dense_core():
    attention = pytest.importorskip("vidtron.kernels.attention")
    case = make_case(video_len=6, cp=1)
    args = (case["q"], case["k"], case["v"], case["text_mask"])
    want = attention.DenseAttention()(*args)
    _assert_close(dense_attention(*args), want, "test reference vs DenseAttention")
    _assert_close(LseDenseAttention()(*args), want, "LseDenseAttention vs DenseAttention")
