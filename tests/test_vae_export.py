"""A trained `recipe=vae` checkpoint -> a diffusers VAE folder -> latent shards -> DiT training on them.

Checks: `vidtron-export --format diffusers` finds the VAE in a recipe=vae checkpoint and writes only it (the
discriminator and the optimizers stay behind), with diffusers' names and an `AutoencoderKLHunyuanVideo` config.json;
`from_pretrained` of the folder (whole or sharded) encodes like our trained model: posterior means within 1e-5
absolute (fp32, the same operations in the same order; observed differences are a few ulps on means of ~0.1-1);
`vidtron-data encode --vae FOLDER` writes latent shards that hold our trained model's scaled means (1e-5, as above)
and that a DiT trains on (`data.format=latent`); a DiT-only format
fails with one line naming the formats a VAE has.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import _synth
from tests.helpers import run_training
from vidtron.launch.data import main as data_main
from vidtron.launch.export import main as export_main
from vidtron.models.vae.configs import from_diffusers_config
from vidtron.models.vae.state_dict_adapter import to_diffusers
from vidtron.platform.config import BucketConfig, DataConfig
from vidtron.platform.data.index import LATENT_EXT, SampleIndex
from vidtron.platform.data.latents import load_latent_sample, to_model_input
from vidtron.platform.data.loader import BucketLoader
from vidtron.platform.distributed import init_distributed
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.stream import load_causal_vae
from vidtron.recipes.registry import compose_config, get_recipe

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("vae_export") / "clips", clips=8, frames=17, size=32)


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    """3 steps of recipe=vae (the critic trains from step 2); (its checkpoint, the trained VAE)."""
    run_dir = tmp_path_factory.mktemp("vae_run")
    overrides = [
        "recipe=vae",
        f"data.root={clips}",
        f"run_dir={run_dir}",
        "data.batch_size=2",
        "trainer.steps=3",
        "trainer.progress=false",
        "metrics.wandb=false",
        "vae.disc_start=1",
        "vae.disc_channels=8",
        "vae.stages=[{until_step:100,frames:5,height:32,width:32}]",
    ]
    cfg = compose_config(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS off
        state = train(cfg, get_recipe("vae").make_task(cfg), init_distributed())
    ckpt = run_dir / "checkpoints" / "step_000003"
    assert (ckpt / "manifest.json").exists()
    return ckpt, state.model.vae.eval()


def _export(ckpt, fmt: str, out, *extra: str) -> int:
    return export_main(["--ckpt", str(ckpt), "--format", fmt, "--out", str(out), *extra])


def _video() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1  # [B, C, F, H, W]


def test_vae_checkpoint_exports_to_diffusers_and_encodes_like_ours(trained, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ckpt, vae = trained
    assert _export(ckpt, "diffusers", tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLHunyuanVideo" and from_diffusers_config(config) == vae.config
    got = load_file(tmp_path / "hf" / "diffusion_pytorch_model.safetensors")
    want = to_diffusers(vae.state_dict())  # the VAE alone: no `disc.*`, no optimizer state
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    video = _video()
    with torch.no_grad():
        ours, _ = vae.encode(video)
        for folder in (tmp_path / "hf", _sharded(ckpt, tmp_path / "hf_sharded")):
            ref = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(folder).eval()
            theirs = ref.encode(video).latent_dist.mean
            assert ours.abs().max() > 0.05 and (ours - theirs).abs().max().item() <= TOL
    theirs_loaded = load_causal_vae(tmp_path / "hf")  # what `vidtron-data encode --vae` loads
    assert all(torch.equal(theirs_loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def _sharded(ckpt, out):
    assert _export(ckpt, "diffusers", out, "--max-shard-size", "300KB") == 0  # vae-tiny: ~0.85 MB in fp32
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    return out


def test_vae_safetensors_export_keeps_our_names(trained, tmp_path):
    ckpt, vae = trained
    assert _export(ckpt, "safetensors", tmp_path / "ours", "--dtype", "bfloat16") == 0
    got = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(got) == set(vae.state_dict())
    assert all(torch.equal(got[k], v.bfloat16()) for k, v in vae.state_dict().items())
    loaded = load_causal_vae(tmp_path / "ours").state_dict()  # `vidtron-data encode --vae` takes our names too
    assert all(torch.equal(loaded[k], v.bfloat16().float()) for k, v in vae.state_dict().items())


def test_exported_vae_encodes_latent_shards_a_dit_trains_on(trained, clips, tmp_path):
    ckpt, vae = trained
    assert _export(ckpt, "diffusers", tmp_path / "vae") == 0
    args = ["encode", "--root", str(clips), "--out", str(tmp_path / "lat"), "--buckets", "9x32x32"]
    assert data_main([*args, "--vae", str(tmp_path / "vae")]) == 0
    lat = SampleIndex(tmp_path / "lat", (LATENT_EXT,))
    assert len(lat) == 8
    # the cached latents are our trained VAE's posterior means (x scaling_factor) of the clips format=video reads
    loader = BucketLoader(DataConfig(root=str(clips), format="video", buckets=[BucketConfig(9, 32, 32, 2)]), seed=0)
    lb = loader.local_batch(0, 0, 1)
    pixels, by_key = to_model_input(loader.pixels(lb)), {e.key: e for e in lat.entries}
    for row, item in enumerate(lb.items):
        cached = load_latent_sample(lat.read(by_key[loader.index.entries[item.sample].key]))["latents"]
        with torch.no_grad():  # one clip at a time, as the encoder does (a batch of 2 convolves in another order)
            mean, _ = vae.encode(pixels[row : row + 1])
        assert cached.shape == (vae.config.latent_channels, 3, 4, 4)
        torch.testing.assert_close(cached, vae.to_dit_latents(mean[0]), rtol=0, atol=TOL)
    bucket = "data.buckets=[{frames:9,height:32,width:32,max_batch:2}]"
    state = run_training(tmp_path / "lat", tmp_path / "dit", "data.format=latent", bucket, "trainer.steps=2")
    assert len(state.losses) == 2 and all(math.isfinite(x) for x in state.losses)


def test_dit_only_format_on_a_vae_checkpoint_is_one_line(trained, tmp_path, capsys):
    ckpt, _ = trained
    assert _export(ckpt, "hunyuan", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vidtron-export: error: --format='hunyuan'")
    assert "causal VAE" in err and "diffusers" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
