"""Checkpoint loading never runs arbitrary pickles; manifests catch changed files; every rank hashes and verifies
its own files; `extra` state (EMA weights) round-trips across layouts; DeepSpeed saves its partitions unGathered."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from vidtron.errors import DataError
from vidtron.platform.checkpoint import (
    MANIFEST,
    Checkpointer,
    SafeFileSystemReader,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from vidtron.platform.distributed import DistContext, init_distributed
from vidtron.platform.manifest import balanced_share, sha256_file, wait_for_rank_manifests
from vidtron.testing.multirank import run_ranks

CTX = DistContext(0, 1, 0, torch.device("cpu"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _save(tmp_path, step: int = 1, extra=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(tmp_path, step, model, opt, {"data": {"cursor": 0}}, CTX, extra=extra)


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_metadata_with_foreign_classes_is_refused(tmp_path):
    path = _save(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError, match="not allowed"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_manifest_catches_changed_and_missing_files(tmp_path):
    path = _save(tmp_path)
    assert verify(path) is None
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes() + b"x")
    assert ".metadata fails its sha256 check" == verify(path)
    with pytest.warns(UserWarning, match="damaged"):
        assert latest_valid_checkpoint(tmp_path, CTX) is None
    next(path.glob("*.distcp")).unlink()
    assert "missing" in verify(path) or "sha256" in verify(path)


def test_a_changed_rank_manifest_is_caught(tmp_path):
    path = _save(tmp_path)
    rank0 = path / "manifests" / "rank_0.json"
    rank0.write_text(rank0.read_text().replace('"rank": 0', '"rank": 0 '))
    assert verify(path) == "manifests/rank_0.json fails its sha256 check"


def test_old_format_manifests_still_verify(tmp_path):
    """Format 1: one flat map of sha256 in manifest.json, written by rank 0 (checkpoints from before per-rank
    manifests)."""
    path = _save(tmp_path)
    top = json.loads((path / MANIFEST).read_text())
    for f in (path / "manifests").iterdir():
        f.unlink()
    (path / "manifests").rmdir()
    files = {str(p.relative_to(path)): sha256_file(p) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    old = {k: v for k, v in top.items() if k not in ("format", "manifests", "world_size", "extra")}
    (path / MANIFEST).write_text(json.dumps({**old, "files": files}))
    assert verify(path) is None and verify(path, 1, 2) is None
    assert latest_valid_checkpoint(tmp_path, CTX) == path
    _flip_byte(next(path.glob("*.distcp")))
    assert "fails its sha256 check" in verify(path)


def test_async_commit_names_the_ranks_whose_manifest_never_came(tmp_path):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "rank_0.json").write_text("{}")
    with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] wrote no manifest within 0 s"):
        wait_for_rank_manifests(tmp_path, 3, timeout_s=0.1)


def test_balanced_share_splits_every_file_once():
    entries = [(f"f{i}", "0" * 64, size) for i, size in enumerate([100, 5, 70, 70, 1, 30, 30])]
    shares = [balanced_share(entries, r, 3) for r in range(3)]
    assert sorted(e for s in shares for e in s) == sorted(entries)
    assert sorted(sum(e[2] for e in s) for s in shares) == [100, 101, 105]  # total 306: as even as whole files allow


def test_extra_round_trips_and_a_missing_entry_is_named(tmp_path):
    ema = {"weight": torch.full((3, 3), 2.0), "bias": torch.full((3,), 3.0)}
    path = _save(tmp_path, extra={"ema": ema})
    assert json.loads((path / MANIFEST).read_text())["extra"] == ["ema"]
    model, got = torch.nn.Linear(3, 3), {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}
    opt = torch.optim.AdamW(model.parameters())
    manifest = load_checkpoint(path, model, opt, CTX, extra={"ema": got})
    assert manifest["extra_missing"] == [] and torch.equal(got["weight"], ema["weight"])
    with pytest.raises(DataError, match=r"no \['teacher'\] state.*extra_optional=True"):
        load_checkpoint(path, model, opt, CTX, extra={"ema": got, "teacher": {"w": torch.zeros(1)}})
    untouched = {"w": torch.ones(1)}
    manifest = load_checkpoint(path, model, opt, CTX, extra={"teacher": untouched}, extra_optional=True)
    assert manifest["extra_missing"] == ["teacher"] and torch.equal(untouched["w"], torch.ones(1))
    with pytest.raises(ValueError, match="other than"):
        _save(tmp_path, step=2, extra={"model": {}})


# ---- two ranks: per-rank manifests, parallel verification, extra state across layouts ---------------------------


def _fsdp_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return fully_shard(model, mesh=init_device_mesh("cpu", (2,)))


def _two_rank_saves(root: str) -> dict:
    """dp_shard=2: sync saves at steps 1, 2 and an async one at 3 (all with an EMA as `extra`); rank 1 then damages
    its own data file of step 3 and every rank resumes: step 2, by agreement."""
    ctx = init_distributed()
    model = _fsdp_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    saver_async = Checkpointer(root, ctx, keep_last=5, async_save=True)
    out = {}
    for step in (1, 2, 3):
        model(torch.full((4, 8), float(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            ema[n].mul_(0.5).add_(p.detach(), alpha=0.5)
        meta = {"data": {"cursor": step}}
        if step < 3:
            save_checkpoint(root, step, model, opt, meta, ctx, keep_last=5, extra={"ema": ema})
        else:
            saver_async.save(step, model, opt, meta, extra={"ema": ema})
            saver_async.wait()
        if step == 2:
            out["ema"] = {n: t.full_tensor() for n, t in ema.items()}
            out["params"] = {n: p.full_tensor() for n, p in model.named_parameters()}
    torch.distributed.barrier()
    step3 = f"{root}/checkpoints/step_000003"
    mine = json.loads(open(f"{step3}/manifests/rank_{ctx.rank}.json").read())["files"]
    out["own_files"] = sorted(mine)
    if ctx.rank == 1:
        from pathlib import Path

        _flip_byte(Path(step3) / "__1_0.distcp")
    torch.distributed.barrier()
    skipped = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        chosen = latest_valid_checkpoint(root, ctx, on_skip=lambda p, why: skipped.append((str(p), why)))
    out["chosen"], out["skipped"] = str(chosen), skipped
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_rank")
    return root, run_ranks(_two_rank_saves, 2, (str(root),))


def test_each_rank_hashes_its_own_files_and_rank_1_damage_falls_back(two_rank_run):
    root, (r0, r1) = two_rank_run
    assert r0["own_files"] == [".metadata", "__0_0.distcp", "rng/rank_0.safetensors"]
    assert r1["own_files"] == ["__1_0.distcp", "rng/rank_1.safetensors"]
    step3 = root / "checkpoints" / "step_000003"  # the async save: committed through the same per-rank manifests
    top = json.loads((step3 / MANIFEST).read_text())
    assert top["format"] == 2 and top["world_size"] == 2 and top["data"] == {"cursor": 3}
    assert sorted(top["manifests"]) == ["manifests/rank_0.json", "manifests/rank_1.json"]
    assert r0["chosen"] == r1["chosen"] == str(root / "checkpoints" / "step_000002")
    assert r1["skipped"] == [] and len(r0["skipped"]) == 1  # the warning and on_skip come from rank 0 only
    assert r0["skipped"][0][1] == "__1_0.distcp fails its sha256 check (found by rank 1)"
    assert verify(step3) == "__1_0.distcp fails its sha256 check"  # one process (another world size) checks all
    assert verify(root / "checkpoints" / "step_000002", 0, 3) is None


def test_extra_reshards_from_two_ranks_into_one_process(two_rank_run):
    root, (r0, _) = two_rank_run
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    ema = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    manifest = load_checkpoint(root / "checkpoints" / "step_000002", model, opt, CTX, extra={"ema": ema})
    assert manifest["step"] == 2 and manifest["extra"] == ["ema"]
    for n, p in model.named_parameters():
        assert torch.equal(ema[n], r0["ema"][n]) and torch.equal(p.detach(), r0["params"][n]), n


# ---- DeepSpeed: each rank writes its own partitions, nothing gathered -------------------------------------------


class _Odd(torch.nn.Module):
    """Parameter sizes that DeepSpeed's partitions cut mid-row (2 ranks), one of them 3-d."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)
        self.w3 = torch.nn.Parameter(torch.randn(4, 3, 5))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().mean() + self.w3.square().mean()


