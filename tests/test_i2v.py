"""Image-to-video (token replace, HunyuanVideo-I2V): the DiT, its parallel layouts, training, sampling and export.

Parity with diffusers' `HunyuanVideoTransformer3DModel(image_condition_type="token_replace")`: 1e-5 absolute in fp32
on outputs of magnitude ~0.5 (the same operations in the same order; observed ~5e-8). CP / SP layouts against one
process: 1e-5 (ring / Ulysses merge attention in another order: a few ulps). Sampling keeps frame 0 bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

from tests.test_dit import TINY_DIFFUSERS  # 2 heads x 8, rope (2, 2, 4), every module kind present
from vidtron.errors import ConfigError
from vidtron.launch.data import main as vidtron_data
from vidtron.launch.export import main as export_main
from vidtron.launch.sample import check_image_argument, encode_image
from vidtron.launch.sample import main as sample_main
from vidtron.launch.train import main as vidtron_train
from vidtron.models.dit import DiT, DiTConfig
from vidtron.models.dit.configs import from_diffusers_config, to_diffusers_config
from vidtron.models.dit.hunyuan_adapter import to_hunyuan_config
from vidtron.models.dit.state_dict_adapter import from_diffusers, to_diffusers
from vidtron.platform.checkpoint import read_manifest
from vidtron.platform.init_from import init_from
from vidtron.platform.metrics import read_metrics
from vidtron.recipes.dit_t2v.sampling import SampleOptions, sample_latents
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.testing.multirank import run_ranks

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
I2V = from_diffusers_config(dict(TINY_DIFFUSERS, guidance_embeds=False, image_condition_type="token_replace"))
SHAPE = ["data.frames=5", "data.height=16", "data.width=16", "data.batch_size=4"]


def _random_dit(cfg: DiTConfig, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def _inputs(cfg: DiTConfig, frames: int = 3, h: int = 4, w: int = 4, guidance: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(
        latents=torch.randn(2, cfg.in_channels, frames, h, w, generator=g),
        timestep=torch.tensor([250.0, 900.0]),
        text_states=torch.randn(2, 6, cfg.text_dim, generator=g),
        text_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
        pooled=torch.randn(2, cfg.pooled_dim, generator=g),
        guidance=torch.tensor([6000.0, 3500.0]) if guidance else None,
    )


def _run_diffusers(model, x: dict) -> torch.Tensor:
    args = (x["latents"], x["timestep"], x["text_states"], x["text_mask"], x["pooled"], x["guidance"])
    return model(*args, return_dict=False)[0]


# ---- the model: diffusers parity, layout, per-sample flags ----


@pytest.mark.parametrize("guidance", [True, False])
def test_forward_matches_diffusers_token_replace(guidance):
    """diffusers' token-replace transformer -> our loader -> the same output; the first frame's timestep-0
    modulation matters (the text-to-video forward of the same weights differs) and the guidance embedding stays
    out of it (checked by guidance=True)."""
    torch.manual_seed(0)
    ref = diffusers.HunyuanVideoTransformer3DModel(
        **TINY_DIFFUSERS, guidance_embeds=guidance, image_condition_type="token_replace"
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    cfg = from_diffusers_config(dict(ref.config))
    assert cfg.image_condition == "token_replace"
    ours = DiT(cfg).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    t2v = DiT(dataclasses.replace(cfg, image_condition="")).eval()
    t2v.load_state_dict(ours.state_dict())
    x = _inputs(cfg, guidance=guidance)
    with torch.no_grad():
        want, got, plain = _run_diffusers(ref, x), ours(**x), t2v(**x)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= TOL
    assert (plain - want).abs().max().item() > 100 * TOL  # the token replacement is not a no-op


def test_token_replace_has_the_text_to_video_weights():
    """No extra weights: diffusers' token-replace state dict has the T2V names and shapes, and so has ours."""
    with torch.device("meta"):
        i2v = diffusers.HunyuanVideoTransformer3DModel(**to_diffusers_config(I2V))
        t2v = diffusers.HunyuanVideoTransformer3DModel(
            **to_diffusers_config(dataclasses.replace(I2V, image_condition=""))
        )
        ours = DiT(I2V)
    i2v_sd, t2v_sd = i2v.state_dict(), t2v.state_dict()
    assert {k: v.shape for k, v in i2v_sd.items()} == {k: v.shape for k, v in t2v_sd.items()}
    assert {k: v.shape for k, v in to_diffusers(ours.state_dict()).items()} == {k: v.shape for k, v in i2v_sd.items()}


