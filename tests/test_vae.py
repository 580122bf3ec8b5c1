"""Causal 3D VAE: parity with diffusers' AutoencoderKLHunyuanVideo, causality, tiling, input checks.

Tolerances: parity is fp32 on CPU with equivalent but differently ordered ops (F.pad + Conv3d, GroupNorm on a 5-D
vs a transposed view, a boolean vs an additive -inf attention mask), ~1e-7 relative per op over ~30 layers;
measured <= 7e-6 absolute on outputs of magnitude ~1, so 1e-5 (atol and rtol).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidtron.errors import ConfigError
from vidtron.models.vae import FLAVORS, CausalVAE, VAEConfig
from vidtron.models.vae.blocks import CausalConv3d
from vidtron.models.vae.configs import from_diffusers_config, to_diffusers_config
from vidtron.models.vae.model import kl_divergence
from vidtron.models.vae.state_dict_adapter import from_diffusers, to_diffusers
from vidtron.models.vae.tiling import maybe_tiled_decode, seam_error, tiled_decode, tiled_encode, use_tiling

diffusers = pytest.importorskip("diffusers")
TINY = FLAVORS["vae-tiny"]
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed_diffusers_vae(seed: int = 0):
    """diffusers' tiny VAE with every parameter (norm weights and biases too) moved off its init."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLHunyuanVideo(**to_diffusers_config(TINY)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def pair():
    """(ours, diffusers) with the same perturbed weights, ours loaded through `from_diffusers`."""
    ref = _perturbed_diffusers_vae()
    ours = CausalVAE(TINY).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    return ours, ref


def _waves(shape: tuple[int, ...], seed: int = 0, periods: tuple[float, ...] = (12.0, 20.0)) -> torch.Tensor:
    """A smooth, moving test pattern in [-1, 1]: a few plane waves per channel drifting over time."""
    g = torch.Generator().manual_seed(seed)
    b, c, frames, h, w = shape
    t = torch.arange(frames).view(frames, 1, 1).float()
    y, x = torch.arange(h).view(1, h, 1).float(), torch.arange(w).view(1, 1, w).float()
    out = torch.zeros(shape)
    for ch in range(c):
        for period in periods:
            angle, phase = (torch.rand(2, generator=g) * 2 * math.pi).tolist()
            out[:, ch] += torch.sin(
                2 * math.pi * (y * math.cos(angle) + x * math.sin(angle)) / period + phase + 0.3 * t
            )
    return out / out.abs().max()


