"""The recipe registry and the task contract: a new recipe is one folder, and every recipe gets the shared update.

- A toy recipe written into a temporary folder (its own config dataclass, yaml, task and registration), found through
  VIDTRON_RECIPE_PATH, trains 3 steps through `vidtron-train recipe=toy` and checkpoints, with nothing in vidtron/
  changed for it; its own config keys are typed and validated like the built-in ones.
- A knob a recipe does not honour is refused with one line, never ignored.
- The VAE's two optimizers run through the trainer's update path: trainer.precision=bf16 autocasts its forward and
  faults.nan_at_step skips both updates (and the trainer counts the step as skipped).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vidtron.errors import ConfigError
from vidtron.platform.distributed import init_distributed
from vidtron.platform.metrics import read_metrics
from vidtron.platform.trainer import Trainer
from vidtron.recipes.registry import BUILTIN, PATH_ENV, compose_config, get_recipe

TOY_FILES = {
    "__init__.py": "",
    "config.py": """
        from dataclasses import dataclass, field

        from vidtron.errors import ConfigError
        from vidtron.platform.config import TrainConfig


        @dataclass
        class ToySection:
            width: int = 4  # features of the toy regression
            noise: float = 0.0  # label noise

            def __post_init__(self):
                if self.width < 1:
                    raise ConfigError("toy.width", self.width, "must be >= 1")


        @dataclass
        class ToyTrainConfig(TrainConfig):
            toy: ToySection = field(default_factory=ToySection)
        """,
    "toy.yaml": """
        recipe: toy
        toy:
          width: 3
        data:
          batch_size: 4
        optim:
          warmup_steps: 0
        """,
    "task.py": '''
        import torch

        from vidtron.platform.task import Phase


        class ToyTask:
            """Linear regression y = x . w* on seeded draws: the smallest thing that trains."""

            def __init__(self, cfg):
                self.cfg, self.tokens_per_sample = cfg, 1

            def build_model(self):
                torch.manual_seed(self.cfg.seed)
                return torch.nn.Linear(self.cfg.toy.width, 1)

            def validate_layout(self, dims):
                pass

            def parallelize(self, model, dims, opts):
                return model

            def local_batch(self, step, cursor, dp_rank, dp):
                gen = torch.Generator().manual_seed(1000 + cursor)
                x = torch.randn(self.cfg.data.batch_size, self.cfg.toy.width, generator=gen)
                return {"x": x, "y": x.sum(1, keepdim=True)}

            def phases(self, model, batch, step, device):
                loss = torch.nn.functional.mse_loss(model(batch["x"].to(device)), batch["y"].to(device))
                yield Phase("model", loss, {"abs_w": model.weight.abs().mean().detach()})
        ''',
    "recipe.py": """
        from pathlib import Path

        from vidtron.platform.recipe import Recipe
        from toy.config import ToyTrainConfig
        from toy.task import ToyTask

        RECIPE = Recipe(
            name="toy",
            config=ToyTrainConfig,
            defaults=Path(__file__).with_name("toy.yaml"),
            make_task=ToyTask,
            refuses={"memory.recompute": "a linear model has no blocks"},
        )
        """,
}


@pytest.fixture
def toy_recipes(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "my_recipes" / "toy"
    folder.mkdir(parents=True)
    for name, text in TOY_FILES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.setenv(PATH_ENV, str(folder.parent))
    return folder.parent


def test_a_toy_recipe_from_its_own_folder_trains_through_vidtron_train(toy_recipes, tmp_path):
    assert "toy" not in BUILTIN
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vidtron.launch.train", "recipe=toy", f"run_dir={run}", "trainer.steps=3"]
    cmd += ["toy.width=5", "metrics.wandb=false", "optim.lr=0.05"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all("abs_w" in r for r in records)  # the phase's own metric reaches metrics.jsonl
    manifest = json.loads((run / "checkpoints" / "step_000003" / "manifest.json").read_text())
    assert manifest["config"]["recipe"] == "toy" and manifest["config"]["toy"] == {"width": 5, "noise": 0.0}


def test_the_toy_recipe_config_is_typed_and_refuses_what_it_does_not_honour(toy_recipes):
    cfg = compose_config(["recipe=toy"])
    assert type(cfg).__name__ == "ToyTrainConfig" and cfg.toy.width == 3  # the recipe's yaml over its schema
    with pytest.raises(ConfigError, match=r"toy\.width"):
        compose_config(["recipe=toy", "toy.width=0"])
    with pytest.raises(ConfigError, match=r"memory\.recompute.*does not honour"):
        compose_config(["recipe=toy", "memory.recompute=full"])
    with pytest.raises(ConfigError, match=r"toy\.nope"):
        compose_config(["recipe=toy", "toy.nope=1"])


def test_unknown_recipe_names_the_choices(toy_recipes):
    with pytest.raises(ConfigError, match=r"recipe=.*nope.*dit_t2v.*toy.*vae"):
        get_recipe("nope")


def test_vae_refuses_dit_only_knobs():
    with pytest.raises(ConfigError, match=r"memory\.offload_blocks.*recipe=vae does not honour"):
        compose_config(["recipe=vae", "memory.offload_blocks=all"])


# ---- the VAE through the shared update path ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_clips")
    cmd = [sys.executable, "-m", "vidtron.launch.data", "synth", "--out", str(root), "--clips", "8"]
    cmd += ["--frames", "5", "--height", "32", "--width", "32", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return root


def _vae_cfg(clips: Path, run: Path, *extra: str):
    args = ["recipe=vae", f"data.root={clips}", f"run_dir={run}", "trainer.steps=3", "data.batch_size=2"]
    args += ["data.frames=5", "data.height=32", "data.width=32", "metrics.wandb=false", "vae.disc_start=1"]
    args += ["vae.stages=[{until_step:0,frames:5,height:32,width:32}]", "vae.disc_channels=8", "vae.disc_layers=2"]
    return compose_config([*args, *extra])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vae_honours_bf16_precision_through_the_shared_update(clips, tmp_path):
    cfg = _vae_cfg(clips, tmp_path / "bf16", "trainer.precision=bf16")
    trainer = Trainer(cfg, get_recipe("vae").make_task(cfg), init_distributed())
    seen = set()

    def record(module, args, out):
        seen.add(out.dtype)

    trainer.model.vae.decoder.conv_out.register_forward_hook(record)
    trainer.model.disc.register_forward_hook(record)
    result = trainer.train_step()
    trainer.train_step()  # step 2: the critic's phase runs too (disc_start=1)
    assert torch.bfloat16 in seen and result.finite
    assert trainer.state.step == 2 and "disc_grad_norm" in trainer.train_step().metrics


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vae_nan_fault_skips_both_updates_through_the_trainer(clips, tmp_path):
    cfg = _vae_cfg(clips, tmp_path / "nan", "faults.nan_at_step=2", "trainer.max_bad_steps=5")
    trainer = Trainer(cfg, get_recipe("vae").make_task(cfg), init_distributed())
    trainer.train_step()
    params = dict(trainer.model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    result = trainer.train_step()  # poisoned: neither the VAE nor the critic may move
    assert not result.finite and trainer.state.skipped_steps == 1 and trainer.state.bad_in_row == 1
    assert "disc_grad_norm" in result.metrics  # the critic's phase ran, and was skipped too
    assert all(torch.equal(v, params[k]) for k, v in before.items())
    assert trainer.train_step().finite and trainer.state.bad_in_row == 0