def _forbid_full_gathers(monkeypatch, zero) -> None:
    import deepspeed.utils

    def refuse(*_, **__):
        raise AssertionError("a checkpoint save gathered a full tensor")

    for name in ("safe_get_full_fp32_param", "safe_get_full_optimizer_state"):
        monkeypatch.setattr(deepspeed.utils, name, refuse)
    if hasattr(zero, "get_full_hp_param"):
        monkeypatch.setattr(zero, "get_full_hp_param", refuse)


def _deepspeed_save_resume(root: str, stage: int, async_save: bool = False) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    from vidtron.parallel.deepspeed_zero import ADAM_MOMENTS, initialize

    ctx = init_distributed()
    torch.manual_seed(0)
    cfg = SimpleNamespace(
        parallel=SimpleNamespace(zero=SimpleNamespace(stage=stage, ds_bucket_elements=64, ds_persist_below=8)),
        data=SimpleNamespace(batch_size=4),
        optim=SimpleNamespace(grad_clip=1.0),
        trainer=SimpleNamespace(grad_accum=1),
    )
    model = _Odd()
    engine, zero = initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), cfg, SimpleNamespace(dp=2, cp=1))

    def step(i):
        x = torch.randn(2, 5, generator=torch.Generator().manual_seed(10 * i + ctx.rank))
        zero.update(engine(x))

    for i in range(3):
        step(i)
    with pytest.MonkeyPatch.context() as mp:
        _forbid_full_gathers(mp, zero.zero)
        saver = Checkpointer(root, ctx, keep_last=2, async_save=async_save)
        saver.save(3, engine, zero, {"data": {"cursor": 3}})
        saver.wait()
    torch.distributed.barrier()
    path = latest_valid_checkpoint(root, ctx)
    saved = {"params": zero.full_parameters()}
    for key in ADAM_MOMENTS:
        saved[key] = {n: safe_get_full_optimizer_state(p, key).reshape(p.ds_shape if stage == 3 else p.shape)
                      for n, p in zero.params.items()}  # fmt: skip
    for i in (3, 4):
        step(i)
    reference = zero.full_parameters()
    with torch.no_grad():
        for p in zero.params.values():  # resume must overwrite whatever the engine holds
            p.ds_tensor.zero_() if stage == 3 else p.zero_()
    load_checkpoint(latest_valid_checkpoint(root, ctx), engine, zero, ctx)
    for i in (3, 4):
        step(i)
    resumed = zero.full_parameters()
    diffs = {n: (reference[n] - resumed[n]).abs().max().item() for n in reference}
    return {"path": str(path), "saved": saved, "diffs": diffs}


