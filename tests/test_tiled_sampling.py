"""VAE tiling in vidtron-sample's decode and vidtron-data encode (--tile auto|on|off, --tile-size/-frames/-overlap).

Exactness goes through each command's own function (`decode_latents` for sampling, `video_encoder` built from the
`vidtron-data encode` arguments) with tests/test_vae.py's stub VAE of known receptive field: pointwise, any layout
(ramp-blended) reproduces the untiled result; with receptive field 1 latent, a middle-cut overlap of 2 latents does
(tolerance 1e-6: the same convolutions on cropped inputs). The real tiny causal VAE (quiet init, as in
tests/test_vae.py) is only close: GroupNorm statistics differ per tile; its measured errors are asserted loosely.
`auto` tiles a clip larger than one tile and leaves a clip that fits alone; the stand-in autoencoder never tiles.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vidtron.launch.encode as encode_mod
from tests.test_vae import TINY, _StubVAE, _waves
from vidtron.errors import ConfigError
from vidtron.launch.encode import VAETiling, add_encode_parser, run_encode, video_encoder
from vidtron.launch.sample import decode_latents
from vidtron.models.vae import CausalVAE
from vidtron.models.vae.configs import to_diffusers_config
from vidtron.recipes.dit_t2v.stream import LatentEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _StubCausalVAE(CausalVAE):
    """tests/test_vae.py's stub VAE dressed as a CausalVAE (what the commands tile)."""

    def __init__(self, kernel: tuple[int, int, int]):
        nn.Module.__init__(self)
        stub = _StubVAE(kernel)
        self.config, self.per_tile_norm, self.enc, self.dec = TINY, False, stub.enc, stub.dec

    _norm = _StubVAE._norm
    encode_moments = _StubVAE.encode_moments
    decode = _StubVAE.decode


def _encode_args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_encode_parser(p.add_subparsers(dest="cmd"))
    return p.parse_args(["encode", "--root", "unused", "--out", "unused", "--vae", "stub", *extra])


@pytest.fixture
def stub_vae(monkeypatch):
    """Make the commands load `vae` whenever a VAE folder is named."""
    holder, real = {}, encode_mod.build_latent_encoder

    def fake_build(root, vae=""):
        return LatentEncoder(holder["vae"]) if vae else real(root, vae)

    monkeypatch.setattr(encode_mod, "build_latent_encoder", fake_build)
    return holder


CASES = [((1, 1, 1), 0.25, True), ((2, 3, 3), 0.5, False)]


@pytest.mark.parametrize("kernel, overlap, blend", CASES, ids=["pointwise", "receptive-field-1"])
def test_tiled_equals_untiled_through_both_commands(stub_vae, kernel, overlap, blend):
    stub_vae["vae"] = _StubCausalVAE(kernel)
    video = _waves((1, 3, 33, 72, 48))  # 3 clips x 3 x 2 tiles of 32 px / 17 frames; last tiles shorter
    spec = ["--tile-size", "32", "--tile-frames", "17", "--tile-overlap", str(overlap)]
    spec += [] if blend else ["--no-tile-blend"]
    tiled_enc, plain_enc = (
        video_encoder(_encode_args("--tile", "on", *spec)),
        video_encoder(_encode_args("--tile", "off")),
    )
    z_tiled, z = tiled_enc(video), plain_enc(video)
    assert tiled_enc.tiled_calls == 1 and plain_enc.tiled_calls == 0
    assert (z_tiled - z).abs().max().item() <= 1e-6
    cfg = {"data": {"root": "unused", "vae": "stub"}}
    tiling = VAETiling("on", 32, 17, overlap, blend)
    err = (decode_latents(z, cfg, tiling=tiling) - decode_latents(z, cfg, tiling=VAETiling("off"))).abs().max()
    assert err.item() <= 1e-6


def test_auto_tiles_only_clips_larger_than_a_tile(stub_vae):
    stub_vae["vae"] = _StubCausalVAE((1, 1, 1))
    video = _waves((1, 3, 9, 64, 64))
    small = video_encoder(_encode_args("--tile-size", "64", "--tile-frames", "9"))  # --tile auto is the default
    large = video_encoder(_encode_args("--tile-size", "32", "--tile-frames", "9"))
    small(video), large(video)
    assert small.tiled_calls == 0 and large.tiled_calls == 1
    z = small(video)
    cfg = {"data": {"root": "unused", "vae": "stub"}}
    calls = []
    real = encode_mod.tiled_decode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encode_mod, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
        decode_latents(z, cfg)  # default auto, 256 px / 17 frames: 9x64x64 fits in one tile
        decode_latents(z, cfg, tiling=VAETiling(tile_size=32, tile_frames=9))
    assert calls == [1]


def test_real_tiny_vae_tiled_close_to_untiled(tmp_path, synth_data):
    """The real causal VAE through a VAE folder and `vidtron-data encode` end to end (auto tiles the 9x64x64
    clips at 32 px), and sampling's decode. Measured mean |err| / mean |ref| with 48 px tiles, overlap 0.5:
    encode 0.042, decode 0.058 (tests/test_vae.py's numbers for the same quiet tiny VAE)."""
    torch.manual_seed(0)
    vae = CausalVAE(TINY).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".conv2." in name or ".attn.to_out." in name:
                p.zero_()
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(TINY)))
    save_file(vae.state_dict(), str(folder / "model.safetensors"))
    video = _waves((1, 3, 9, 64, 64))
    z = encode_mod.TiledLatentEncoder(vae, VAETiling("off"))(video)
    tiled = encode_mod.TiledLatentEncoder(vae, VAETiling("on", 48, 9, 0.5))
    rel_enc = ((tiled(video) - z).abs().mean() / z.abs().mean()).item()
    cfg = {"data": {"root": "unused", "vae": str(folder)}}
    out, out_tiled = decode_latents(z, cfg, tiling=VAETiling("off")), decode_latents(z, cfg, tiling=tiled.tiling)
    rel_dec = ((out_tiled - out).abs().mean() / out.abs().mean()).item()
    print(f"real tiny VAE, 48 px tiles, overlap 0.5: encode rel err {rel_enc:.4f}, decode rel err {rel_dec:.4f}")
    assert 0 < rel_enc < 0.1 and 0 < rel_dec < 0.1

    calls = []
    real = encode_mod.tiled_encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encode_mod, "tiled_encode", lambda *a, **k: calls.append(1) or real(*a, **k))
        args = _encode_args("--tile-size", "32", "--tile-frames", "9", "--shard-size", "64")
        args.root, args.out, args.vae = str(synth_data), str(tmp_path / "latents"), str(folder)
        assert "wrote" in run_encode(args)
    assert len(calls) > 0  # every 64x64 clip went through 32 px tiles


def test_stand_in_autoencoder_is_never_tiled_and_on_is_refused(synth_data, stub_vae):
    args = _encode_args("--tile", "on")
    args.root, args.vae = str(synth_data), ""
    with pytest.raises(ConfigError, match="--tile='on': the stand-in autoencoder"):
        video_encoder(args)
    args.tile = "auto"
    enc = video_encoder(args)
    enc(_waves((1, 3, 9, 64, 64)) * 0.5)
    assert enc.tiled_calls == 0 and enc.vae is None
    stub_vae["vae"] = _StubCausalVAE((1, 1, 1))
    with pytest.raises(ConfigError, match="tile_frames=8"):
        video_encoder(_encode_args("--tile-frames", "8"))
    with pytest.raises(ConfigError, match="--tile='sometimes'"):
        VAETiling("sometimes")
