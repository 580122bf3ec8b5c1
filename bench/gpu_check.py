"""Short GPU check (a few minutes): fused LSE attention vs SDPA, ring CP over the visible GPUs, dit-small step + MFU.

    python -m bench.gpu_check          # writes bench/results/gpu.json; on a machine without CUDA: a message, exit 0
    make test-gpu                      # the gpu-marked tests, then this script

Parts (bf16, CUDA events for time, torch.cuda.max_memory_allocated for memory):
  attention  one ring-step block (block_attention + block_attention_backward, impl fused, and flash when flash-attn
             is installed) vs dense SDPA forward + backward, B=1, N=8, Dh=128, L in ATTN_SEQS; max abs diff of out.
  ring       RingAttention over every visible GPU (torchrun, nccl) when there are >= 2, on the full sequence split
             across ranks; rank 0 compares the gathered output with dense SDPA. Skipped (with the reason) on 1 GPU.
  dit        dit-small (`vidtron.models.dit`) in bf16, latent clip DIT_LATENT + DIT_TEXT text tokens, AdamW steps:
             median step time, FLOPs per step from torch's FlopCounterMode, MFU against the GPU's dense bf16 peak.
Shape legend: B batch, N heads, L tokens, Dh head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ATTN_SEQS = (8192, 32768)
ATTN_SHAPE = (1, 8, 128)  # B, N, Dh
RING_SEQ = 32768
DIT_LATENT, DIT_TEXT, DIT_STEPS = (9, 48, 80), 256, 5  # (F, H, W) latents -> 9 * 24 * 40 = 8640 video tokens
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def _timed(fn, reps: int = 3) -> tuple[float, float]:
    """(median seconds over `reps` calls after one warm-up, peak bytes allocated during them)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated()


def _qkv(seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, n, dh = ATTN_SHAPE
    return [torch.randn(b, n, seq, dh, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
def _sdpa_step(q, k, v, dout):
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*x)
    out.backward(dout)
    return out


def _block_step(q, k, v, dout, impl):
    from vidtron.kernels.lse_attention import block_attention, block_attention_backward

    out, lse = block_attention(q, k, v, impl=impl)
    block_attention_backward(dout, q, k, v, out, lse, impl=impl)
    return out


def check_attention() -> list[dict]:
    from vidtron.kernels.lse_attention import flash_available

    impls = ["fused"] + (["flash"] if flash_available() else [])
    rows = []
    for seq in ATTN_SEQS:
        q, k, v, dout = _qkv(seq)
        ref = _sdpa_step(q, k, v, dout).detach().float()
        t_sdpa, m_sdpa = _timed(lambda: _sdpa_step(q, k, v, dout))  # noqa: B023
        row = {"seq": seq, "sdpa_ms": t_sdpa * 1e3, "sdpa_peak_gib": m_sdpa / 2**30}
        for impl in impls:
            diff = (_block_step(q, k, v, dout, impl).float() - ref).abs().max().item()
            t, m = _timed(lambda: _block_step(q, k, v, dout, impl))  # noqa: B023
            row[impl] = {"ms": t * 1e3, "peak_gib": m / 2**30, "over_sdpa": t / t_sdpa, "max_abs_diff": diff}
        rows.append(row)
        print(f"attention L={seq}: {row}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# ring CP over the visible GPUs (torchrun workers)
# ---------------------------------------------------------------------------------------------------------------
def ring_worker(seq: int, out_path: str) -> None:
    import torch.distributed as dist

    from vidtron.parallel.context import RingAttention, shard_video_tokens

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = _qkv(seq)  # the same full tensors on every rank (same seed)
    part = [shard_video_tokens(t, rank, world, dim=2).contiguous() for t in (q, k, v, dout)]  # zero-padded chunks
    core = RingAttention(dist.group.WORLD, video_len=seq)

    def step():
        x = [t.detach().requires_grad_() for t in part[:3]]
        out = core(*x)
        out.backward(part[3])
        return out

    out = step().detach()
    t, m = _timed(step)
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    if rank == 0:
        ref = F.scaled_dot_product_attention(q, k, v).float()
        diff = (torch.cat(gathered, dim=2)[:, :, :seq].float() - ref).abs().max().item()
        row = {"world": world, "seq": seq, "ms_per_rank": t * 1e3, "peak_gib_rank0": m / 2**30, "max_abs_diff": diff}
        Path(out_path).write_text(json.dumps(row))
    dist.destroy_process_group()


def check_ring(tmp_dir: Path) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"{gpus} GPU visible; ring CP needs >= 2 GPUs (torchrun --nproc_per_node >= 2, nccl)"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out_path = tmp_dir / "ring.json"
    cmd = [torchrun, "--standalone", f"--nproc_per_node={gpus}", "-m", "bench.gpu_check"]
    cmd += ["--ring-worker", "--seq", str(RING_SEQ), "--out", str(out_path)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"failed": done.stderr[-3000:]}
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# dit-small training steps
# ---------------------------------------------------------------------------------------------------------------
def _dit_inputs(cfg) -> tuple[dict, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    inputs = {
        "latents": randn(1, cfg.in_channels, *DIT_LATENT),
        "timestep": torch.full((1,), 500.0, device="cuda"),
        "text_states": randn(1, DIT_TEXT, cfg.text_dim),
        "text_mask": torch.ones(1, DIT_TEXT, dtype=torch.bool, device="cuda"),
        "pooled": randn(1, cfg.pooled_dim),
        "guidance": torch.full((1,), 6000.0, device="cuda") if cfg.guidance_embeds else None,
    }
    return inputs, randn(1, cfg.out_channels, *DIT_LATENT)


def _peak_flops() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def check_dit() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from vidtron.models.dit import FLAVORS, DiT

    cfg = FLAVORS["dit-small"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiT(cfg)
    model.init_weights()
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs, target = _dit_inputs(cfg)

    def step():
        loss = F.mse_loss(model(**inputs).float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t, m = _timed(step, reps=DIT_STEPS)
    name, peak = _peak_flops()
    row = {"flavor": "dit-small", "params": model.num_params(), "latent_fhw": DIT_LATENT, "text_tokens": DIT_TEXT}
    row |= {"step_ms": t * 1e3, "peak_gib": m / 2**30, "flops_per_step": flops, "tflops": flops / t / 1e12}
    row |= {"gpu": name, "peak_bf16_flops": peak, "mfu": None if peak is None else flops / t / peak}
    print(f"dit: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ring-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=RING_SEQ, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ring_worker:
        ring_worker(args.seq, args.out)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to measure, skipped")
        return 0
    import tempfile

    from bench.common import write_result

    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count()}
    result["attention"] = check_attention()
    with tempfile.TemporaryDirectory() as tmp:
        result["ring"] = check_ring(Path(tmp))
    print(f"ring: {result['ring']}", flush=True)
    result["dit"] = check_dit()
    print(f"wrote {write_result('gpu', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
