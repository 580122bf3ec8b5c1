"""vidtron-sample: a checkpoint (saved by 2 processes) -> MP4 + GIF files that decode, deterministic per seed."""

from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import run_training
from vidtron.launch.sample import load_for_sampling
from vidtron.launch.sample import main as sample_main
from vidtron.platform.video_io import read_mp4


def test_sample_writes_videos(synth_data, tmp_path):
    run_training(synth_data, tmp_path / "run", "trainer.steps=3")
    args = ["--run-dir", str(tmp_path / "run"), "--prompt", "a red circle moves left", "--steps", "4", "--seed", "5"]
    assert sample_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert sample_main([*args, "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(
        load_file(tmp_path / "a" / "latents.safetensors")["latents"],
        load_file(tmp_path / "b" / "latents.safetensors")["latents"],
    )
    frames = read_mp4(tmp_path / "a" / "sample_0.mp4")
    assert frames.shape == (9, 64, 64, 3)
    gif = Image.open(tmp_path / "a" / "sample_0.gif")
    assert gif.n_frames == 9 and gif.size == (256, 256)


def test_sample_rejects_a_run_without_checkpoints(tmp_path, capsys):
    assert sample_main(["--run-dir", str(tmp_path), "--prompt", "x"]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err


def test_samples_decode_with_the_runs_causal_vae(tmp_path):
    """A run trained on causal-VAE latents (data.vae) decodes its samples with that VAE, not the stand-in."""
    from vidtron.models.vae import CausalVAE
    from vidtron.models.vae.configs import FLAVORS
    from vidtron.recipes.dit_t2v.stream import LatentEncoder

    torch.manual_seed(0)
    vae = CausalVAE(FLAVORS["vae-tiny"]).eval()
    codec = LatentEncoder(vae)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = codec(video)  # [1, 16, 2, 4, 4], scaled into the DiT's latent space
    assert z.shape == (1, 16, 2, 4, 4)
    with torch.no_grad():
        expected = vae.decode(vae.encode(video)[0])
    torch.testing.assert_close(codec.decode(z), expected, atol=1e-5, rtol=1e-5)


def test_patch_size_override_trains_and_samples(synth_data, tmp_path):
    """model.patch_size=1 (a token per latent pixel) reaches the model the trainer builds and the one vidtron-sample
    rebuilds from the manifest."""
    from vidtron.launch.train import main as train_main

    args = [f"data.root={synth_data}", f"run_dir={tmp_path / 'run'}", "metrics.wandb=false", "trainer.steps=2"]
    assert train_main([*args, "model.patch_size=1"]) == 0
    model, _ = load_for_sampling(tmp_path / "run" / "checkpoints" / "step_000002")  # strict load of the weights
    assert model.patch_embed.kernel_size == (1, 1, 1)
    args = ["--run-dir", str(tmp_path / "run"), "--prompt", "a red circle moves left", "--steps", "2"]
    assert sample_main([*args, "--out", str(tmp_path / "s")]) == 0
    assert load_file(tmp_path / "s" / "latents.safetensors")["latents"].shape == (1, 16, 3, 8, 8)
