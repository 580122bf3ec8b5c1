"""Layer-wise activation offload: the tensors a chosen block saves for backward live in host memory between its
forward and its backward, and come back one block ahead of the backward that needs them.

Forward of an offloaded block i runs under `torch.autograd.graph.saved_tensors_hooks`: every saved activation's
storage is copied (once, however many saved tensors view it) into a buffer from a host pool, and the saved slot
keeps only a handle, so the device storage is freed as soon as nothing else holds it. Parameters (the unsharded
FSDP2 weights too), tensors under `min_bytes`, and the storages of block arguments that are constants (no grad:
RoPE tables, masks) or the very tensors the previous offloaded block received (the conditioning): alive for the
whole forward anyway, stay where they are.

Backward: when the gradient of block i's output arrives (a multi-grad hook on its outputs, the same "pre-backward"
signal FSDP2 uses), the copy-back of block i's storages starts if not already under way, and so does the copy-back of
the previous offloaded block's: a prefetch one block ahead. A handle whose copy is not back yet waits for it (or
copies synchronously without prefetch).

On CUDA the host pool is pinned, both copy directions run on one side stream (`non_blocking`), the compute stream
waits on an event before using a fetched storage, and `record_stream` keeps the caching allocator from reusing a
storage that a copy still reads. On CPU the same code runs with synchronous copies into a separate pool of host
buffers, which exercises the mechanism (the original storages are dropped; the values come back from the copies).

Composes with recompute (apply recompute first: a fully recomputed block saves only its inputs, which are
offloaded) and with FSDP2 (the wrapped forward runs between FSDP's own hooks). Shape legend: storages are flat byte
buffers `[nbytes]` (uint8); views are rebuilt from (dtype, storage offset, size, stride).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

Observer = Callable[[int, torch.Tensor, bool], None]  # (block index, saved tensor, offloaded?)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding `t`'s data on this rank: a DTensor's local shard, waited on if a functional collective
    produced it (an AsyncCollectiveTensor wraps the plain result)."""
    local = t._local_tensor if isinstance(t, DTensor) else t
    return local.trigger_wait() if hasattr(local, "trigger_wait") else local


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t`'s data on this rank (a DTensor's local shard; the inner tensors of other
    wrapper subclasses, such as functional collectives' AsyncCollectiveTensor)."""
    if isinstance(t, DTensor):
        return plain_tensors(t._local_tensor)
    if is_traceable_wrapper_subclass(t):
        return [x for name in t.__tensor_flatten__()[0] for x in plain_tensors(getattr(t, name))]
    return [t]


def storage_bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as a flat uint8 tensor `[nbytes]`."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class HostPool:
    """Host buffers reused across steps, by exact byte size (every step saves the same sizes); pinned for CUDA."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.allocated_bytes = 0  # host memory this pool owns (in use + free)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.free[nbytes]:
            return self.free[nbytes].pop()
        self.allocated_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def put(self, buf: torch.Tensor) -> None:
        self.free[buf.numel()].append(buf)


class Copier:
    """Device <-> host copies: async on a side CUDA stream with events, synchronous on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def to_host(self, src_u8: torch.Tensor, host_u8: torch.Tensor) -> None:
        if not self.cuda:
            host_u8.copy_(src_u8)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the producer kernels are queued there
        with torch.cuda.stream(self.stream):
            host_u8.copy_(src_u8, non_blocking=True)
        src_u8.record_stream(self.stream)  # not reused by the allocator before the copy has read it

    def to_device(self, host_u8: torch.Tensor) -> tuple[torch.Tensor, object]:
        if not self.cuda:
            return torch.empty_like(host_u8).copy_(host_u8), None
        with torch.cuda.stream(self.stream):
            dev_u8 = torch.empty(host_u8.numel(), dtype=torch.uint8, device=self.device)
            dev_u8.copy_(host_u8, non_blocking=True)
            event = self.stream.record_event()
        return dev_u8, event

    def wait(self, dev_u8: torch.Tensor, event: object) -> None:
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            dev_u8.record_stream(current)


class Entry:
    """One offloaded storage: its host copy, its copy back (during backward), and how many handles use it."""

    def __init__(self, host_u8: torch.Tensor):
        self.host_u8: torch.Tensor | None = host_u8
        self.dev_u8: torch.Tensor | None = None
        self.event: object = None
        self.users = 0

    def fetch(self, copier: Copier) -> None:
        """Start the copy back (no-op when under way, done, or released)."""
        if self.dev_u8 is None and self.host_u8 is not None:
            self.dev_u8, self.event = copier.to_device(self.host_u8)

    def release(self, pool: HostPool) -> None:
        self.users -= 1
        if self.users == 0 and self.host_u8 is not None:
            pool.put(self.host_u8)
            self.host_u8, self.dev_u8, self.event = None, None, None


class Packed:
    """What autograd keeps for an offloaded saved tensor: the entry and the view's metadata."""

    def __init__(self, entry: Entry, t: torch.Tensor, pool: HostPool, dtensor: torch.Tensor | None, index: int):
        self.entry, self.pool, self.index = entry, pool, index  # index: the block that saved it
        self.meta = (t.dtype, t.storage_offset(), t.size(), t.stride())
        self.dtensor_meta = None
        if dtensor is not None:
            self.dtensor_meta = (dtensor.device_mesh, dtensor.placements, dtensor.size(), dtensor.stride())
        entry.users += 1

    def __del__(self) -> None:  # autograd dropped the saved slot (after the node's backward, or with the graph)
        self.entry.release(self.pool)


class Group:
    """The offloaded storages of one forward call of one block."""

    def __init__(self, index: int, keep_ptrs: set[int], prev: Group | None):
        self.index = index
        self.keep_ptrs = keep_ptrs  # parameter and shared-argument storages: never offloaded
        self.entries: dict[int, Entry] = {}  # storage data_ptr -> entry, valid while `alive` pins the storages
        self.alive: list[torch.Tensor] = []  # the device storages, held until the block's forward ends
        self.prev = weakref.ref(prev) if prev is not None else None

    def end_forward(self) -> None:
        self.alive.clear()

    def fetch(self, copier: Copier) -> None:
        for entry in self.entries.values():
            entry.fetch(copier)


class ActivationOffloader:
    """Offloads the saved activations of chosen blocks to host memory, with a one-block-ahead prefetch in backward."""

    def __init__(self, device: torch.device | str | None = None, min_bytes: int = 1024, prefetch: bool = True):
        self.device: torch.device | None = None  # the compute device; None: that of the first block input seen
        self.copier: Copier | None = None
        self.pool: HostPool | None = None
        if device is not None:
            self._set_device(torch.device(device))
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.observer: Observer | None = None  # memory accounting listens here (its own hooks are shadowed)
        self._last: tuple[int, weakref.ref] | None = None  # (index, group) of the latest offloaded forward call
        self._last_args: list[weakref.ref] = []

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        self.copier = Copier(device)
        self.pool = HostPool(pin=self.copier.cuda)

    # ---- wiring ----
    def wrap(self, block: nn.Module, index: int) -> None:
        """Replace `block`'s instance forward by the offloading one (parameter names unchanged; idempotent)."""
        if getattr(block, "_vidtron_offload", None) is not None:
            return
        inner = block.forward

        def forward(*args, **kwargs):
            group = self._begin(block, index, args)
            with saved_tensors_hooks(lambda t: self._pack(group, t), self._unpack):
                out = inner(*args, **kwargs)
            group.end_forward()
            self._on_backward(out, group)
            return out

        block.forward = forward
        block._vidtron_offload = self

    def _begin(self, block: nn.Module, index: int, args: tuple) -> Group:
        flat = flat_tensors(args)
        if self.device is None:
            self._set_device(local_tensor(flat[0]).device if flat else torch.device("cpu"))
        shared = {_ptr(a) for a in flat if not a.requires_grad or any(r() is a for r in self._last_args)}
        params = {_ptr(p) for p in block.parameters()}
        prev = None
        if self._last is not None and self._last[0] < index:  # same forward pass
            prev = self._last[1]()
        group = Group(index, params | shared, prev)
        self._last = (index, weakref.ref(group))
        self._last_args = [weakref.ref(a) for a in flat]
        return group

    def _on_backward(self, out, group: Group) -> None:
        outs = [t for t in flat_tensors(out) if t.requires_grad]
        if not outs or not group.entries:
            return

        def pre_backward(_grad) -> None:  # holds the group as long as the graph lives
            group.fetch(self.copier)
            prev = group.prev() if (self.prefetch and group.prev is not None) else None
            if prev is not None:
                prev.fetch(self.copier)

        register_multi_grad_hook(outs, pre_backward, mode="any")

    # ---- saved-tensor hooks ----
    def _pack(self, group: Group, t: torch.Tensor):
        local = local_tensor(t)
        offload = (
            not isinstance(t, nn.Parameter)
            and not is_traceable_wrapper_subclass(local)
            and local.device == self.device
            and local.untyped_storage().nbytes() >= self.min_bytes
            and _ptr(local) not in group.keep_ptrs
        )
        if self.observer is not None:
            self.observer(group.index, t, offload)
        if not offload:
            return t
        dtensor = t if isinstance(t, DTensor) else None
        return Packed(self._entry(group, local), local, self.pool, dtensor, group.index)

    def _entry(self, group: Group, local: torch.Tensor) -> Entry:
        key = _ptr(local)
        entry = group.entries.get(key)
        if entry is None:
            src_u8 = storage_bytes_view(local)
            entry = Entry(self.pool.get(src_u8.numel()))
            self.copier.to_host(src_u8, entry.host_u8)
            group.entries[key] = entry
            group.alive.append(src_u8)
        return entry

    def _unpack(self, packed):
        if not isinstance(packed, Packed):
            return packed
        entry = packed.entry
        entry.fetch(self.copier)  # no-op when the prefetch already started it
        self.copier.wait(entry.dev_u8, entry.event)
        dtype, offset, size, stride = packed.meta
        local = torch.empty(0, dtype=dtype, device=self.device).set_(
            entry.dev_u8.untyped_storage(), offset, size, stride
        )
        if packed.dtensor_meta is None:
            return local
        mesh, placements, gsize, gstride = packed.dtensor_meta
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=gsize, stride=gstride)


def _ptr(t: torch.Tensor) -> int:
    try:
        return local_tensor(t).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no real storage
        return -1


def flat_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for item in x for t in flat_tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in flat_tensors(item)]
    return []


def apply_offload(
    blocks: list[nn.Module],
    chosen: list[int],
    device: torch.device | str | None = None,
    prefetch: bool = True,
    min_bytes: int = 1024,
) -> ActivationOffloader | None:
    """Offload the saved activations of `blocks[i]` for i in `chosen`; None when nothing is chosen."""
    if not chosen:
        return None
    offloader = ActivationOffloader(device, min_bytes=min_bytes, prefetch=prefetch)
    for i in chosen:
        offloader.wrap(blocks[i], i)
    return offloader
