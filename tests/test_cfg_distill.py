"""Recipe dit_cfg_distill: a guidance-embedded student learns a frozen teacher's CFG output in one forward.

- The target is the teacher's u + g (c - u), computed here by hand from two separate teacher forwards; the scale g
  is drawn per sample from [distill.guidance_min, distill.guidance_max]; backward reaches the student only.
- `vidtron-train recipe=dit_cfg_distill` lowers the distillation loss (on a fixed batch, before vs after), and the
  student's DCP checkpoint holds the student's tensors only (no teacher).
- Sampling the student checkpoint (vidtron-sample's generate_latents) runs one forward of B rows per Euler step;
  the CFG teacher runs 2B rows per step.
- Pre-launch errors (no teacher_from, a missing path, a teacher of another shape, a student without the guidance
  embedding, a caption encoder other than the teacher's) are one ConfigError each.
Tolerance of the hand-computed target: 1e-5 (fp32; the batched teacher forward vs two separate forwards differ only
by summation order).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_training
from vidtron.errors import ConfigError
from vidtron.launch.data import main as vidtron_data
from vidtron.launch.preflight import preflight
from vidtron.launch.sample import generate_latents
from vidtron.launch.sample import main as vidtron_sample
from vidtron.launch.train import main as vidtron_train
from vidtron.models.dit import DiT
from vidtron.platform.checkpoint import SafeFileSystemReader
from vidtron.platform.distributed import init_distributed
from vidtron.platform.init_from import init_from
from vidtron.platform.metrics import read_metrics
from vidtron.platform.trainer import build_dims, setup_model
from vidtron.recipes.dit_t2v.sampling import SampleOptions
from vidtron.recipes.registry import compose_config, get_recipe

SHAPE = ["data.frames=5", "data.height=16", "data.width=16", "data.batch_size=4"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dit-tiny teacher trained 30 steps on 8 generated clips: (data root, its checkpoint folder)."""
    root = tmp_path_factory.mktemp("cfgd")
    data = root / "data"
    args = ["synth", "--out", str(data), "--clips", "8", "--frames", "5", "--height", "16", "--width", "16"]
    assert vidtron_data(args) == 0
    run = root / "teacher"
    run_training(data, run, *SHAPE, "trainer.steps=30", "trainer.checkpoint_every=30", "optim.lr=3e-3")
    return data, run / "checkpoints" / "step_000030"


def _cfg(data, ckpt, run_dir, *extra):
    base = ["recipe=dit_cfg_distill", f"data.root={data}", f"run_dir={run_dir}", "metrics.wandb=false", *SHAPE]
    return compose_config([*base, f"distill.teacher_from={ckpt}", *extra])


def _task_and_student(cfg):
    task = get_recipe("dit_cfg_distill").make_task(cfg)
    ctx = init_distributed()
    return task, setup_model(task, cfg, build_dims(cfg.parallel, 1), ctx)


def test_target_is_the_teachers_cfg_output_and_only_the_student_gets_gradients(teacher, tmp_path):
    data, ckpt = teacher
    cfg = _cfg(data, ckpt, tmp_path / "run", "distill.guidance_min=2.0", "distill.guidance_max=6.0")
    task, student = _task_and_student(cfg)
    batch = task.local_batch(step=1, cursor=0, dp_rank=0, dp=1)
    g = batch["guidance"] / 1000.0
    assert g.shape == (4,) and bool(((g >= 2.0) & (g <= 6.0)).all()) and len(set(g.tolist())) == 4

    x_t = (1 - batch["sigma"]).view(-1, 1, 1, 1, 1) * batch["latents"]  # x_t = t x1 + (1 - t) x0, sigma = 1 - t
    x_t = x_t + batch["sigma"].view(-1, 1, 1, 1, 1) * batch["noise"]
    timestep = 1000.0 * batch["sigma"]
    text, u1 = batch["text"], task.data.uncond
    with torch.no_grad():
        c = task.teacher(x_t, timestep, text.states, text.mask, text.pooled)
        b = x_t.shape[0]
        u = task.teacher(x_t, timestep, u1.states.expand(b, -1, -1), u1.mask.expand(b, -1), u1.pooled.expand(b, -1))
    by_hand = u + g.view(-1, 1, 1, 1, 1) * (c - u)
    torch.testing.assert_close(task.target(batch, torch.device("cpu")), by_hand, atol=1e-5, rtol=1e-5)

    teacher_names = dict(task.teacher.named_parameters())  # the student starts as a copy of every teacher tensor
    for name, p in student.named_parameters():
        if name in teacher_names:
            assert torch.equal(p, teacher_names[name]), name
        else:
            assert name.startswith("cond_embed.guidance_mlp."), name
    task.loss(student, batch, torch.device("cpu")).backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert student.cond_embed.guidance_mlp.fc1.weight.grad.abs().sum() > 0
    assert not any(task.teacher is m for m in student.modules())


