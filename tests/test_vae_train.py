"""`vidtron-train recipe=vae`: the GAN's two optimizers train through the shared trainer and resume exactly."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import _synth
from tests.helpers import full_params
from vidtron.platform.compose import compose_config
from vidtron.platform.distributed import init_distributed
from vidtron.platform.trainer import train
from vidtron.recipes.vae.task import VAETask

COMMON = ["recipe=vae", "data.frames=17", "trainer.steps=6", "vae.disc_start=2", "metrics.wandb=false", "seed=4"]
STAGES = "vae.stages=[{until_step:100,frames:5,height:32,width:32}]"


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("vae") / "clips", clips=8, frames=17, size=32)


def _run(data, run_dir, *extra):
    cfg = compose_config([f"data.root={data}", f"run_dir={run_dir}", *COMMON, STAGES, *extra])
    return train(cfg, VAETask.from_train_config(cfg), init_distributed())


def test_vae_recipe_resumes_exactly_with_its_discriminator(long_clips, tmp_path):
    """3 steps + restart + 3 steps == 6 steps, bitwise, with the discriminator active from step 3."""
    whole = _run(long_clips, tmp_path / "whole")
    _run(long_clips, tmp_path / "split", "trainer.stop_after_steps=3")
    second = _run(long_clips, tmp_path / "split")
    assert len(second.losses) == 3 and second.losses == whole.losses[3:]
    a, b = full_params(whole.model), full_params(second.model)
    assert any(k.startswith("disc.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