def _deepspeed_stages(root: str) -> dict:
    return {stage: _deepspeed_save_resume(f"{root}/zero{stage}", stage, async_save=stage == 3) for stage in (1, 3)}


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_ranks(_deepspeed_stages, 2, (str(tmp_path_factory.mktemp("ds")),))[0]


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_saves_partitions_without_gathering_and_resumes_exactly(deepspeed_runs, stage):
    """ZeRO-1 cuts parameters mid-row across ranks, ZeRO-3 splits each one: both save with the full-gather API
    refusing, resume bit for bit, and leave whole tensors by name in the files."""
    out = deepspeed_runs[stage]
    assert not any(out["diffs"].values()), f"resumed run differs from the uninterrupted one: {out['diffs']}"
    # the files hold whole tensors by name: one process reads them back without any DeepSpeed
    shapes = {n: t.shape for n, t in out["saved"]["params"].items()}
    state = {
        "model": {n: torch.empty(s) for n, s in shapes.items()},
        "optim": {"state": {n: {"exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s)} for n, s in shapes.items()}},
    }
    dcp.load(state, storage_reader=SafeFileSystemReader(out["path"]))
    for n in shapes:
        assert torch.equal(state["model"][n], out["saved"]["params"][n]), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["optim"]["state"][n][key], out["saved"][key][n]), (n, key)
