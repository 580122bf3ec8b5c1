"""vidtron-export: our / diffusers / original-HunyuanVideo layouts, streaming shard by shard, atomic output.

Checks: the HunyuanVideo mapping round-trips exactly and gives the original repository's names and shapes on
dit-13b; every format reloads to the checkpoint's exact tensors; diffusers' `from_pretrained` of the export
matches our forward (fp32, 1e-5 absolute on outputs of magnitude ~1: the same operations in the same order,
observed differences are a few ulps); a checkpoint saved by 2 FSDP ranks exports the same full tensors; no
DCP load holds more than one output shard; user errors exit 2 with one line and leave nothing behind.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import full_params, run_training
from vidtron.launch.export import main as export_main
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import FLAVORS, DiTConfig
from vidtron.models.dit.hunyuan_adapter import from_hunyuan, hunyuan_groups, to_hunyuan
from vidtron.models.dit.state_dict_adapter import single_out_to_diffusers, to_diffusers
from vidtron.platform import export as export_mod
from vidtron.platform.checkpoint import save_checkpoint
from vidtron.platform.distributed import DistContext
from vidtron.testing.multirank import run_ranks

TOL = 1e-5
TINY = FLAVORS["dit-tiny"]


def _random_dit(cfg: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with every parameter drawn at random (no zero-initialised layers), in fp32."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = DiT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def _save(model: DiT, run_dir: Path, flavor: str = "dit-tiny") -> Path:
    meta = {"config": {"model": {"flavor": flavor}}}
    return save_checkpoint(run_dir, 1, model, [], meta, DistContext(0, 1, 0, torch.device("cpu")))


def _load_folder(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, through its index when sharded."""
    index = folder / f"{prefix}.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {f"{prefix}.safetensors"}
    out = {}
    for f in sorted(files):
        out |= load_file(folder / f)
    return out


