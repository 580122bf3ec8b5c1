"""Analytic DiT FLOPs vs. torch's FlopCounterMode on the real model (forward + backward on CPU).

On CPU, SDPA dispatches to `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode has no formula
for (it counts 0), so the count runs under the math backend: attention becomes explicit `bmm`s that it counts.
The padded text tokens are computed (and counted) like valid ones; the text mask below pads half of a sample.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vidtron.models.dit import DiT
from vidtron.models.dit.configs import dit_config
from vidtron.tools.flops import dit_train_flops

# (flavor, overrides, latent (F, H, W), text tokens, batch)
CASES = {
    "dit-tiny": ("dit-tiny", {}, (3, 8, 8), 32, 2),
    "wide-shallow": (
        "dit-tiny",
        {"num_heads": 4, "head_dim": 32, "num_double_blocks": 1, "num_single_blocks": 1},
        (3, 8, 8),
        32,
        2,
    ),
    "narrow-deep": (
        "dit-tiny",
        {"num_heads": 2, "head_dim": 16, "num_double_blocks": 3, "num_single_blocks": 4},
        (3, 8, 8),
        32,
        2,
    ),
    "other-clip": (
        "dit-tiny",
        {"num_heads": 3, "head_dim": 32, "num_double_blocks": 2, "num_single_blocks": 1},
        (2, 6, 10),
        17,
        3,
    ),
    "guidance": (
        "dit-small",
        {"num_heads": 1, "num_double_blocks": 1, "num_single_blocks": 1, "text_dim": 64, "pooled_dim": 32},
        (1, 4, 4),
        8,
        1,
    ),
}


def _counted(cfg, latent, text_len: int, batch: int) -> tuple[int, int, int]:
    """(forward, forward + backward, attention bmm) FLOPs that FlopCounterMode sees for one training step."""
    torch.manual_seed(0)
    model = DiT(cfg)
    model.init_weights()
    x = torch.randn(batch, cfg.in_channels, *latent)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, text_len // 2 :] = False  # padding: still computed by dense attention
    args = (x, torch.rand(batch) * 1000, torch.randn(batch, text_len, cfg.text_dim), mask)
    guidance = torch.full((batch,), 6000.0) if cfg.guidance_embeds else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(*args, torch.randn(batch, cfg.pooled_dim), guidance)
        forward = counter.get_total_flops()
        out.square().mean().backward()
    bmm = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) == "aten.bmm")
    return forward, counter.get_total_flops(), bmm


@pytest.mark.parametrize("name", list(CASES))
def test_flops_match_flop_counter(name):
    flavor, overrides, latent, text_len, batch = CASES[name]
    cfg = dit_config(flavor, overrides)
    est = dit_train_flops(cfg, latent, text_len, batch)
    forward, total, attention = _counted(cfg, latent, text_len, batch)
    assert est["forward"] == forward  # every matmul, exactly
    assert est["total_executed"] == total  # backward as autograd runs it
    attn = est["breakdown"]
    assert 3 * (attn["double_attention"] + attn["single_attention"] + attn["text_refiner_attention"]) == attention
    # the 3x-forward convention is within 2% of what runs (it adds input grads of the first layers)
    assert abs(est["total"] / total - 1) < 0.02, (name, est["total"] / total)
    assert est["backward"] == 2 * est["forward"] and est["total"] == 3 * est["forward"]


@pytest.mark.parametrize("name", ["dit-tiny", "other-clip", "guidance"])
def test_param_counts_match_model(name):
    flavor, overrides, latent, text_len, batch = CASES[name]
    cfg = dit_config(flavor, overrides)
    with torch.device("meta"):
        model = DiT(cfg)
    est = dit_train_flops(cfg, latent, text_len, batch)
    assert est["params"] == model.num_params()
    blocks = [model.double_blocks, model.single_blocks, model.text_refiner.blocks]
    assert est["params_non_embedding"] == sum(p.numel() for b in blocks for p in b.parameters())
    assert est["flops_6nd"] == 6 * est["params_non_embedding"] * est["video_tokens"]
    assert est["video_tokens"] == batch * (latent[0] // cfg.patch_size_t) * (latent[1] // 2) * (latent[2] // 2)


def test_13b_anchor():
    """HunyuanVideo 13B: the parameter count of diffusers' model; FLOPs scale linearly with the batch."""
    cfg = dit_config("dit-13b")
    one = dit_train_flops(cfg, (33, 90, 160), 256)
    assert one["params"] == 12_821_012_544
    assert dit_train_flops(cfg, (33, 90, 160), 256, batch=4)["total"] == 4 * one["total"]
    assert one["attention_fraction"] > 0.5  # 119k tokens: attention dominates at 720p x 129 frames


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"latent_shape": (3, 7, 8)}, "latent_shape"),
        ({"latent_shape": (3, 8)}, "latent_shape"),
        ({"text_len": -1}, "text_len"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"latent_shape": (3, 8, 8), "text_len": 32, "batch": 1} | kwargs
    with pytest.raises(ValueError, match=field):
        dit_train_flops(dit_config("dit-tiny"), **args)
