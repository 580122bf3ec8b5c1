"""Checkpoint manifests: every rank hashes the files it wrote; rank 0 commits a manifest of those manifests.

    step_000010/
        manifest.json            {"format": 2, "step", meta..., "world_size": W, "extra": [...],
                                  "manifests": {"manifests/rank_<r>.json": sha256 of that file}}
        manifests/rank_<r>.json  {"rank": r, "files": {"__<r>_0.distcp": {"sha256": ..., "bytes": ...}, ...}}

Rank r writes (and so hashes) DCP's data files `__<r>_*.distcp` (FileSystemWriter names them by the rank's index
in the save's process group, which spans every rank), its RNG file `rng/rank_<r>.safetensors`, and on rank 0
DCP's `.metadata`. Rank 0 refuses to commit a file no rank claimed, so a change of DCP's naming fails loudly.

Verification splits the work: with the saved world size each rank checks its own rank's manifest; with another
one the files of every manifest are split over the current ranks by bytes. Format 1 (a flat `files` map of
sha256 in manifest.json, written by rank 0 alone) still verifies.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import time
from pathlib import Path

MANIFEST = "manifest.json"
RANK_MANIFESTS = "manifests"
FORMAT = 2


class Damaged(Exception):
    """A manifest that cannot be read or does not match its parent: the checkpoint is damaged."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that the names created or renamed in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_manifest_name(rank: int) -> str:
    return f"{RANK_MANIFESTS}/rank_{rank}.json"


def own_files(folder: Path, rank: int) -> list[Path]:
    """The files rank `rank` wrote into a checkpoint folder (DCP data, its RNG state, rank 0: DCP metadata)."""
    files = sorted(folder.glob(f"__{rank}_*.distcp")) + [folder / "rng" / f"rank_{rank}.safetensors"]
    return files + [folder / ".metadata"] if rank == 0 else files


def write_rank_manifest(folder: Path, rank: int) -> Path:
    """Hash this rank's own files and write `manifests/rank_<r>.json` (atomically: present means complete)."""
    files = {}
    for f in own_files(folder, rank):
        if f.exists():
            files[str(f.relative_to(folder))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (folder / RANK_MANIFESTS).mkdir(exist_ok=True)
    out = folder / rank_manifest_name(rank)
    write_json_atomic(out, {"rank": rank, "files": files})
    return out


def wait_for_rank_manifests(folder: Path, world_size: int, timeout_s: float) -> None:
    """Rank 0's background commit: wait until every rank's manifest exists (no collective); TimeoutError naming
    the ranks that never wrote one."""
    deadline = time.monotonic() + timeout_s
    while missing := [r for r in range(world_size) if not (folder / rank_manifest_name(r)).exists()]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"checkpoint {folder}: ranks {missing} wrote no manifest within {timeout_s:.0f} s (a rank died or "
                "is stuck hashing); the checkpoint stays uncommitted (step_N.tmp) and is never resumed"
            )
        time.sleep(0.05)


def commit_manifest(folder: Path, step: int, meta: dict, world_size: int, extra_keys: list[str]) -> None:
    """Rank 0: check that the ranks' manifests claim every file, then write the top manifest over them."""
    digests, claimed = {}, set()
    for r in range(world_size):
        rel = rank_manifest_name(r)
        digests[rel] = sha256_file(folder / rel)
        claimed |= set(json.loads((folder / rel).read_text())["files"])
    written = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    unclaimed = sorted(f for f in written if f not in claimed and not f.startswith(f"{RANK_MANIFESTS}/"))
    if unclaimed:
        raise RuntimeError(
            f"checkpoint {folder}: files {unclaimed[:5]} were written but no rank's manifest claims them (has "
            "torch.distributed.checkpoint changed how FileSystemWriter names its files?); not committing"
        )
    top = {"step": step, **meta, "format": FORMAT, "world_size": world_size, "extra": extra_keys}
    write_json_atomic(folder / MANIFEST, {**top, "manifests": digests})


# ---- verification ---------------------------------------------------------------------------------------------

Entry = tuple[str, str, int]  # (file relative to the checkpoint, sha256, bytes)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise Damaged(f"{what} unreadable ({err})") from err


def _rank_entries(folder: Path, top: dict, rel: str) -> list[Entry]:
    if not (folder / rel).exists():
        raise Damaged(f"{rel} is missing")
    if sha256_file(folder / rel) != top["manifests"][rel]:
        raise Damaged(f"{rel} fails its sha256 check")
    files = _read_json(folder / rel, rel)["files"]
    return [(f, d["sha256"], int(d["bytes"])) for f, d in files.items()]


def _all_entries(folder: Path, top: dict) -> list[Entry]:
    if "manifests" not in top:  # format 1: rank 0 hashed everything into one flat map
        size = lambda f: (folder / f).stat().st_size if (folder / f).exists() else 0  # noqa: E731
        return [(f, digest, size(f)) for f, digest in top.get("files", {}).items()]
    return [e for rel in sorted(top["manifests"]) for e in _rank_entries(folder, top, rel)]


def balanced_share(entries: list[Entry], rank: int, world_size: int) -> list[Entry]:
    """Rank `rank`'s share of `entries` when they are split over `world_size` ranks by bytes (largest first to the
    least loaded; every rank computes the same split)."""
    loads = [(0, r) for r in range(world_size)]
    mine = []
    for entry in sorted(entries, key=lambda e: (-e[2], e[0])):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(entry)
        heapq.heappush(loads, (load + entry[2], r))
    return mine


def verify_share(folder: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when this rank's share of the checkpoint's files matches the manifests; otherwise what is wrong.
    With the defaults (one rank) every file is checked."""
    try:
        top = _read_json(folder / MANIFEST, "manifest")
        if "manifests" in top and top.get("world_size") == world_size:
            entries = _rank_entries(folder, top, rank_manifest_name(rank))
        else:
            entries = balanced_share(_all_entries(folder, top), rank, world_size)
    except Damaged as err:
        return str(err)
    except (KeyError, TypeError, ValueError) as err:
        return f"manifest malformed ({type(err).__name__}: {err})"
    for rel, digest, _ in entries:
        f = folder / rel
        if not f.exists():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"{rel} fails its sha256 check"
    return None