def test_vidtron_train_distills_without_the_teacher_in_the_checkpoint_and_samples_in_one_forward(
    teacher, tmp_path, monkeypatch
):
    data, ckpt = teacher
    run = tmp_path / "student"
    args = [f"data.root={data}", f"run_dir={run}", "metrics.wandb=false", *SHAPE, "trainer.steps=12"]
    args += ["recipe=dit_cfg_distill", f"distill.teacher_from={ckpt}", "optim.lr=3e-3", "optim.warmup_steps=0"]
    assert vidtron_train([*args, "trainer.checkpoint_every=12"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    student_ckpt = run / "checkpoints" / "step_000012"

    # the loss on one fixed batch: the initial student (teacher copy) vs the distilled one
    task, model = _task_and_student(_cfg(data, ckpt, tmp_path / "eval"))
    batches = [task.local_batch(step=100 + i, cursor=4 * i, dp_rank=0, dp=1) for i in range(2)]
    with torch.no_grad():
        before = sum(float(task.loss(model, b, torch.device("cpu"))) for b in batches)
        init_from(model, student_ckpt, kind="dit")
        after = sum(float(task.loss(model, b, torch.device("cpu"))) for b in batches)
    assert after < 0.8 * before, (before, after)

    keys = SafeFileSystemReader(str(student_ckpt)).read_metadata().state_dict_metadata
    student_names = {f"model.{n}" for n, _ in model.named_parameters()}
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys == student_names
    assert not any("teacher" in k for k in keys)

    rows: list[int] = []
    forward = DiT.forward

    def counting(self, x, *a, **k):
        rows.append(x.shape[0])
        return forward(self, x, *a, **k)

    monkeypatch.setattr(DiT, "forward", counting)
    prompts = ["a blue square moves up from the middle left", "a red triangle moves down from the top"]
    generate_latents(student_ckpt, prompts, SampleOptions(steps=4, guidance=5.0))
    assert rows == [2] * 4  # one forward of B rows per step
    rows.clear()
    generate_latents(ckpt, prompts, SampleOptions(steps=4, cfg_scale=5.0))
    assert rows == [4] * 4  # CFG: conditional + unconditional rows, 2B per step
    rows.clear()
    out = tmp_path / "samples"
    assert vidtron_sample(["--ckpt", str(student_ckpt), "--prompt", prompts[0], "--steps", "2", "--out", str(out)]) == 0
    assert rows == [1] * 2 and (out / "sample_0.gif").exists()  # the CLI: --guidance's default, one forward a step


def test_sampling_flags_must_fit_the_model(teacher, tmp_path, capsys):
    """--cfg-scale on a guidance-embedded student, or --guidance on a CFG model, is an error, not silently ignored."""
    data, ckpt = teacher
    run = tmp_path / "student"
    args = [f"data.root={data}", f"run_dir={run}", "metrics.wandb=false", *SHAPE, "trainer.steps=1"]
    args += ["recipe=dit_cfg_distill", f"distill.teacher_from={ckpt}"]
    assert vidtron_train(args) == 0
    student = run / "checkpoints" / "step_000001"
    for path, flag in ((student, "--cfg-scale"), (ckpt, "--guidance")):
        argv = ["--ckpt", str(path), "--prompt", "a red circle", "--steps", "1", flag, "4", "--out", str(tmp_path)]
        assert vidtron_sample(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag}=4.0" in err and ("--guidance 4.0 instead" in err or "--cfg-scale" in err), err


def test_preflight_errors_are_one_config_error_each(teacher, tmp_path):
    data, ckpt = teacher
    cases = [
        ([], ckpt.parent.parent / "nope", "distill.teacher_from"),  # missing path
        (["model.num_heads=4"], ckpt, "distill.teacher_from"),  # teacher weights of another shape
        (["distill.teacher_flavor=dit-small"], ckpt, "distill.teacher_from"),
        (["model.flavor=dit-tiny"], ckpt, "model.flavor"),  # a student without the guidance embedding
        (["text.max_tokens=16"], ckpt, "text.max_tokens"),  # another caption encoding than the teacher's
    ]
    for extra, path, field in cases:
        with pytest.raises(ConfigError) as err:
            preflight(_cfg(data, path, tmp_path, *extra), 1)
        assert err.value.field == field, (extra, err.value)
    with pytest.raises(ConfigError) as err:
        preflight(compose_config(["recipe=dit_cfg_distill", f"data.root={data}", *SHAPE]), 1)
    assert err.value.field == "distill.teacher_from"
    with pytest.raises(ConfigError):
        compose_config(["recipe=dit_cfg_distill", "distill.guidance_min=9.0"])