def test_image_cond_per_sample_and_text_to_video_refuses_it():
    """image_cond=[True, False]: row 0 is the image-conditioned forward, row 1 the text-to-video one."""
    ours = _random_dit(I2V)
    t2v = DiT(dataclasses.replace(I2V, image_condition="")).eval()
    t2v.load_state_dict(ours.state_dict())
    x = _inputs(I2V)
    with torch.no_grad():
        mixed = ours(**x, image_cond=torch.tensor([True, False]))
        all_cond, plain = ours(**x), t2v(**x)
    assert torch.equal(mixed[0], all_cond[0]) and torch.equal(mixed[1], plain[1])
    assert not torch.equal(all_cond[1], plain[1])
    with pytest.raises(ConfigError, match="text-to-video"):
        t2v(**x, image_cond=torch.tensor([True, True]))


def test_config_round_trip_and_errors():
    d = to_diffusers_config(I2V)
    assert d["image_condition_type"] == "token_replace" and from_diffusers_config(d) == I2V
    assert to_diffusers_config(DiTConfig())["image_condition_type"] is None
    assert to_hunyuan_config(I2V)["i2v_condition_type"] == "token_replace"
    assert "i2v_condition_type" not in to_hunyuan_config(DiTConfig())
    with pytest.raises(ConfigError, match="image_condition_type"):
        from_diffusers_config({"image_condition_type": "latent_concat"})
    with pytest.raises(ConfigError) as err:
        DiTConfig(image_condition="latent_concat")
    assert err.value.field == "dit.image_condition"
    with pytest.raises(ConfigError) as err:
        DiTConfig(image_condition="token_replace", patch_size_t=2)
    assert err.value.field == "dit.patch_size_t"


# ---- parallel layouts: the frame-0 mask is sharded with the tokens ----

LAYOUTS = {"cp2-ring": dict(cp=2), "cp2-ulysses": dict(cp=2, cp_mode="ulysses"), "tp2-sp": dict(tp=2)}
GRAD_PARAMS = ("double_blocks.0.img_mod.weight", "single_blocks.1.mod.weight", "cond_embed.time_mlp.fc1.weight")


def _layout_forward(state: dict, x: dict, dims_kw: dict) -> dict:
    from vidtron.models.dit.parallelize import ParallelizeOptions, parallelize_dit
    from vidtron.parallel.dims import ParallelDims
    from vidtron.parallel.materialize import materialize

    dims = ParallelDims(**dims_kw)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = DiT(I2V)
    parallelize_dit(model, dims, ParallelizeOptions(inference=True))
    materialize(model, "cpu", lambda name, shape: state[name]).eval()
    out = model(**x, image_cond=torch.tensor([True, False]))
    rec = {"out": out.detach()}
    if dims.tp == 1:  # plain parameters: CP ranks' gradients sum to cp x the one-process gradient
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        params = dict(model.named_parameters())
        for name in GRAD_PARAMS:
            grad = params[name].grad.clone()
            dist.all_reduce(grad)
            rec[name] = grad / dims.cp
    return rec


def _ranks(state: dict, x: dict) -> dict:
    return {name: _layout_forward(state, x, kw) for name, kw in LAYOUTS.items()}


