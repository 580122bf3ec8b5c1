"""The DiT: parity with diffusers' HunyuanVideoTransformer3DModel (both directions), the 13B shape on meta,
configs, the attention seam, and a CPU train step of dit-tiny.

Parity tolerance: 1e-5 absolute in fp32 on outputs of magnitude ~1. Our forward performs the same operations
in the same order as diffusers, so the expected difference is 0 or a few ulps.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from vidtron.errors import ConfigError
from vidtron.kernels.attention import DenseAttention
from vidtron.models.dit import FLAVORS, DiT, DiTConfig
from vidtron.models.dit.configs import from_diffusers_config, to_diffusers_config
from vidtron.models.dit.state_dict_adapter import from_diffusers, to_diffusers

diffusers = pytest.importorskip("diffusers")

TINY_DIFFUSERS = dict(  # 2 heads x 8, rope (2, 2, 4), every module kind present
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    text_embed_dim=12,
    pooled_projection_dim=10,
    rope_axes_dim=(2, 2, 4),
)
TOL = 1e-5


def _diffusers_model(guidance: bool) -> torch.nn.Module:
    return diffusers.HunyuanVideoTransformer3DModel(**TINY_DIFFUSERS, guidance_embeds=guidance).eval()


def _randomise(module: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def _inputs(cfg: DiTConfig, frames: int, size: int, mask_rows: list[list[int]]) -> dict[str, torch.Tensor]:
    B, T = len(mask_rows), len(mask_rows[0])
    return dict(
        latents=torch.randn(B, cfg.in_channels, frames, size, size),
        timestep=torch.tensor([250.0, 900.0])[:B],
        text_states=torch.randn(B, T, cfg.text_dim),
        text_mask=torch.tensor(mask_rows),
        pooled=torch.randn(B, cfg.pooled_dim),
        guidance=torch.tensor([6000.0, 3500.0])[:B] if cfg.guidance_embeds else None,
    )


def _run_diffusers(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    args = (x["latents"], x["timestep"], x["text_states"], x["text_mask"], x["pooled"], x["guidance"])
    return model(*args, return_dict=False)[0]


PADDED = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]  # different valid lengths, padded at the end
HOLES = [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]  # not a prefix: diffusers' refiner and joint masks disagree


@pytest.mark.parametrize(
    "guidance, frames, size, mask",
    [(True, 3, 4, PADDED), (False, 2, 6, PADDED), (True, 2, 4, HOLES)],
)
def test_parity_from_diffusers(guidance, frames, size, mask):
    torch.manual_seed(0)
    ref = _diffusers_model(guidance)
    _randomise(ref)
    cfg = from_diffusers_config(dict(ref.config))
    ours = DiT(cfg).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    x = _inputs(cfg, frames, size, mask)
    with torch.no_grad():
        want, got = _run_diffusers(ref, x), ours(**x)
        refined_args = (x["text_states"], x["timestep"], x["text_mask"])
        want_txt, got_txt = ref.context_embedder(*refined_args), ours.text_refiner(*refined_args)
    assert got.shape == (2, cfg.out_channels, frames, size, size)
    assert want.abs().max() > 0.1  # nothing trivially zero
    assert (got - want).abs().max().item() <= TOL
    assert (got_txt - want_txt).abs().max().item() <= TOL  # every text token, padded ones included


def test_parity_to_diffusers_and_key_round_trip():
    torch.manual_seed(1)
    cfg = from_diffusers_config(dict(TINY_DIFFUSERS, guidance_embeds=True))
    with torch.device("meta"):
        ours = DiT(cfg)
    ours.to_empty(device="cpu")
    ours.init_weights()
    with torch.no_grad():  # perturb: adaLN-zero init would make the output identically zero
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.eval()
    sd = ours.state_dict()
    ref = _diffusers_model(guidance=True)
    ref.load_state_dict(to_diffusers(sd), strict=True)
    x = _inputs(cfg, 3, 4, PADDED)
    with torch.no_grad():
        want, got = _run_diffusers(ref, x), ours(**x)
    assert (got - want).abs().max().item() <= TOL

    back = from_diffusers(to_diffusers(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError):
        from_diffusers({"not_a_param.weight": torch.zeros(1)})


def test_dit_13b_on_meta_matches_diffusers_default():
    with torch.device("meta"):
        ref = diffusers.HunyuanVideoTransformer3DModel()
        ours = DiT(FLAVORS["dit-13b"])
    n_ref = sum(p.numel() for p in ref.parameters())
    assert ours.num_params() == n_ref == 12_821_012_544
    assert FLAVORS["dit-13b"] == from_diffusers_config(dict(ref.config))
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    mapped = to_diffusers(our_sd)
    assert len(mapped) == len(our_sd)  # one to one
    assert set(mapped) == set(ref_sd)
    assert all(mapped[k].shape == ref_sd[k].shape for k in ref_sd)


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_flavor_config_round_trip(name):
    cfg = FLAVORS[name]
    d = to_diffusers_config(cfg)
    assert from_diffusers_config(d) == cfg
    assert (
        from_diffusers_config({**d, "_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0"}) == cfg
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("head_dim", 33),
        ("rope_axes_dim", (16, 56, 48)),
        ("rope_axes_dim", (16, 56)),
        ("num_heads", 0),
        ("num_double_blocks", -1),
        ("patch_size", 0),
        ("text_dim", 0),
        ("mlp_ratio", 0.0),
        ("rope_theta", -1.0),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(FLAVORS["dit-13b"], **{field: value})
    assert err.value.field == f"dit.{field}"


def test_unsupported_diffusers_config_raises():
    with pytest.raises(ConfigError, match="image_condition_type"):
        from_diffusers_config({"image_condition_type": "latent_concat"})
    with pytest.raises(ConfigError, match="qk_norm"):
        from_diffusers_config({"qk_norm": "layer_norm"})


class RecordingCore(torch.nn.Module):
    """Wraps a core; records the shapes and masks it sees."""

    def __init__(self, inner: torch.nn.Module, log: list):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, q, k, v, text_mask):
        self.log.append((q.shape, k.shape, v.shape, None if text_mask is None else text_mask.clone()))
        return self.inner(q, k, v, text_mask)


class ZeroCore(torch.nn.Module):
    def forward(self, q, k, v, text_mask):
        return torch.zeros_like(q)


def _tiny_model(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(FLAVORS["dit-tiny"])
    model.init_weights()
    _randomise(model, std=0.05)
    return model


def test_attention_seam():
    model, cfg = _tiny_model(), FLAVORS["dit-tiny"]
    x = _inputs(cfg, 3, 4, PADDED)
    with torch.no_grad():
        want = model(**x)
    log: list = []
    blocks = [*model.double_blocks, *model.single_blocks]
    for block in blocks:
        block.attn_core = RecordingCore(block.attn_core, log)
    with torch.no_grad():
        got = model(**x)
    assert torch.equal(got, want)
    assert len(log) == len(blocks)
    V, T = 3 * 2 * 2, len(PADDED[0])
    expected = (2, cfg.num_heads, V + T, cfg.head_dim)
    for q_shape, k_shape, v_shape, mask in log:
        assert q_shape == k_shape == v_shape == expected
        assert mask.dtype == torch.bool and mask.tolist() == [[bool(m) for m in row] for row in PADDED]
    for block in blocks:  # the core is really on the path
        block.attn_core = ZeroCore()
    with torch.no_grad():
        assert not torch.allclose(model(**x), want)


def test_meta_init_is_deterministic_and_complete():
    def build() -> DiT:
        with torch.device("meta"):
            m = DiT(FLAVORS["dit-tiny"])
        m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.fill_(float("nan"))
        torch.manual_seed(3)
        m.init_weights()
        return m

    a, b = build(), build()
    assert len(list(a.buffers())) == 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
    assert isinstance(a.double_blocks[0].attn_core, DenseAttention)
    x = _inputs(FLAVORS["dit-tiny"], 1, 4, PADDED)
    assert torch.equal(a(**x), torch.zeros(2, 16, 1, 4, 4))  # adaLN-zero: the untrained model predicts 0


def test_tiny_forward_backward_on_cpu():
    model, cfg = _tiny_model(), FLAVORS["dit-tiny"]
    x = _inputs(cfg, 3, 8, PADDED)
    start = time.perf_counter()
    out = model(**x)
    out.square().mean().backward()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"dit-tiny step took {elapsed:.2f}s"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_latent_shape_raises():
    model, cfg = _tiny_model(), FLAVORS["dit-tiny"]
    x = _inputs(cfg, 2, 5, PADDED)  # 5 is not divisible by the spatial patch 2
    with pytest.raises(ConfigError, match="latents.shape"):
        model(**x)
