"""Atomic, reshardable DCP checkpoints with a manifest, and safe loading.

Layout of `<run_dir>/checkpoints/`:
    step_000010/            committed (renamed from step_000010.tmp/ only after every rank finished)
        __*.distcp .metadata   DCP shards: model + optimizer state, resharded by parameter name on load
        rng/rank_<r>.safetensors   each rank's RNG states
        manifest.json       step, layout, config, config hash, data position, sha256 of every file
    step_000020.tmp/        torn (a crash mid-save): never resumed, removed by the next save

Async saves (`save_checkpoint_async`, `Checkpointer(async_save=True)`) stall only for a CPU staging copy; DCP
writes in a background thread and the same commit (manifest, then rename) follows once the write is done.

Loading never runs an unrestricted unpickler: DCP's `.metadata` (a pickle) is read with an allowlist of
DCP's own metadata classes, DCP's byte items go through `torch.load(weights_only=True)`, and every file's
sha256 is checked against the manifest first; a checkpoint that fails the check is skipped with a warning
and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from vidtron.platform.distributed import DistContext, barrier, broadcast_object
from vidtron.platform.errors import DataError

MANIFEST = "manifest.json"
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_SAFE_PICKLE_MODULES = ("torch.distributed.checkpoint.", "collections", "torch.serialization")
_SAFE_TORCH_NAMES = {"Size", "device", "layout", "memory_format"}
_SAFE_PLAIN = {("builtins", n) for n in ("set", "frozenset", "slice")} | {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    the full-tensor state of an optimizer that keeps its own partitions (DeepSpeed ZeRO: `checkpoint_state`)."""
    own = getattr(optimizer, "checkpoint_state", None)
    return own() if own is not None else get_state_dict(model, optimizer)


def save_checkpoint(
    run_dir, step: int, model, optimizer, meta: dict, ctx: DistContext, keep_last: int = 3, hooks=None
) -> Path:
    """Collective: every rank calls it. Returns the committed folder.

    `hooks` (e.g. a FaultInjector) gets `before_commit(step)` once the files are written and, on rank 0,
    `after_commit(step, path)` once committed.
    """
    tmp, final = _begin_save(run_dir, step, ctx)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if hooks is not None:
        hooks.before_commit(step)
    barrier(ctx)
    if ctx.is_main:
        _commit(tmp, final, step, meta)
        _prune(run_dir, keep_last)
        if hooks is not None:
            hooks.after_commit(step, final)
    barrier(ctx)
    return final


class PendingCheckpoint:
    """An async save in flight: DCP writes the staged copy in a background thread, then (rank 0) a second
    background thread commits it (checksums, manifest, rename); `finish()` waits for both."""

    def __init__(self, future, tmp: Path, final: Path, step: int, meta: dict, run_dir, keep_last: int, ctx, hooks):
        self.future, self.tmp, self.final, self.step, self.meta = future, tmp, final, step, meta
        self.run_dir, self.keep_last, self.ctx, self.hooks = run_dir, keep_last, ctx, hooks
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidtron-commit")
        self._committed = self._committer.submit(self._commit_when_written)
        self._committer.shutdown(wait=False)

    def _commit_when_written(self) -> Path:
        """No collective: DCP's gather inside the write means rank 0's write ends only after every rank's files
        are on disk, so rank 0 commits as soon as its own write is done."""
        self.future.result()
        if self.ctx.is_main:
            _commit(self.tmp, self.final, self.step, self.meta)
            _prune(self.run_dir, self.keep_last)
            if self.hooks is not None:
                self.hooks.after_commit(self.step, self.final)
        return self.final

    def done(self) -> bool:
        return self._committed.done()

    def finish(self) -> Path:
        """Wait for the write and the commit (re-raising a failure of either)."""
        return self._committed.result()


def save_checkpoint_async(
    run_dir, step: int, model, optimizer, meta: dict, ctx: DistContext, keep_last: int = 3, hooks=None, group=None
) -> PendingCheckpoint:
    """Collective: stage model + optimizer state to a CPU copy (the only stall), then write it in the background.

    `group` is a process group kept for DCP's background collectives (a second gloo group, so they never
    interleave with the training ones). Call `finish()` on every rank before the next save and before exit.
    """
    tmp, final = _begin_save(run_dir, step, ctx)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    if hooks is not None:
        hooks.before_commit(step)  # the write is in flight: a crash here leaves a torn step_N.tmp/
    return PendingCheckpoint(future, tmp, final, step, meta, run_dir, keep_last, ctx, hooks)


class Checkpointer:
    """The trainer's saves: synchronous, or async with at most one in flight (finished before the next save,
    a rollback and the end of training; committed as soon as it is done when `poll()` is called)."""

    def __init__(self, run_dir, ctx: DistContext, keep_last: int, async_save: bool, hooks=None):
        self.run_dir, self.ctx, self.keep_last, self.async_save, self.hooks = run_dir, ctx, keep_last, async_save, hooks
        self.group = dist.new_group(backend="gloo") if async_save and ctx.distributed else None
        self.pending: PendingCheckpoint | None = None
        self.stalls_s: list[float] = []  # time the step loop spent in each save call

    def save(self, step: int, model, optimizer, meta: dict) -> None:
        t0 = time.perf_counter()
        self.wait()
        if self.async_save:
            args = (self.run_dir, step, model, optimizer, meta, self.ctx, self.keep_last, self.hooks, self.group)
            self.pending = save_checkpoint_async(*args)
        else:
            save_checkpoint(self.run_dir, step, model, optimizer, meta, self.ctx, self.keep_last, self.hooks)
        self.stalls_s.append(time.perf_counter() - t0)

    def poll(self) -> None:
        if self.pending is not None and self.pending.done():
            self.wait()

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.finish()


def _commit(tmp: Path, final: Path, step: int, meta: dict) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"step": step, **meta, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
    _write_json_atomic(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


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


def verify(path: Path) -> str | None:
    """None when every file matches the manifest; otherwise what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"manifest unreadable ({err})"
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.exists():
            return f"{rel} is missing"
        if _sha256(f) != digest:
            return f"{rel} fails its sha256 check"
    return None


def latest_valid_checkpoint(run_dir, ctx: DistContext, on_skip=None) -> Path | None:
    """Rank 0 picks the newest committed checkpoint that passes its checksums; every rank gets the answer."""
    choice = None
    if ctx.is_main:
        for path in reversed(committed_checkpoints(run_dir)):
            problem = verify(path)
            if problem is None:
                choice = str(path)
                break
            warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one", stacklevel=2)
            if on_skip:
                on_skip(path, problem)
    choice = broadcast_object(choice, ctx)
    return Path(choice) if choice else None


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def load_checkpoint(path: Path, model, optimizer, ctx: DistContext) -> dict:
    """Load model + optimizer (resharding to this layout as needed) and this rank's RNG; return the manifest."""
    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    if hasattr(optimizer, "load_checkpoint_state"):
        optimizer.load_checkpoint_state(state["model"], state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(path / "rng" / f"rank_{ctx.rank}.safetensors")
    return read_manifest(path)


def load_model_weights(path: Path, model) -> dict:
    """Load only the model weights of a training checkpoint (e.g. for sampling), into any layout."""
    opts = StateDictOptions(strict=True)
    model_sd, _ = get_state_dict(model, [], options=opts)
    state = {"model": model_sd}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=opts)
    return read_manifest(path)
