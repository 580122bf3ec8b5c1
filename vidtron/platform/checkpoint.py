"""Atomic, reshardable DCP checkpoints with manifests, and safe loading.

Layout of `<run_dir>/checkpoints/`:
    step_000010/            committed (renamed from step_000010.tmp/ only after every rank finished)
        __<r>_*.distcp .metadata   DCP shards: model + optimizer (+ extra) state, resharded by name on load
        rng/rank_<r>.safetensors   each rank's RNG states
        manifests/rank_<r>.json    written by rank r: sha256 and size of each file rank r wrote
        manifest.json       step, layout, config, config hash, data position, sha256 of each rank's manifest
    step_000020.tmp/        torn (a crash mid-save): never resumed, removed by the next save

Hashing scales with the ranks: each rank hashes the files it wrote, in parallel, and rank 0 commits a manifest of
those manifests (vidtron/platform/manifest.py); at resume every rank verifies a share of the files and the ranks
agree on the newest checkpoint all of them found intact.

Async saves (`save_checkpoint_async`, `Checkpointer(async_save=True)`) stall only for a CPU staging copy; DCP
writes in a background thread, each rank then hashes its files in that thread, and rank 0 commits once every
rank's manifest is on disk (no collective outside DCP's own, which run on a dedicated group).

Loading never runs an unrestricted unpickler: DCP's `.metadata` (a pickle) is read with an allowlist of
DCP's own metadata classes, DCP's byte items go through `torch.load(weights_only=True)`, and every file's
sha256 is checked against the manifests first; a checkpoint that fails the check is skipped with a warning
and the previous one is used.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from vidtron.errors import DataError
from vidtron.platform.distributed import DistContext, barrier, broadcast_object
from vidtron.platform.manifest import (
    MANIFEST,
    commit_manifest,
    fsync_path,
    verify_share,
    wait_for_rank_manifests,
    write_rank_manifest,
)

__all__ = ["MANIFEST", "Checkpointer", "SafeFileSystemReader", "latest_valid_checkpoint", "load_checkpoint"]
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_SAFE_PICKLE_MODULES = ("torch.distributed.checkpoint.", "collections", "torch.serialization")
_SAFE_TORCH_NAMES = {"Size", "device", "layout", "memory_format"}
_SAFE_PLAIN = {("builtins", n) for n in ("set", "frozenset", "slice")} | {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}
_RESERVED = ("model", "optim")  # top-level DCP keys an `extra` entry may not take
MANIFEST_TIMEOUT_S = 600.0  # async commit: how long rank 0 waits for the other ranks' manifests


def _save_planner() -> DefaultSavePlanner:
    """DCP's default planner, keeping ShardedTensors (DeepSpeed's local slices) that have no shard on this rank:
    flattening would drop them, and at load the missing keys would send DCP into its pre-2.4 key format."""
    return DefaultSavePlanner(flatten_sharded_tensors=False)


def _load_planner() -> DefaultLoadPlanner:
    return DefaultLoadPlanner(flatten_sharded_tensors=False)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's dataclasses, torch.Size/dtype/layout and plain containers."""

    def find_class(self, module: str, name: str):
        if module.startswith(_SAFE_PICKLE_MODULES) or (module, name) in _SAFE_PLAIN:
            return super().find_class(module, name)
        if module == "torch" and (name in _SAFE_TORCH_NAMES or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise DataError(
            f"checkpoint metadata refers to {module}.{name}, which is not allowed; the file is not a vidtron checkpoint"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path) -> None:
    if not path.exists():
        return  # a rank that did not exist in the saved layout keeps its seeded state
    state = load_file(str(path))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _begin_save(run_dir, step: int, ctx: DistContext) -> tuple[Path, Path]:
    """Collective: a fresh `step_N.tmp/` (stale torn ones removed) holding this rank's RNG state."""
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if ctx.is_main:
        for stale in checkpoint_dir(run_dir).glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    (tmp / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(tmp / "rng" / f"rank_{ctx.rank}.safetensors"))
    return tmp, final


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts by parameter name: torch's `get_state_dict` (FSDP2 / DTensor / plain), or
    the state of an optimizer that keeps its own partitions (DeepSpeed ZeRO: `checkpoint_state`, local shards)."""
    own = getattr(optimizer, "checkpoint_state", None)
    return own() if own is not None else get_state_dict(model, optimizer)


def _full_state(model, optimizer, extra: dict[str, dict] | None) -> dict:
    """The DCP state dict: {"model", "optim", **extra}; each extra entry a state dict of tensors / DTensors."""
    extra = extra or {}
    for key, value in extra.items():
        if key in _RESERVED or not isinstance(value, dict):
            raise ValueError(
                f"extra[{key!r}]: each extra entry must be a dict (a state dict) under a key other than {_RESERVED}"
            )
    model_sd, optim_sd = _state_dicts(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, **extra}


def _sharded_tensors(state) -> list[ShardedTensor]:
    if isinstance(state, dict):
        return [st for value in state.values() for st in _sharded_tensors(value)]
    return [state] if isinstance(state, ShardedTensor) else []


def _async_writer(state: dict, tmp: Path):
    """None (DCP's default stager), or for a state with ShardedTensors (DeepSpeed's local slices, which the default
    stager cannot copy) a FileSystemWriter, whose own stager can; each CPU local shard first gets its own storage,
    since that stager deep-copies a shard and a deep copy of a view copies the whole flat partition under it."""
    sharded = _sharded_tensors(state)
    for shard in (shard for st in sharded for shard in st.local_shards()):
        t = shard.tensor
        if t.device.type == "cpu" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            shard.tensor = t.clone()
    return dcp.FileSystemWriter(str(tmp)) if sharded else None


def _commit(tmp: Path, final: Path, step: int, meta: dict, world_size: int, extra_keys: list[str]) -> None:
    """Rank 0, once every rank's manifest is written: the top manifest, then the rename (the commit point)."""
    commit_manifest(tmp, step, meta, world_size, extra_keys)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    fsync_path(final.parent)


def save_checkpoint(
    run_dir,
    step: int,
    model,
    optimizer,
    meta: dict,
    ctx: DistContext,
    keep_last: int = 3,
    hooks=None,
    extra: dict[str, dict] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the committed folder.

    `extra` adds top-level DCP keys (e.g. {"ema": ema_state_dict}), saved like the model and resharded by name.
    `hooks` (e.g. a FaultInjector) gets `before_commit(step)` once the files are written and, on rank 0,
    `after_commit(step, path)` once committed.
    """
    tmp, final = _begin_save(run_dir, step, ctx)
    dcp.save(_full_state(model, optimizer, extra), checkpoint_id=str(tmp), planner=_save_planner())
    if hooks is not None:
        hooks.before_commit(step)
    write_rank_manifest(tmp, ctx.rank)  # every rank hashes its own files, in parallel
    barrier(ctx)
    if ctx.is_main:
        _commit(tmp, final, step, meta, ctx.world_size, sorted(extra or {}))
        _prune(run_dir, keep_last)
        if hooks is not None:
            hooks.after_commit(step, final)
    barrier(ctx)
    return final


class PendingCheckpoint:
    """An async save in flight: DCP writes the staged copy in a background thread, then a second background thread
    on every rank hashes that rank's files and, on rank 0, waits for every rank's manifest and commits (top
    manifest, rename). `finish()` waits for this rank's part (rank 0: the commit)."""

    def __init__(self, future, tmp: Path, final: Path, step: int, meta: dict, run_dir, keep_last: int, ctx, hooks,
                 extra_keys: list[str] | None = None, timeout_s: float = MANIFEST_TIMEOUT_S):  # fmt: skip
        self.future, self.tmp, self.final, self.step, self.meta = future, tmp, final, step, meta
        self.run_dir, self.keep_last, self.ctx, self.hooks = run_dir, keep_last, ctx, hooks
        self.extra_keys, self.timeout_s = extra_keys or [], timeout_s
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidtron-commit")
        self._committed = self._committer.submit(self._commit_when_written)
        self._committer.shutdown(wait=False)

    def _commit_when_written(self) -> Path:
        """No collective: this rank's files are on disk once its DCP write is done; rank 0 learns that the others
        are done from their manifest files."""
        self.future.result()
        write_rank_manifest(self.tmp, self.ctx.rank)
        if self.ctx.is_main:
            wait_for_rank_manifests(self.tmp, self.ctx.world_size, self.timeout_s)
            _commit(self.tmp, self.final, self.step, self.meta, self.ctx.world_size, self.extra_keys)
            _prune(self.run_dir, self.keep_last)
            if self.hooks is not None:
                self.hooks.after_commit(self.step, self.final)
        return self.final

    def done(self) -> bool:
        return self._committed.done()

    def finish(self) -> Path:
        """Wait for the write, the hashing and (rank 0) the commit, re-raising a failure of any."""
        return self._committed.result()


def save_checkpoint_async(
    run_dir,
    step: int,
    model,
    optimizer,
    meta: dict,
    ctx: DistContext,
    keep_last: int = 3,
    hooks=None,
    group=None,
    extra: dict[str, dict] | None = None,
) -> PendingCheckpoint:
    """Collective: stage model + optimizer (+ extra) state to a CPU copy (the only stall), then write it in the
    background.

    `group` is a process group kept for DCP's background collectives (a second gloo group, so they never
    interleave with the training ones). Call `finish()` on every rank before the next save and before exit.
    """
    tmp, final = _begin_save(run_dir, step, ctx)
    state = _full_state(model, optimizer, extra)
    writer = _async_writer(state, tmp)
    future = dcp.async_save(
        state, checkpoint_id=str(tmp), storage_writer=writer, planner=_save_planner(), process_group=group
    )
    if hooks is not None:
        hooks.before_commit(step)  # the write is in flight: a crash here leaves a torn step_N.tmp/
    return PendingCheckpoint(future, tmp, final, step, meta, run_dir, keep_last, ctx, hooks, sorted(extra or {}))


class Checkpointer:
    """The trainer's saves: synchronous, or async with at most one in flight (finished before the next save,
    a rollback and the end of training; committed as soon as it is done when `poll()` is called)."""

    def __init__(self, run_dir, ctx: DistContext, keep_last: int, async_save: bool, hooks=None):
        self.run_dir, self.ctx, self.keep_last, self.async_save, self.hooks = run_dir, ctx, keep_last, async_save, hooks
        self.group = dist.new_group(backend="gloo") if async_save and ctx.distributed else None
        self.pending: PendingCheckpoint | None = None
        self.stalls_s: list[float] = []  # time the step loop spent in each save call

    def save(self, step: int, model, optimizer, meta: dict, extra: dict[str, dict] | None = None) -> None:
        t0 = time.perf_counter()
        self.wait()
        args = (self.run_dir, step, model, optimizer, meta, self.ctx, self.keep_last, self.hooks)
        if self.async_save:
            self.pending = save_checkpoint_async(*args, group=self.group, extra=extra)
        else:
            save_checkpoint(*args, extra=extra)
        self.stalls_s.append(time.perf_counter() - t0)

    def poll(self) -> None:
        if self.pending is not None and self.pending.done():
            self.wait()

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.finish()


def _prune(run_dir, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in committed_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def committed_checkpoints(run_dir) -> list[Path]:
    """Committed checkpoint folders (a manifest present), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def verify(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when every file (or, with `rank` / `world_size`, this rank's share of them) matches the manifests;
    otherwise what is wrong. Reads both manifest formats (per-rank manifests, and the older flat `files` map)."""
    return verify_share(Path(path), rank, world_size)


def _first_problem(problem: str | None, ctx: DistContext) -> str | None:
    """Collective: the first problem any rank found (None when every rank's share is intact)."""
    if not ctx.distributed:
        return problem
    found: list = [None] * ctx.world_size
    dist.all_gather_object(found, problem)
    return next((f"{p} (found by rank {r})" for r, p in enumerate(found) if p is not None), None)


def latest_valid_checkpoint(run_dir, ctx: DistContext, on_skip=None) -> Path | None:
    """Collective: the newest committed checkpoint whose files every rank found intact (each rank checks a share,
    in parallel); damaged ones are skipped with a warning and `on_skip(path, problem)` on rank 0."""
    candidates = [str(p) for p in committed_checkpoints(run_dir)] if ctx.is_main else None
    for path in map(Path, reversed(broadcast_object(candidates, ctx))):
        problem = _first_problem(verify(path, ctx.rank, ctx.world_size), ctx)
        if problem is None:
            return path
        if ctx.is_main:
            warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one", stacklevel=2)
            if on_skip:
                on_skip(path, problem)
    return None


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def _saved_extras(reader: SafeFileSystemReader, keys) -> set[str]:
    """The `extra` keys that a checkpoint holds (from DCP's metadata, whatever the manifest says)."""
    saved = reader.read_metadata().state_dict_metadata
    return {k for k in keys if any(name == k or name.startswith(f"{k}.") for name in saved)}


def load_checkpoint(
    path: Path, model, optimizer, ctx: DistContext, extra: dict[str, dict] | None = None, extra_optional: bool = False
) -> dict:
    """Load model + optimizer (resharding to this layout as needed) and this rank's RNG; return the manifest.

    Each `extra` entry (e.g. {"ema": ema_state_dict}) is loaded in place from the top-level key of that name. A key
    the checkpoint lacks raises DataError, unless `extra_optional`: then it is left as it is and listed in the
    returned manifest's "extra_missing".
    """
    path, extra = Path(path), extra or {}
    reader = SafeFileSystemReader(str(path))
    present = _saved_extras(reader, extra) if extra else set()
    missing = sorted(set(extra) - present)
    if missing and not extra_optional:
        raise DataError(
            f"checkpoint {path} has no {missing} state (saved with extra={sorted(read_manifest(path).get('extra', []))}"
            "); pass extra_optional=True to start those from their current values"
        )
    state = _full_state(model, optimizer, {k: v for k, v in extra.items() if k in present})
    dcp.load(state, storage_reader=reader, planner=_load_planner())
    if hasattr(optimizer, "load_checkpoint_state"):
        optimizer.load_checkpoint_state(state["model"], state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(path / "rng" / f"rank_{ctx.rank}.safetensors")
    manifest = read_manifest(path)
    return {**manifest, "extra_missing": missing} if extra else manifest


def load_model_weights(path: Path, model, root: str = "model") -> dict:
    """Load only the model weights of a training checkpoint (e.g. for sampling), into any layout; `root` picks
    the trained weights ("model") or their EMA ("ema", saved by trainer.ema_decay > 0)."""
    opts = StateDictOptions(strict=True)
    model_sd, _ = get_state_dict(model, [], options=opts)
    state = {root: model_sd}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    set_state_dict(model, [], model_state_dict=state[root], optim_state_dict={}, options=opts)
    return read_manifest(path)