def _export(ckpt: Path, fmt: str, out: Path, *extra: str) -> None:
    assert export_main(["--ckpt", str(ckpt), "--format", fmt, "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _random_dit(TINY)
    ckpt = _save(model, tmp_path_factory.mktemp("export") / "run")
    return ckpt, {k: v.clone() for k, v in model.state_dict().items()}


# ---- the HunyuanVideo mapping ----


def test_hunyuan_round_trip_is_exact():
    cfg = DiTConfig(**{**TINY.__dict__, "guidance_embeds": True})  # every module kind, guidance_in included
    sd = _random_dit(cfg, seed=3).state_dict()
    theirs = to_hunyuan(sd)
    back = from_hunyuan(theirs)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    D = cfg.hidden_size
    qkv = theirs["double_blocks.1.img_attn_qkv.weight"]
    assert torch.equal(qkv[D : 2 * D], sd["double_blocks.1.img_attn.k.weight"])
    mlp_in = theirs["single_blocks.0.linear1.bias"][3 * D :]
    assert torch.equal(mlp_in, sd["single_blocks.0.mlp_in.bias"])
    final = theirs["final_layer.adaLN_modulation.1.weight"]  # theirs (shift, scale), ours (scale, shift)
    assert torch.equal(final[:D], sd["final_layer.mod.weight"][D:])
    assert torch.equal(final[D:], sd["final_layer.mod.weight"][:D])
    linear2 = theirs["single_blocks.1.linear2.weight"]  # input columns [attention (D); MLP (M)], as diffusers'
    assert torch.equal(linear2, single_out_to_diffusers(sd["single_blocks.1.out.weight"]))
    with pytest.raises(KeyError, match="not a known"):
        to_hunyuan({"not_a_param.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing"):
        to_hunyuan({"double_blocks.0.img_attn.q.weight": sd["double_blocks.0.img_attn.q.weight"]})
    groups = hunyuan_groups(sd)
    assert sorted(k for g in groups for k in g) == sorted(sd)
    assert [f"single_blocks.0.attn.{p}.weight" for p in "qkv"] + ["single_blocks.0.mlp_in.weight"] in groups


def _original_13b_shapes() -> dict[str, tuple[int, ...]]:
    """The original HunyuanVideo 13B transformer's tensors (hyvideo/modules/models.py, token_refiner.py)."""
    D, M, Dh, E, P = 3072, 12288, 128, 4096, 768

    def lin(name: str, n_out: int, n_in: int) -> dict:
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    s = {"img_in.proj.weight": (D, 16, 1, 2, 2), "img_in.proj.bias": (D,)}
    for emb in ("time_in", "guidance_in", "txt_in.t_embedder"):
        s |= lin(f"{emb}.mlp.0", D, 256) | lin(f"{emb}.mlp.2", D, D)
    s |= lin("vector_in.in_layer", D, P) | lin("vector_in.out_layer", D, D)
    s |= lin("txt_in.input_embedder", D, E) | lin("txt_in.c_embedder.linear_1", D, E)
    s |= lin("txt_in.c_embedder.linear_2", D, D)
    for i in range(2):
        b = f"txt_in.individual_token_refiner.blocks.{i}"
        s |= {f"{b}.{n}.{leaf}": (D,) for n in ("norm1", "norm2") for leaf in ("weight", "bias")}
        s |= lin(f"{b}.self_attn_qkv", 3 * D, D) | lin(f"{b}.self_attn_proj", D, D)
        s |= lin(f"{b}.mlp.fc1", M, D) | lin(f"{b}.mlp.fc2", D, M) | lin(f"{b}.adaLN_modulation.1", 2 * D, D)
    for i in range(20):
        for x in ("img", "txt"):
            b = f"double_blocks.{i}.{x}"
            s |= lin(f"{b}_mod.linear", 6 * D, D) | lin(f"{b}_attn_qkv", 3 * D, D) | lin(f"{b}_attn_proj", D, D)
            s |= {f"{b}_attn_q_norm.weight": (Dh,), f"{b}_attn_k_norm.weight": (Dh,)}
            s |= lin(f"{b}_mlp.fc1", M, D) | lin(f"{b}_mlp.fc2", D, M)
    for i in range(40):
        b = f"single_blocks.{i}"
        s |= lin(f"{b}.linear1", 3 * D + M, D) | lin(f"{b}.linear2", D, D + M) | lin(f"{b}.modulation.linear", 3 * D, D)
        s |= {f"{b}.q_norm.weight": (Dh,), f"{b}.k_norm.weight": (Dh,)}
    return s | lin("final_layer.linear", 64, D) | lin("final_layer.adaLN_modulation.1", 2 * D, D)


def test_hunyuan_layout_of_dit_13b_matches_the_original():
    with torch.device("meta"):
        sd = DiT(FLAVORS["dit-13b"]).state_dict()
    theirs = {k: tuple(v.shape) for k, v in to_hunyuan(sd).items()}
    assert theirs == _original_13b_shapes()
    assert theirs["double_blocks.0.img_attn_qkv.weight"] == (9216, 3072)
    assert theirs["single_blocks.0.linear1.weight"] == (3072 * 3 + 12288, 3072)
    assert sum(math.prod(s) for s in theirs.values()) == 12_821_012_544


# ---- exports of a checkpoint ----


def test_safetensors_export_is_sharded_exact_and_streams(random_ckpt, tmp_path, monkeypatch):
    ckpt, sd = random_ckpt
    loads = []
    real_load = export_mod.dcp.load

    def spy(state, **kw):
        loads.append(sum(t.nbytes for t in state["model"].values()))
        return real_load(state, **kw)

    monkeypatch.setattr(export_mod.dcp, "load", spy)
    max_bytes = 200_000  # dit-tiny is ~2.2 MB in fp32: about a dozen shards
    _export(ckpt, "safetensors", tmp_path / "ours", "--max-shard-size", "200KB")
    files = sorted((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    assert len(files) == len(loads) > 5
    assert max(loads) <= max_bytes and all(f.stat().st_size <= max_bytes + 20_000 for f in files)  # + header
    got = _load_folder(tmp_path / "ours", "model")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert DiTConfig(**json.loads((tmp_path / "ours" / "config.json").read_text())) == TINY
    _export(ckpt, "safetensors", tmp_path / "bf16", "--dtype", "bfloat16")  # one file, no index
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(got[k], sd[k].bfloat16()) for k in sd)


def _inputs(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(2, cfg.in_channels, 3, 4, 4, generator=g),
        timestep=torch.tensor([250.0, 900.0]),
        text_states=torch.randn(2, 5, cfg.text_dim, generator=g),
        text_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        pooled=torch.randn(2, cfg.pooled_dim, generator=g),
    )


def test_diffusers_export_loads_and_matches_our_forward(random_ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ckpt, sd = random_ckpt
    _export(ckpt, "diffusers", tmp_path / "hf", "--max-shard-size", "500KB")
    assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert (tmp_path / "hf" / "diffusion_pytorch_model-00001-of-00005.safetensors").exists()
    ref = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "hf").eval()
    ours = _random_dit(TINY, seed=99)
    ours.load_state_dict(sd)
    x = _inputs(TINY)
    with torch.no_grad():
        got = ours(**x)
        want = ref(x["latents"], x["timestep"], x["text_states"], x["text_mask"], x["pooled"], return_dict=False)[0]
    assert got.abs().max() > 0.1 and (got - want).abs().max().item() <= TOL
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in to_diffusers(sd).items())


def test_hunyuan_export_equals_the_in_memory_mapping(random_ckpt, tmp_path):
    ckpt, sd = random_ckpt
    (tmp_path / "hy").mkdir()  # an empty output folder is fine
    _export(ckpt, "hunyuan", tmp_path / "hy", "--max-shard-size", "300KB")
    got, want = _load_folder(tmp_path / "hy", "model"), to_hunyuan(sd)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "hy" / "config.json").read_text())
    assert config["hidden_size"] == TINY.hidden_size and config["mm_single_blocks_depth"] == TINY.num_single_blocks


def _train_two_ranks(data_root: str, run_dir: str) -> dict[str, torch.Tensor] | None:
    state = run_training(data_root, run_dir, "trainer.steps=1", "trainer.progress=false")
    params = full_params(state.model)
    return params if torch.distributed.get_rank() == 0 else None


def test_checkpoint_saved_by_two_fsdp_ranks_exports_the_full_tensors(synth_data, tmp_path):
    params = run_ranks(_train_two_ranks, 2, args=(str(synth_data), str(tmp_path / "run")))[0]
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    _export(ckpt, "safetensors", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params)


# ---- user errors and atomicity ----


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_a_checkpoint", "not a committed checkpoint folder"),
        ("unknown_format", "--format='onnx'"),
        ("out_not_empty", "not an empty folder"),
        ("bad_size", "--max-shard-size"),
        ("damaged", "fails its sha256 check"),
    ],
)
def test_user_errors_are_one_line_exit_2(random_ckpt, tmp_path, capsys, case, message):
    ckpt, _ = random_ckpt
    args = {"ckpt": str(ckpt), "format": "safetensors", "out": str(tmp_path / "out"), "max-shard-size": "5GB"}
    if case == "not_a_checkpoint":
        args["ckpt"] = str(tmp_path)
    elif case == "unknown_format":
        args["format"] = "onnx"
    elif case == "out_not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("x")
    elif case == "bad_size":
        args["max-shard-size"] = "lots"
    else:
        args["ckpt"] = str(shutil.copytree(ckpt, tmp_path / "ckpt"))
        with open(next((tmp_path / "ckpt").glob("*.distcp")), "ab") as f:
            f.write(b"x")
    assert export_main([x for k, v in args.items() for x in (f"--{k}", v)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("vidtron-export: error:")
    assert not list(tmp_path.glob("out.tmp-*"))


def test_a_failed_export_leaves_no_folder(random_ckpt, tmp_path, monkeypatch):
    ckpt, _ = random_ckpt
    monkeypatch.setattr(export_mod, "save_file", _failing_after(1, export_mod.save_file))
    with pytest.raises(OSError, match="disk full"):
        export_main(
            ["--ckpt", str(ckpt), "--format", "hunyuan", "--out", str(tmp_path / "out"), "--max-shard-size", "300KB"]
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def _failing_after(n: int, real):
    calls = []

    def save(*args, **kw):
        calls.append(1)
        if len(calls) > n:
            raise OSError("disk full")
        return real(*args, **kw)

    return save