def test_cp_and_sp_layouts_match_one_process():
    """2 gloo ranks, grid (3, 1, 5): 15 video tokens, 5 of frame 0; CP pads to 16 and rank 0's chunk holds frame 0
    and 3 tokens of frame 1; SP slices the same way. Sample 0 is image-conditioned, sample 1 not."""
    model = _random_dit(I2V)
    x = _inputs(I2V, frames=3, h=2, w=10)
    out = model(**x, image_cond=torch.tensor([True, False]))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = dict(model.named_parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for rank in run_ranks(_ranks, 2, args=(state, x)):
        for name, rec in rank.items():
            assert (rec["out"] - out.detach()).abs().max().item() <= TOL, name
            for p in GRAD_PARAMS if "tp" not in name else ():
                assert (rec[p] - grads[p].grad).abs().max().item() <= TOL, (name, p)


# ---- training: frame 0 clean, no loss on it ----


class _Recorder(torch.nn.Module):
    """Records the latents it is given; returns a fixed leaf tensor whose gradient shows where the loss looks."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.randn(shape).requires_grad_()

    def forward(self, latents, *args):
        self.seen = latents
        return self.out * 1.0


def test_loss_excludes_frame_zero_and_feeds_it_clean():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    text = SimpleNamespace(states=torch.zeros(2, 1, 12), mask=torch.ones(2, 1), pooled=torch.zeros(2, 10))
    batch = {"latents": x1, "noise": x0, "sigma": torch.tensor([0.3, 0.8]), "guidance": torch.ones(2), "text": text}
    task = SimpleNamespace(dit_cfg=I2V)
    model = _Recorder(x1.shape)
    DiTTextToVideo.loss(task, model, batch, torch.device("cpu")).backward()
    assert torch.equal(model.seen[:, :, 0], x1[:, :, 0])  # clean reference frame
    assert not torch.equal(model.seen[:, :, 1:], x1[:, :, 1:])  # noisy elsewhere
    assert torch.count_nonzero(model.out.grad[:, :, 0]) == 0 and torch.count_nonzero(model.out.grad[:, :, 1:]) > 0
    task.dit_cfg = dataclasses.replace(I2V, image_condition="")  # text-to-video: every frame in the loss
    DiTTextToVideo.loss(task, model := _Recorder(x1.shape), batch, torch.device("cpu")).backward()
    assert torch.count_nonzero(model.out.grad[:, :, 0]) > 0


# ---- CLI: train, sample with --image, export ----


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    """`vidtron-train model.image_condition=token_replace` for 3 steps on 8 generated 5 x 16 x 16 clips."""
    root = tmp_path_factory.mktemp("i2v")
    args = ["synth", "--out", str(root / "data"), "--clips", "8", "--frames", "5", "--height", "16", "--width", "16"]
    assert vidtron_data(args) == 0
    argv = [f"data.root={root / 'data'}", f"run_dir={root / 'run'}", "metrics.wandb=false", *SHAPE]
    assert vidtron_train([*argv, "model.image_condition=token_replace", "trainer.steps=3"]) == 0
    return root


def test_training_runs_with_finite_loss(i2v_run):
    losses = [r["loss"] for r in read_metrics(i2v_run / "run") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("layout", ["parallel.cp=2", "parallel.tp=2"])
def test_parallel_training_matches_one_process(tmp_path, layout):
    """`vidtron-train model.image_condition=token_replace` on 2 ranks (torchrun; CP with FSDP over the CP ranks, or
    TP + SP) logs the one-process losses: grid (2, 1, 3), frame 0 on rank 0. Tolerance 1e-5 (ring attention and TP
    partial sums add in another order: a few ulps)."""
    args = [
        "synth",
        "--out",
        str(tmp_path / "data"),
        "--clips",
        "8",
        "--frames",
        "5",
        "--height",
        "16",
        "--width",
        "48",
    ]
    assert vidtron_data(args) == 0
    base = [f"data.root={tmp_path / 'data'}", "metrics.wandb=false", "data.frames=5", "data.height=16", "data.width=48"]
    base += ["data.batch_size=4", "model.image_condition=token_replace", "trainer.steps=2", "trainer.progress=false"]
    assert vidtron_train([*base, f"run_dir={tmp_path / 'one'}"]) == 0
    two = ["launcher.nproc_per_node=2", layout, "parallel.dp_shard=1"]
    assert vidtron_train([*base, f"run_dir={tmp_path / 'two'}", *two]) == 0
    one, two = ([r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert len(one) == 2 and all(abs(a - b) <= TOL for a, b in zip(one, two, strict=True))


def test_sample_with_image_keeps_frame_zero(i2v_run, tmp_path):
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "first.png")  # resized to the clip's 16 x 16
    args = ["--run-dir", str(i2v_run / "run"), "--prompt", "a red square", "--steps", "3", "--cfg-scale", "2"]
    assert sample_main([*args, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "s")]) == 0
    z = load_file(tmp_path / "s" / "latents.safetensors")["latents"]
    ckpt = sorted((i2v_run / "run" / "checkpoints").glob("step_*"))[-1]
    image = encode_image(tmp_path / "first.png", read_manifest(ckpt)["config"])
    assert z.shape == (1, 16, 2, 2, 2) and torch.equal(z[:, :, :1], image)
    assert (tmp_path / "s" / "sample_0.mp4").exists()


def test_sample_image_argument_errors(i2v_run, tmp_path, capsys):
    args = ["--run-dir", str(i2v_run / "run"), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert sample_main(args) == 2
    assert "--image" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="text-to-video"):
        check_image_argument("first.png", DiTConfig())
    with pytest.raises(ConfigError, match="no such file"):
        check_image_argument(str(tmp_path / "missing.png"), I2V)


def test_sample_latents_replaces_frame_zero_exactly():
    model = _random_dit(I2V)
    text = SimpleNamespace(states=torch.randn(2, 3, 12), mask=torch.ones(2, 3), pooled=torch.randn(2, 10))
    uncond = SimpleNamespace(states=torch.randn(1, 3, 12), mask=torch.ones(1, 3), pooled=torch.randn(1, 10))
    image = torch.randn(1, 4, 1, 4, 4)
    opts = SampleOptions(steps=3, cfg_scale=3.0)
    z = sample_latents(model, _text(text), _text(uncond), (4, 3, 4, 4), opts, False, image)
    assert torch.equal(z[:, :, :1], image.expand(2, -1, -1, -1, -1)) and torch.isfinite(z).all()


def _text(ns):
    from vidtron.models.text.encoders import TextBatch

    return TextBatch(ns.states, ns.mask, ns.pooled)


def test_export_writes_the_diffusers_i2v_model(i2v_run, tmp_path):
    ckpt = sorted((i2v_run / "run" / "checkpoints").glob("step_*"))[-1]
    assert export_main(["--ckpt", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["image_condition_type"] == "token_replace"
    ref = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "hf").eval()
    cfg = from_diffusers_config(dict(ref.config))
    ours = DiT(cfg).eval()
    init_from(ours, str(tmp_path / "hf"))  # `model.init_from=` a diffusers token-replace folder: the same tensors
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in from_diffusers(ref.state_dict()).items())
    with torch.no_grad():
        for p in ours.parameters():  # trained 3 steps from adaLN-zero: perturb so the output is not ~0
            p.add_(torch.randn_like(p) * 0.05)
    ref.load_state_dict(to_diffusers(ours.state_dict()))
    x = _inputs(cfg, frames=2, h=2, w=2)
    with torch.no_grad():
        got, want = ours(**x), _run_diffusers(ref, x)
    assert got.abs().max() > 0.1 and (got - want).abs().max().item() <= TOL
