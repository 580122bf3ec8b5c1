"""Memory accounting: the bytes a layout and an activation policy actually hold on this rank.

- Saved activations per block, measured with saved-tensor hooks during a forward (`SavedActivationRecorder`): a
  storage viewed by several saved tensors counts once (for the first block that saves it), parameters (sharded or
  FSDP-unsharded) are excluded, and for an offloaded block the bytes split into device and host (the offloader
  reports what it moves; its own hooks shadow ours inside the block). A fully recomputed block saves only its
  inputs (torch's non-reentrant checkpoint saves them under the outer hooks). Tensors saved outside the blocks
  (embeddings, refiner, final layer, loss) go to `other`.
  Constant block arguments (RoPE tables, masks) count for the first block that receives them.
- Model states (`model_state_bytes`): parameter, gradient and optimizer-state bytes of this rank's local shards.

The recorder pins every storage it counts until it exits, so addresses cannot be reused during a measurement (that
would merge two storages); measure one forward (and its backward, optionally) inside the `with` block.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from vidtron.models.dit.sharding import dit_blocks
from vidtron.parallel.offload import flat_tensors, local_tensor, plain_tensors

OTHER = -1  # index of everything saved outside the blocks


def tensor_bytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


class SavedActivationRecorder:
    """Context manager that records the saved-activation bytes of every block of a DiT during a forward.

    `blocks[i] = {"device": bytes, "host": bytes}`; `other` = bytes saved outside the blocks (device)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks: dict[int, dict[str, int]] = defaultdict(lambda: {"device": 0, "host": 0})
        self._seen: dict[tuple[int, bool], object] = {}  # (storage data_ptr, offloaded) -> storage (pinned)
        self._param_ptrs: set[int] = set()
        self._handles: list = []
        self._contexts: list[saved_tensors_hooks] = []
        self._offloaders: list = []

    @property
    def other(self) -> int:
        return self.blocks[OTHER]["device"]

    # ---- observing ----
    def observe(self, index: int, t: torch.Tensor, offloaded: bool = False) -> None:
        if isinstance(t, nn.Parameter):
            return
        for inner in plain_tensors(t):
            try:
                storage = inner.untyped_storage()
                ptr = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # no real storage (fake / functional tensors)
                continue
            if (ptr, offloaded) in self._seen or (ptr in self._param_ptrs and self._is_param(ptr)):
                continue
            self._seen[ptr, offloaded] = storage
            self.blocks[index]["host" if offloaded else "device"] += storage.nbytes()

    def _refresh_params(self) -> None:
        """The storages of the parameters as they are now (FSDP2 all-gathers into new storages per unit)."""
        self._param_ptrs = {local_tensor(p).untyped_storage().data_ptr() for p in self.model.parameters()}

    def _is_param(self, ptr: int) -> bool:
        """Confirm a match against the parameters as they are now: FSDP2 frees an unsharded storage after the unit's
        forward, and a later activation can reuse its address."""
        self._refresh_params()
        return ptr in self._param_ptrs

    def _push(self, index: int, args: tuple = ()) -> None:
        self._refresh_params()
        for t in flat_tensors(args):  # constants (RoPE tables, masks): a full checkpoint holds them outside autograd
            if not t.requires_grad:
                self.observe(index, t)
        ctx = saved_tensors_hooks(lambda t: (self.observe(index, t), t)[1], lambda t: t)
        ctx.__enter__()
        self._contexts.append(ctx)

    def _pop(self) -> None:
        self._contexts.pop().__exit__(None, None, None)

    # ---- installing ----
    def __enter__(self) -> SavedActivationRecorder:
        for module in self.model.modules():  # FSDP units (after FSDP's own pre-forward hook, which unshards)
            if hasattr(module, "unshard"):
                self._handles.append(module.register_forward_pre_hook(lambda m, a: self._refresh_params()))
        for i, block in enumerate(dit_blocks(self.model)):
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._push(i, a)))
            self._handles.append(block.register_forward_hook(lambda m, a, o: self._pop()))
            offloader = getattr(block, "_vidtron_offload", None)
            if offloader is not None and offloader not in self._offloaders:
                offloader.observer = self.observe
                self._offloaders.append(offloader)
        self._push(OTHER)
        return self

    def __exit__(self, *exc) -> None:
        self._pop()
        for h in self._handles:
            h.remove()
        for offloader in self._offloaders:
            offloader.observer = None
        self._handles.clear()
        self._seen.clear()


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of this rank's local parameter shards, their gradients (when allocated) and optimizer state."""
    params = list(model.parameters())
    out = {
        "params": sum(tensor_bytes(p) for p in params),
        "grads": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": 0,
    }
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer"] += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return out


def synthetic_batch(cfg, grid: tuple[int, int, int], text_tokens: int, batch: int, dtype=torch.float32, seed: int = 0):
    """Random DiT inputs for latent clips of `grid` (F, H, W) and a velocity target, for measurements."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, *grid)
    inputs = {
        "latents": torch.randn(shape, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "text_states": torch.randn(batch, text_tokens, cfg.text_dim, generator=g).to(dtype),
        "text_mask": torch.ones(batch, text_tokens, dtype=torch.bool),
        "pooled": torch.randn(batch, cfg.pooled_dim, generator=g).to(dtype),
        "guidance": torch.full((batch,), 6000.0) if cfg.guidance_embeds else None,
    }
    return inputs, torch.randn((batch, cfg.out_channels, *grid), generator=g)


def measure_step(model: nn.Module, inputs: dict, target: torch.Tensor, optimizer=None) -> dict:
    """One training step with the saved activations recorded: per-block device / host bytes, `other`, and the
    model-state bytes after the optimizer step (or after backward when `optimizer` is None)."""
    with SavedActivationRecorder(model) as rec:
        out = model(**inputs)
        loss = torch.nn.functional.mse_loss(out.float(), target)
    blocks = [dict(rec.blocks[i]) for i in range(len(dit_blocks(model)))]
    result = {"blocks": blocks, "other": rec.other, "loss": loss.detach()}
    result["device"] = sum(b["device"] for b in blocks) + rec.other
    result["host"] = sum(b["host"] for b in blocks)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return result | model_state_bytes(model, optimizer)
