"""Run a function on N local ranks over gloo, for multi-rank CPU tests.

Each rank is a fresh spawned process with `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` set and a
gloo process group initialised; the function's return value (anything torch.save-able with
weights_only-safe types: tensors, numbers, lists, dicts) comes back to the caller, one entry per rank.

    results = run_ranks(my_fn, world_size=2, args=(cfg,))
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    ok = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, out)
        ok = True
    except BaseException:  # noqa: BLE001 - the traceback is shipped to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()
                if ok:  # every rank got here: the work is complete, whatever happens in teardown
                    (Path(out_dir) / f"rank{rank}.done").touch()
            finally:
                dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600) -> list:
    """Spawn `world_size` gloo ranks running `fn(*args)`; return their results in rank order.

    `fn` must be importable (a module-level function). Raises RuntimeError with the failing rank's
    traceback when any rank fails.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception as err:  # a rank died: report its own traceback when it wrote one
            if not _all_succeeded(out_dir, world_size):
                raise RuntimeError(_first_error(out_dir, world_size) or str(err)) from err
            # every rank wrote its result and passed the closing barrier, then one aborted in teardown (gloo's
            # occasional "terminate called without an active exception" at exit, shared/PROBES.md): keep them
            warnings.warn(f"a rank died after finishing its work ({err}); using the results it wrote", stacklevel=2)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    return [r["result"] for r in results]


def _all_succeeded(out_dir: str, world_size: int) -> bool:
    """Every rank wrote an ok result and got through the closing barrier (its `.done` marker)."""
    return all(
        (Path(out_dir) / f"rank{r}.pt").exists() and (Path(out_dir) / f"rank{r}.done").exists()
        for r in range(world_size)
    )


def _first_error(out_dir: str, world_size: int) -> str | None:
    for r in range(world_size):
        path = Path(out_dir) / f"rank{r}.pt"
        if path.exists():
            rec = torch.load(path, weights_only=True)
            if not rec["ok"]:
                return f"rank {r} failed:\n{rec['error']}"
    return None
