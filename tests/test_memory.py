"""Activation recompute and offload (vidtron/parallel/recompute.py, offload.py) and the saved-tensor accounting.

Parity tolerance: none. In fp32 on CPU a recomputed or offloaded block runs the same ops in the same order on the
same values (offload copies bytes), so losses, gradients and parameters after AdamW steps must be bitwise equal to
no policy, on one rank and on a 2-rank FSDP2 layout (compared with that layout's own no-policy run).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vidtron.errors import ConfigError
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.models.dit.sharding import apply_activation_memory, apply_offload, apply_recompute
from vidtron.models.dit.sharding import select_dit_blocks as select_blocks
from vidtron.parallel import offload as offload_mod
from vidtron.parallel.offload import ActivationOffloader
from vidtron.testing.multirank import run_ranks
from vidtron.tools.memory_accounting import measure_step, synthetic_batch

GRID, TEXT, BATCH = (3, 8, 8), 16, 2  # latent clip (F, H, W), text tokens, batch


@dataclass
class Memory:  # the fields of MemoryConfig, without importing the config layer into the policy tests
    recompute: str = "none"
    selective: str = "attn"
    recompute_blocks: str = "all"
    offload_blocks: str = ""


POLICIES = {
    "sel-attn": Memory("selective", "attn"),
    "sel-mlp": Memory("selective", "mlp"),
    "full": Memory("full"),
    "full-some": Memory("full", recompute_blocks="0,3"),
    "offload": Memory(offload_blocks="all"),
    "offload+full": Memory("full", offload_blocks="all"),
    "offload+sel": Memory("selective", "attn", "double", "1-3"),
}


def tiny_config():
    return dit_config("dit-tiny", {"num_double_blocks": 2, "num_single_blocks": 2})


def build(memory: Memory | None = None, min_bytes: int = 1024) -> DiT:
    torch.manual_seed(0)
    model = DiT(tiny_config())
    model.init_weights()
    if memory is not None:
        apply_recompute(model, memory.recompute, memory.recompute_blocks, memory.selective)
        apply_offload(model, memory.offload_blocks, min_bytes=min_bytes)
    return model


def train_steps(model: DiT, steps: int = 2) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of `steps` AdamW steps and the gradients of the first."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for step in range(steps):
        inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH, seed=step)
        loss = torch.nn.functional.mse_loss(model(**inputs).float(), target)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads


def test_block_specs():
    assert select_blocks("all", 2, 3) == {0, 1, 2, 3, 4}
    assert select_blocks("double", 2, 3) == {0, 1} and select_blocks("single", 2, 3) == {2, 3, 4}
    assert select_blocks("0-1,4", 2, 3) == {0, 1, 4} == select_blocks("0-1+4", 2, 3)
    assert select_blocks("", 2, 3) == set() == select_blocks("none", 2, 3)
    for bad in ("5", "2-1", "x", "1-"):
        with pytest.raises(ConfigError, match="memory.recompute_blocks"):
            select_blocks(bad, 2, 3)


def test_state_dict_keys_unchanged():
    keys = list(build().state_dict().keys())
    for name, memory in POLICIES.items():
        assert list(build(memory).state_dict().keys()) == keys, name


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_matches_no_policy_bitwise(name):
    ref_losses, ref_grads = train_steps(build())
    model = build(POLICIES[name])
    losses, grads = train_steps(model)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    for (n, p), q in zip(model.named_parameters(), build().parameters()):
        assert p.shape == q.shape, n


def _record_order(monkeypatch, prefetch: bool) -> list[tuple[str, int]]:
    """Order of copy-back starts (per block) and unpacks (per block) in one backward."""
    events: list[tuple[str, int]] = []
    fetch, unpack = offload_mod.Group.fetch, offload_mod.ActivationOffloader._unpack

    def logged_fetch(self, copier):
        if any(e.dev_u8 is None and e.host_u8 is not None for e in self.entries.values()):
            events.append(("fetch", self.index))
        fetch(self, copier)

    def logged_unpack(self, packed):
        if isinstance(packed, offload_mod.Packed):
            events.append(("unpack", packed.index))
        return unpack(self, packed)

    monkeypatch.setattr(offload_mod.Group, "fetch", logged_fetch)
    monkeypatch.setattr(offload_mod.ActivationOffloader, "_unpack", logged_unpack)
    model = build()
    apply_offload(model, "all", prefetch=prefetch, min_bytes=0)
    inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH)
    torch.nn.functional.mse_loss(model(**inputs).float(), target).backward()
    return events


def test_offload_prefetches_one_block_ahead(monkeypatch):
    events = _record_order(monkeypatch, prefetch=True)
    first = {e: events.index(e) for e in reversed(events)}  # first occurrence of each event
    for i in (3, 2, 1):  # backward order: block i's pre-backward starts block i-1's copy before i's unpacks
        assert first["fetch", i - 1] < first["unpack", i], events
    plain = _record_order(monkeypatch, prefetch=False)
    first = {e: plain.index(e) for e in reversed(plain)}
    assert all(first["fetch", i - 1] > first["unpack", i] for i in (3, 2, 1)), plain


def test_offload_moves_saved_tensors_and_reuses_the_pool():
    model = build()
    offloader = apply_offload(model, "all", min_bytes=0)
    inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH)
    sizes = []
    for _ in range(2):
        result = measure_step(model, inputs, target)
        sizes.append(offloader.pool.allocated_bytes)
        free = sum(b.numel() for bufs in offloader.pool.free.values() for b in bufs)
        assert free == offloader.pool.allocated_bytes  # every buffer came back after backward
    assert sizes[0] == sizes[1] > 0  # the second step reused the first step's buffers
    assert all(b["device"] < 0.01 * b["host"] for b in result["blocks"][1:]), result["blocks"]


def test_accounting_orders_policies():
    measured = {}
    for name, memory in {"none": Memory(), **POLICIES}.items():
        model = build(memory)
        inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH)
        measured[name] = measure_step(model, inputs, target, torch.optim.AdamW(model.parameters()))
    dev = {k: v["device"] for k, v in measured.items()}
    assert dev["full"] < dev["sel-attn"] < dev["none"] and dev["sel-mlp"] < dev["none"]
    assert dev["offload+full"] < dev["full"] and measured["offload"]["host"] > 0.8 * dev["none"]
    states, model = measured["none"], build()
    assert states["params"] == states["grads"] == 4 * model.num_params()  # fp32
    steps = 4 * len(list(model.parameters()))  # AdamW's fp32 step counter per parameter
    assert states["optimizer"] == 2 * states["params"] + steps


def test_offloader_on_cpu_keeps_small_and_constant_tensors():
    model = build()
    offloader = apply_offload(model, "all")  # default min_bytes
    assert isinstance(offloader, ActivationOffloader) and offloader.min_bytes > 0
    inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH)
    result = measure_step(model, inputs, target)
    assert result["blocks"][1]["device"] > 0  # [B, D] modulation vectors stay on the device


# ---------------------------------------------------------------------------------------------------------------
# 2 ranks, FSDP2
# ---------------------------------------------------------------------------------------------------------------
def _fsdp_rank(names: list[str]) -> dict:
    from vidtron.models.dit.parallelize import parallelize_dit
    from vidtron.parallel.dims import ParallelDims

    out = {}
    for name in ["none", *names]:
        model = build()
        dims = ParallelDims(dp_shard=2)
        dims.build_mesh("cpu")
        parallelize_dit(model, dims)
        apply_activation_memory(model, POLICIES.get(name, Memory()))  # eager: same as before fully_shard
        rank = torch.distributed.get_rank()
        inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, 1, seed=rank)  # each rank its own sample
        result = measure_step(model, inputs, target)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out[name] = {"loss": result["loss"], "grads": grads, "device": result["device"], "host": result["host"]}
    return out


def test_policies_under_fsdp_two_ranks():
    names = ["sel-attn", "full", "offload", "offload+full"]
    per_rank = run_ranks(_fsdp_rank, 2, (names,))
    for rank in per_rank:
        ref = rank["none"]
        for name in names:
            assert torch.equal(rank[name]["loss"], ref["loss"]), name
            for n, g in ref["grads"].items():
                assert torch.equal(rank[name]["grads"][n], g), (name, n)
        assert rank["full"]["device"] < rank["sel-attn"]["device"] < ref["device"]
        assert rank["offload"]["host"] > 0 and rank["offload"]["device"] < 0.5 * ref["device"]


@pytest.mark.parametrize("offload", [False, True])
def test_offload_frees_the_device_storage(offload):
    """The MLP hidden of a block is saved for backward: alive after forward without offload, gone with it."""
    import weakref

    model = build(Memory(offload_blocks="all" if offload else ""))
    alive = []
    model.double_blocks[1].img_mlp.fc1.register_forward_hook(lambda m, a, out: alive.append(weakref.ref(out)))
    inputs, target = synthetic_batch(tiny_config(), GRID, TEXT, BATCH)
    loss = torch.nn.functional.mse_loss(model(**inputs).float(), target)
    assert (alive[0]() is None) == offload
    loss.backward()


def test_trainer_applies_memory_config(synth_data, tmp_path):
    """`memory.*` reaches the model through the trainer (parallelize_dit's step 3, or directly on one process) and
    changes no loss."""
    from tests.helpers import run_training

    common = ("trainer.steps=2", "trainer.progress=false")
    base = run_training(synth_data, tmp_path / "base", *common)
    state = run_training(synth_data, tmp_path / "mem", *common, "memory.recompute=full", "memory.offload_blocks=single")
    block0, last = state.model.double_blocks[0], state.model.single_blocks[-1]
    wired = getattr(block0, "_vidtron_recompute", False) and getattr(last, "_vidtron_offload", None) is not None
    assert wired, "the trainer did not apply cfg.memory: add apply_activation_memory to setup_model / parallelize_dit"
    assert state.losses == base.losses