# ---- 1, 2: parity with diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [5, 1])
def test_encode_decode_match_diffusers(pair, frames):
    ours, ref = pair
    video = torch.rand(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
        assert mean.shape == (1, 16, (frames - 1) // 4 + 1, 4, 4)
        torch.testing.assert_close(mean, dist.mean, **TOL)
        torch.testing.assert_close(logvar, dist.logvar, **TOL)
        torch.testing.assert_close(ours.decode(mean), ref.decode(dist.mean).sample, **TOL)


def test_to_diffusers_loads_strict_and_matches():
    torch.manual_seed(1)
    ours = CausalVAE(TINY).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = diffusers.AutoencoderKLHunyuanVideo(**to_diffusers_config(TINY)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    assert from_diffusers(to_diffusers(ours.state_dict())).keys() == ours.state_dict().keys()
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    with torch.no_grad():  # also pins the posterior sampling convention (same generator -> same noise)
        recon, _, _ = ours(video, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        expected = ref(video, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
    torch.testing.assert_close(recon, expected, **TOL)


def test_default_flavor_matches_diffusers_default_exactly():
    cfg = FLAVORS["vae-884-16c"]
    with torch.device("meta"):
        ours, ref = CausalVAE(cfg), diffusers.AutoencoderKLHunyuanVideo()
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 246_478_803
    mapped = {k: v.shape for k, v in to_diffusers(ours.state_dict()).items()}
    assert mapped == {k: v.shape for k, v in ref.state_dict().items()}
    assert from_diffusers_config(dict(ref.config)) == cfg
    assert to_diffusers_config(cfg) == {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(ref.config).items() if not k.startswith("_")
    }


# ---- 3: causality ------------------------------------------------------------------------------------------------


class _PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame instead of over (F, H, W): the model's only non-causal op, removed."""

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        b, c, frames, h, w = x_BCFHW.shape
        y = super().forward(x_BCFHW.transpose(1, 2).reshape(b * frames, c, h, w))
        return y.reshape(b, frames, c, h, w).transpose(1, 2)


def test_causality(pair):
    """Frame t never reaches latents / outputs of earlier frames through convs, resamplers or attention.

    GroupNorm (HunyuanVideo's, and diffusers') takes its statistics over all frames, so in the stock model later
    frames shift earlier latents slightly; the test checks that this is the only leak by making the norms
    per-frame, and records the leak's size. (Images are 1-frame videos, so image latents never see a video.)"""
    stock = pair[0]
    causal = CausalVAE(TINY).eval()
    causal.load_state_dict(stock.state_dict())
    for m in causal.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = _PerFrameGroupNorm
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        mean = causal.encode(video)[0]
        torch.testing.assert_close(mean[:, :, :1], causal.encode(video[:, :, :1])[0], **TOL)  # other shape: rounding
        for t in (0, 4):  # latent j covers frames 4j-3 .. 4j: latents 0 .. t/4 must ignore frames > t
            changed = video.clone()
            changed[:, :, t + 1 :] = torch.rand(changed[:, :, t + 1 :].shape, generator=g) * 2 - 1
            torch.testing.assert_close(
                causal.encode(changed)[0][:, :, : t // 4 + 1], mean[:, :, : t // 4 + 1], atol=1e-6, rtol=0
            )
            leak = (stock.encode(changed)[0] - stock.encode(video)[0])[:, :, : t // 4 + 1].abs().max()
            assert leak > 1e-3  # the stock model's GroupNorm leak is real (measured ~0.05 on latents of ~1)
        z = torch.randn(1, 16, 3, 2, 2, generator=g)
        out = causal.decode(z)
        z_changed = z.clone()
        z_changed[:, :, 2:] = torch.randn(1, 16, 1, 2, 2, generator=g)
        torch.testing.assert_close(causal.decode(z_changed)[:, :, :5], out[:, :, :5], atol=1e-6, rtol=0)


def test_forward_kl_and_scaling(pair):
    vae = pair[0]
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    recon, mean, logvar = vae(video, generator=torch.Generator().manual_seed(0))
    assert recon.shape == video.shape and mean.shape == logvar.shape == vae.latent_shape(video.shape)
    kl = kl_divergence(mean, logvar)
    assert kl.shape == (2,) and bool((kl >= 0).all())
    (recon.abs().mean() + 1e-6 * kl.mean()).backward()
    assert vae.encoder.conv_in.weight.grad is not None
    vae.zero_grad(set_to_none=True)
    torch.testing.assert_close(vae.from_dit_latents(vae.to_dit_latents(mean)), mean)
    assert vae.to_dit_latents(torch.ones(1)).item() == pytest.approx(0.476986)


def test_gradient_checkpointing_same_grads(pair):
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    grads = []
    for recompute in (False, True):
        vae = CausalVAE(dataclasses.replace(TINY, gradient_checkpointing=recompute))
        vae.load_state_dict(pair[0].state_dict())
        recon, _, _ = vae(video, sample_posterior=False)
        recon.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ---- 4: tiling ---------------------------------------------------------------------------------------------------


class _StubVAE(nn.Module):
    """A stand-in with CausalVAE's shapes and causal frame grouping but a known receptive field: one causal conv
    (kernel `kernel`) in latent space, nearest resampling around it; `per_tile_norm` subtracts the mean over the
    whole input (like GroupNorm), so every tile gets its own offset."""

    check_video = CausalVAE.check_video
    check_latents = CausalVAE.check_latents

    def __init__(self, kernel: tuple[int, int, int], per_tile_norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.config, self.per_tile_norm = TINY, per_tile_norm
        self.enc, self.dec = CausalConv3d(3, 32, kernel), CausalConv3d(16, 3, kernel)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=(2, 3, 4), keepdim=True) if self.per_tile_norm else x

    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        b, c, frames, h, w = video.shape
        groups = video[:, :, 1:].reshape(b, c, (frames - 1) // 4, 4, h, w).mean(3)  # latent j: frames 4j-3 .. 4j
        pooled = F.avg_pool3d(torch.cat([video[:, :, :1], groups], 2), (1, 8, 8))  # [B, 3, f, h, w]
        return self._norm(self.enc(pooled))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self._norm(self.dec(z)).repeat_interleave(8, 3).repeat_interleave(8, 4)  # [B, 3, f, H, W]
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, 2)], 2)


@pytest.mark.parametrize(
    "kernel, overlap, blends",
    [((1, 1, 1), 0.25, (True, False)), ((2, 3, 3), 0.5, (False,))],
    ids=["pointwise", "receptive-field-1"],
)
def test_tiling_exact_when_overlap_covers_receptive_field(kernel, overlap, blends):
    """Index arithmetic (tile starts, dropped first frames, crops) is exact: with a pointwise model any layout
    reproduces the untiled result; with receptive field r = 1 latent (space, and one latent back in time) a
    middle-cut overlap of 2 latents keeps only positions whose receptive field lies inside their tile."""
    vae = _StubVAE(kernel)
    video = _waves((1, 3, 33, 72, 48))  # 3 clips x 3 x 2 tiles; last tiles shorter
    with torch.no_grad():
        moments = vae.encode_moments(video)
        recon = vae.decode(moments[:, :16])
        for blend in blends:
            spec = dict(tile_size=32, tile_frames=17, overlap=overlap, blend=blend)
            torch.testing.assert_close(torch.cat(tiled_encode(vae, video, **spec), 1), moments, atol=1e-6, rtol=0)
            torch.testing.assert_close(tiled_decode(vae, moments[:, :16], **spec), recon, atol=1e-6, rtol=0)


def test_ramp_blend_reduces_seam_error():
    """Per-tile statistics (GroupNorm's failure mode under tiling) give each tile its own offset: a hard step at a
    crop seam, a ramp of e steps when blended. Measured blended / cropped seam error: encode 0.25 (4-latent
    ramps), decode 0.03 (32-pixel ramps)."""
    vae = _StubVAE((1, 1, 1), per_tile_norm=True)
    video = _waves((1, 3, 5, 128, 128), periods=(160.0, 240.0))
    with torch.no_grad():
        moments = vae.encode_moments(video)
        z = moments[:, :16]
        out = vae.decode(z)
        spec = dict(tile_size=64, overlap=0.5)
        enc = [seam_error(torch.cat(tiled_encode(vae, video, **spec, blend=b), 1), moments) for b in (True, False)]
        dec = [seam_error(tiled_decode(vae, z, **spec, blend=b), out) for b in (True, False)]
    assert enc[0] < 0.4 * enc[1] and dec[0] < 0.2 * dec[1], (enc, dec)


def test_tiling_matches_diffusers_tiling(pair):
    """Same layout and ramp arithmetic as diffusers' tiled paths, on shapes where its layout has no tile lying
    inside its neighbour and at most one tiled spatial axis (diffusers re-blends corners; we blend separably)."""
    ours, ref = pair
    ref.enable_tiling(32, 32, 16, 24, 24, 12)
    z = torch.randn(1, 16, 7, 8, 3, generator=torch.Generator().manual_seed(0))  # 2 clips x 3 tiles along H
    with torch.no_grad():
        torch.testing.assert_close(tiled_decode(ours, z, tile_size=32, tile_frames=17), ref.decode(z).sample, **TOL)
        ref.enable_tiling(64, 64, 16, 48, 48, 12)
        video = _waves((1, 3, 25, 128, 16))  # 2 clips x 3 tiles along H (2-latent ramps)
        mean, logvar = tiled_encode(ours, video, tile_size=64, tile_frames=17)
        dist = ref.encode(video).latent_dist
    torch.testing.assert_close(mean, dist.mean, **TOL)
    torch.testing.assert_close(logvar, dist.logvar, **TOL)


def test_real_vae_tiled_close_to_untiled(pair):
    """Tiled never equals untiled in the real model: GroupNorm statistics and the mid-block attention span the
    whole input, so no overlap covers the receptive field. One tile covering everything is exact. A random
    full-strength tiny VAE amplifies per-tile statistics into O(1) errors everywhere (measured mean |err| ~ mean
    |ref|), so the bounds use the same weights with residual branches at zero (a quiet init).

    Measured, seed 0 (range over 6 seeds), mean |err| / mean |ref|: spatial tiles encode 0.042 (0.025-0.11),
    decode 0.058 (0.004-0.061); temporal clips only encode 0.11, decode 0.022. Decode seam error blended /
    cropped 0.48 (0.40-0.65). Encode seams are not asserted: with 2-3 latents of overlap the ramp weights
    tile-edge latents, and edge error outweighs the per-tile offset it removes (ratio 0.55-0.97)."""
    video = _waves((1, 3, 9, 64, 64))
    torch.manual_seed(0)
    vae = CausalVAE(TINY).eval()
    with torch.no_grad():
        whole = tiled_encode(pair[0], video, tile_size=64, tile_frames=9)[0]
        torch.testing.assert_close(whole, pair[0].encode(video)[0], atol=0, rtol=0)
        for name, p in vae.named_parameters():
            if ".conv2." in name or ".attn.to_out." in name:
                p.zero_()
        mean = vae.encode(video)[0]
        out = vae.decode(mean)
        spatial = dict(tile_size=48, tile_frames=9, overlap=0.5)
        temporal = dict(tile_size=64, tile_frames=5)
        for spec, enc_bound, dec_bound in ((spatial, 0.1, 0.1), (temporal, 0.15, 0.05)):
            tiled_mean = tiled_encode(vae, video, **spec)[0]
            assert (tiled_mean - mean).abs().mean() < enc_bound * mean.abs().mean(), spec
            tiled_out = tiled_decode(vae, mean, **spec)
            assert (tiled_out - out).abs().mean() < dec_bound * out.abs().mean(), spec
        cropped = tiled_decode(vae, mean, **spatial, blend=False)
        blended = tiled_decode(vae, mean, **spatial)
    assert seam_error(blended, out) < 0.7 * seam_error(cropped, out)


def test_random_tiling_switch(pair):
    draws = [use_tiling(0.3, torch.Generator().manual_seed(s)) for s in range(200)]
    assert 0.2 < sum(draws) / len(draws) < 0.4
    assert not use_tiling(0.0) and use_tiling(1.0)
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(maybe_tiled_decode(pair[0], z, 0.0), pair[0].decode(z))
    with pytest.raises(ConfigError, match="tiling probability"):
        use_tiling(1.5)


# ---- 5: bad inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, field",
    [
        ((1, 3, 4, 32, 32), "frames"),
        ((1, 3, 5, 36, 32), "height"),
        ((1, 3, 5, 32, 20), "width"),
        ((1, 4, 5, 32, 32), "channels"),
        ((3, 5, 32, 32), "video.shape"),
    ],
)
def test_bad_video_shapes_raise(pair, shape, field):
    with pytest.raises(ConfigError, match=field):
        pair[0].encode(torch.zeros(shape))


def test_bad_latents_and_tiles_raise(pair):
    vae = pair[0]
    with pytest.raises(ConfigError, match="latent channels"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))
    video = torch.zeros(1, 3, 5, 32, 32)
    with pytest.raises(ConfigError, match="tile_size"):
        tiled_encode(vae, video, tile_size=30)
    with pytest.raises(ConfigError, match="tile_frames"):
        tiled_encode(vae, video, tile_frames=8)
    with pytest.raises(ConfigError, match="overlap"):
        tiled_decode(vae, torch.zeros(1, 16, 2, 4, 4), overlap=0.75)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(norm_num_groups=3), "norm_num_groups"),
        (dict(block_out_channels=(8, 8)), "block_out_channels"),
        (dict(temporal_compression_ratio=8), "temporal_compression_ratio"),
        (dict(spatial_compression_ratio=6), "spatial_compression_ratio"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(latent_channels=0), "latent_channels"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        VAEConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown keys"):
        from_diffusers_config({"latent_channels": 16, "shift_factor": 0.1})
