"""Generated data, shards, the global sampler, the stand-in autoencoder and the byte text encoder."""

from __future__ import annotations

import hashlib

import pytest
import torch

from vidtron.errors import ConfigError
from vidtron.launch.data import main as data_main
from vidtron.models.text import ByteTextEncoder
from vidtron.models.vae.patch_pca import PatchPCAAutoencoder
from vidtron.platform.data.sampler import GlobalSampler
from vidtron.platform.data.shards import read_clips
from vidtron.platform.data.synth import COLOURS, DIRECTIONS, SHAPES, clip_spec, render_clip
from vidtron.recipes.dit_t2v.data import load_autoencoder, videos_to_tensor


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_synth_is_deterministic_per_seed(tmp_path):
    args = ["--clips", "6", "--frames", "5", "--height", "32", "--width", "48", "--shard-size", "4"]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert data_main(["synth", "--out", str(tmp_path / name), "--seed", str(seed), *args]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    clips = read_clips(tmp_path / "a")
    assert len(clips) == 6 and clips[0].video.shape == (5, 32, 48, 3)


def test_captions_say_what_moves_where():
    for i in range(20):
        spec = clip_spec(0, i)
        words = spec.caption.split()
        assert spec.colour in COLOURS and spec.colour in words and spec.shape in words and spec.direction in words
        video = render_clip(spec, 9, 64, 64)
        mask = (video == torch.tensor(COLOURS[spec.colour], dtype=torch.uint8).numpy()).all(-1)  # [F, H, W]
        ys, xs = [], []
        for f in (0, 8):
            yy, xx = mask[f].nonzero()
            ys.append(yy.mean())
            xs.append(xx.mean())
        dy, dx = DIRECTIONS[spec.direction]
        assert (ys[1] - ys[0]) * dy >= 0 and (xs[1] - xs[0]) * dx >= 0  # the shape moves the stated way
        assert abs(ys[1] - ys[0]) + abs(xs[1] - xs[0]) > 10
    assert {clip_spec(0, i).shape for i in range(40)} == set(SHAPES)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_stream_is_layout_independent(dp):
    sampler = GlobalSampler(num_samples=10, seed=3)
    whole = sampler.global_indices(0, 24)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))  # epochs are permutations
    seen = []
    for cursor in range(0, 24, 4):
        batch = sampler.global_indices(cursor, 4)
        seen += [i for r in range(dp) for i in batch[GlobalSampler.local_slice(4, r, dp)]]
    assert seen == whole
    with pytest.raises(ConfigError, match="data.batch_size"):
        GlobalSampler.local_slice(6, 0, 4)


def test_patch_pca_autoencoder_shapes_and_reconstruction(synth_data):
    ae = load_autoencoder(synth_data)
    x = videos_to_tensor([c.video for c in read_clips(synth_data)[:4]])  # [4, 3, 9, 64, 64]
    z = ae.encode(x)
    assert z.shape == (4, 16, 3, 8, 8)
    assert abs(float(z.std()) - 1.0) < 0.2  # unit-variance latents
    mse = float(((ae.decode(z) - x) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(4.0 / mse)) > 20  # > 20 dB PSNR on its own data
    first_only = ae.encode(x[:, :, :1])
    torch.testing.assert_close(first_only[:, :, 0], z[:, :, 0])  # the first frame is encoded alone (causal)
    with pytest.raises(ConfigError, match="frames"):
        PatchPCAAutoencoder().encode(torch.zeros(1, 3, 4, 16, 16))


def test_patch_pca_channels_round_trip_through_its_state(synth_data):
    """`vidtron-data synth --latent-channels C`: a C-channel code, read back as C channels from the saved state."""
    x = videos_to_tensor([c.video for c in read_clips(synth_data)[:8]])
    ae = PatchPCAAutoencoder(32).fit(x)
    again = PatchPCAAutoencoder.from_state_dict(ae.state_dict())
    assert again.channels == 32 and again.encode(x).shape == (8, 32, 3, 8, 8)
    torch.testing.assert_close(again.encode(x), ae.encode(x))
    with pytest.raises(ConfigError, match="latent channels=0"):
        PatchPCAAutoencoder(0)
    with pytest.raises(ConfigError, match="first_basis"):
        PatchPCAAutoencoder.from_state_dict({})


def test_byte_text_encoder_is_deterministic_and_masked():
    enc = ByteTextEncoder(dim=64, pooled_dim=32, max_tokens=16)
    again = ByteTextEncoder(dim=64, pooled_dim=32, max_tokens=16)
    a = enc.encode(["a red circle moves left", ""])
    b = again.encode(["a red circle moves left", ""])
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled)
    assert a.states.shape == (2, 16, 64) and a.pooled.shape == (2, 32)
    assert a.mask[0].sum() == 16 and a.mask[1].sum() == 1  # truncated caption; empty caption keeps BOS
    assert torch.all(a.states[1, 1:] == 0)
    c = enc.encode(["a blue circle moves left"])
    assert not torch.allclose(a.pooled[0], c.pooled[0])  # the caption changes the conditioning
