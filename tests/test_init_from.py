"""`model.init_from` / `vae.init_from`: streaming, sharded loading of external weights and training checkpoints.

Checks: a random dit-tiny written in every format (our safetensors as one file and as a sharded `vidtron-export`,
the diffusers and original-HunyuanVideo exports, diffusers' own sharded `save_pretrained`, a HunyuanVideo `.pt`
with a `module` key, the DCP checkpoint itself) loads into a fresh model bitwise equal, reading each byte once;
a meta-device model is materialized; every bad input is one ConfigError naming the field, with nothing written;
on 2 gloo ranks (tp=2 from diffusers' folder and the hunyuan export, FSDP2 dp_shard=2 built on the meta device,
a checkpoint resharded into tp=2) the gathered tensors equal the single-rank load bitwise, each rank reads
through `get_slice` exactly the bytes it holds, and a forward after the load matches one device to 1e-5 (TP sums
partial products in another order, a few ulps; FSDP2 alone is the same math). `slow`: 4 ranks, FSDP2 over TP.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from vidtron.errors import ConfigError
from vidtron.launch.export import main as export_main
from vidtron.models import weights_io
from vidtron.models.dit import DiT
from vidtron.models.dit.configs import FLAVORS, DiTConfig, to_diffusers_config
from vidtron.models.dit.hunyuan_adapter import to_hunyuan
from vidtron.models.dit.state_dict_adapter import single_out_from_diffusers, to_diffusers
from vidtron.models.dit.weights import single_out_columns
from vidtron.models.vae import FLAVORS as VAE_FLAVORS
from vidtron.models.vae import CausalVAE
from vidtron.models.vae.state_dict_adapter import to_diffusers as vae_to_diffusers
from vidtron.platform.checkpoint import save_checkpoint
from vidtron.platform.distributed import DistContext
from vidtron.platform.init_from import check_init_from, init_from
from vidtron.testing.multirank import run_ranks

TINY = FLAVORS["dit-tiny"]
LAYOUT = {
    "ours_file": "vidtron",
    "export_safetensors": "vidtron",
    "export_diffusers": "diffusers",
    "export_hunyuan": "hunyuan",
    "save_pretrained": "diffusers",
    "hunyuan_pt": "hunyuan",
    "dcp": "dcp",
}


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (no zero-initialised layers), fp32."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _fresh(cfg: DiTConfig = TINY) -> DiT:
    return _random(DiT(cfg), seed=123)


def _meta_dit(cfg: DiTConfig = TINY) -> DiT:
    with torch.device("meta"):
        return DiT(cfg)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of every tensor of the state dict (collective for DTensors)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def _export(ckpt: Path, fmt: str, out: Path, *extra: str) -> Path:
    assert export_main(["--ckpt", str(ckpt), "--format", fmt, "--out", str(out), *extra]) == 0
    return out


def _save_pretrained(sd: dict[str, torch.Tensor], out: Path) -> Path:
    """diffusers' own HunyuanVideoTransformer3DModel, sharded into ~0.5 MB files."""
    from diffusers import HunyuanVideoTransformer3DModel

    theirs = HunyuanVideoTransformer3DModel(**to_diffusers_config(TINY))
    theirs.load_state_dict(to_diffusers(sd), strict=True)
    theirs.save_pretrained(out, max_shard_size="500KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[dict[str, Path], dict[str, torch.Tensor]]:
    """A random dit-tiny in every format, and its state dict."""
    root = tmp_path_factory.mktemp("init_from")
    model = _random(DiT(TINY), seed=0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"config": {"model": {"flavor": "dit-tiny"}}}
    ckpt = save_checkpoint(root / "run", 1, model, [], meta, DistContext(0, 1, 0, torch.device("cpu")))
    save_file(sd, root / "ours.safetensors")
    torch.save({"module": to_hunyuan(sd)}, root / "hunyuan.pt")
    paths = {
        "ours_file": root / "ours.safetensors",
        "export_safetensors": _export(ckpt, "safetensors", root / "e_st", "--max-shard-size", "400KB"),
        "export_diffusers": _export(ckpt, "diffusers", root / "e_diff"),
        "export_hunyuan": _export(ckpt, "hunyuan", root / "e_hy", "--max-shard-size", "400KB"),
        "save_pretrained": _save_pretrained(sd, root / "pretrained"),
        "hunyuan_pt": root / "hunyuan.pt",
        "dcp": ckpt,
    }
    return paths, sd


@pytest.mark.parametrize("fmt", list(LAYOUT))
def test_every_format_loads_bitwise_reading_each_byte_once(written, fmt):
    paths, sd = written
    assert check_init_from(_meta_dit(), paths[fmt]).layout == LAYOUT[fmt]  # headers / DCP metadata only
    model = _fresh()
    report = init_from(model, paths[fmt])
    assert report.layout == LAYOUT[fmt] and sorted(report.loaded) == sorted(sd) and not report.missing
    _assert_equal(_state(model), sd)
    assert report.bytes_read == sum(t.nbytes for t in sd.values())


def test_bfloat16_export_loads_cast_into_a_float32_model(written, tmp_path):
    paths, sd = written
    out = _export(paths["dcp"], "hunyuan", tmp_path / "bf16", "--dtype", "bfloat16")
    model = _fresh()
    init_from(model, out)
    _assert_equal(_state(model), {k: v.bfloat16().float() for k, v in sd.items()})


def test_single_out_columns_match_the_adapter():
    w = torch.randn(64, 64 + 256)
    assert torch.equal(w[:, single_out_columns(w.shape)], single_out_from_diffusers(w))


def test_meta_model_is_materialized(written):
    paths, sd = written
    model = _meta_dit()
    with pytest.raises(ValueError, match="meta device"):
        init_from(model, paths["save_pretrained"])
    report = init_from(model, paths["save_pretrained"], device="cpu")
    assert report.materialized
    _assert_equal(_state(model), sd)


def test_strict_false_keeps_what_the_file_lacks_and_reports_extras(written, tmp_path):
    paths, sd = written
    dropped = ["single_blocks.1.out.weight", "patch_embed.bias"]
    partial = {k: v for k, v in sd.items() if k not in dropped} | {"extra.weight": torch.zeros(2)}
    save_file(partial, tmp_path / "partial.safetensors")
    model = _fresh()
    before = _state(model)
    report = init_from(model, tmp_path / "partial.safetensors", strict=False)
    assert sorted(report.missing) == sorted(dropped) and report.unexpected == ["extra.weight"]
    _assert_equal(_state(model), {k: before[k] if k in dropped else v for k, v in sd.items()})


# ---- errors: one ConfigError naming the field, before anything is written ----


def _bad_inputs(tmp_path: Path, sd: dict[str, torch.Tensor], ckpt: Path) -> dict[str, tuple[Path, str]]:
    """case -> (path, a phrase of the message)."""
    (tmp_path / "empty").mkdir()
    save_file({"foo.weight": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    save_file({k: v for i, (k, v) in enumerate(sd.items()) if i % 10}, tmp_path / "missing.safetensors")
    save_file(sd | {"double_blocks.9.img_mod.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    save_file(sd | {"patch_embed.bias": torch.zeros(65)}, tmp_path / "shape.safetensors")
    torch.save({"module": {"a": argparse.Namespace()}}, tmp_path / "pickle.pt")
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad_index").mkdir()
    index = {"metadata": {}, "weight_map": {"x_embedder.proj.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "bad_index" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "torn").mkdir()
    shutil.copy(ckpt / ".metadata", tmp_path / "torn" / ".metadata")
    return {
        "no such path": (tmp_path / "nope", "does not exist"),
        "no weights": (tmp_path / "empty", "holds no *.safetensors"),
        "unrecognised": (tmp_path / "foreign.safetensors", "unrecognised layout"),
        "missing": (tmp_path / "missing.safetensors", "lack 14 of the 134 tensors"),
        "unexpected": (tmp_path / "extra.safetensors", "double_blocks.9.img_mod.weight"),
        "shape": (
            tmp_path / "shape.safetensors",
            "patch_embed.bias: this model expects shape (64,), the file holds (65,)",
        ),
        "pickle": (tmp_path / "pickle.pt", "not a safetensors or weights-only torch file"),
        "damaged": (tmp_path / "damaged.safetensors", "is not a readable safetensors file"),
        "index without its files": (tmp_path / "bad_index", "names files that are missing"),
        "torn checkpoint": (tmp_path / "torn", "without manifest.json"),
        "run folder": (ckpt.parent.parent, "is a run folder; give one of its checkpoints"),
    }


def test_bad_inputs_are_one_config_error_naming_the_field(written, tmp_path):
    paths, sd = written
    for case, (path, phrase) in _bad_inputs(tmp_path, sd, paths["dcp"]).items():
        model = _fresh()
        before = _state(model)
        for call, target in ((check_init_from, _meta_dit()), (init_from, model)):
            with pytest.raises(ConfigError) as err:
                call(target, path)
            assert err.value.field == "model.init_from" and phrase in str(err.value), (case, str(err.value))
        _assert_equal(_state(model), before)  # nothing written


def test_checkpoint_of_another_model_size_is_refused(written):
    paths, _ = written
    with pytest.raises(ConfigError, match="model.init_from.*lack 14 of the 148"):
        init_from(_fresh(DiTConfig(**{**TINY.__dict__, "num_single_blocks": 3})), paths["dcp"])
    with pytest.raises(ConfigError, match="expects shape"):
        init_from(_fresh(DiTConfig(**{**TINY.__dict__, "head_dim": 16, "rope_axes_dim": (4, 6, 6)})), paths["dcp"])


# ---- the VAE ----


def test_vae_loads_from_diffusers_and_our_names(tmp_path):
    cfg = VAE_FLAVORS["vae-tiny"]
    sd = {k: v.clone() for k, v in _random(CausalVAE(cfg), seed=0).state_dict().items()}
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLHunyuanVideo"}))
    save_file(vae_to_diffusers(sd), tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    save_file(sd, tmp_path / "ours.safetensors")
    for path, layout in ((tmp_path / "diffusers", "diffusers"), (tmp_path / "ours.safetensors", "vidtron")):
        model = _random(CausalVAE(cfg), seed=1)
        assert init_from(model, path, kind="vae").layout == layout
        _assert_equal(_state(model), sd)
    with pytest.raises(ConfigError) as err:
        init_from(CausalVAE(cfg), tmp_path / "nope", kind="vae")
    assert err.value.field == "vae.init_from"


# ---- 2 gloo ranks: TP, FSDP2 from the meta device, a checkpoint resharded into TP ----


class _RecordingOpen:
    """Stands in for `safetensors.safe_open`: records (key, bytes) of every slice read and every whole read."""

    def __init__(self, real):
        self.real, self.reads, self.whole = real, [], []

    def __call__(self, path, framework):
        return _Handle(self.real(path, framework=framework), self)


class _Handle:
    def __init__(self, inner, rec: _RecordingOpen):
        self.inner, self.rec, self.f = inner, rec, None

    def __enter__(self):
        self.f = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        self.rec.whole.append(key)
        return self.f.get_tensor(key)

    def get_slice(self, key):
        return _Slice(self.f.get_slice(key), key, self.rec)


class _Slice:
    def __init__(self, inner, key: str, rec: _RecordingOpen):
        self.inner, self.key, self.rec = inner, key, rec

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.rec.reads.append((self.key, out.nbytes))
        return out


def _inputs() -> tuple:
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 16, 1, 4, 4, generator=g)
    text = torch.randn(1, 5, TINY.text_dim, generator=g)
    return latents, torch.tensor([500.0]), text, None, torch.randn(1, TINY.pooled_dim, generator=g)


def _parallel_case(path: str, dims_kw: dict, meta: bool, rec: _RecordingOpen) -> dict:
    """Build dit-tiny (random, or on the meta device), parallelize it with `dims_kw`, load `path`, run a forward."""
    from vidtron.models.dit.parallelize import parallelize_dit
    from vidtron.parallel.dims import ParallelDims

    dims = ParallelDims(**dims_kw)
    dims.build_mesh("cpu")
    with torch.device("meta" if meta else "cpu"):
        model = DiT(TINY)
    if not meta:
        _random(model, seed=123)
    parallelize_dit(model, dims)
    report = init_from(model, path, device="cpu" if meta else None)
    local = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())
    out = {"state": _state(model), "bytes_read": report.bytes_read, "local": local, "layout": report.layout}
    out |= {"sliced": sum(n for _, n in rec.reads), "whole": list(rec.whole), "reads": list(rec.reads)}
    with torch.no_grad():
        out["forward"] = model(*_inputs())
    return out


def _ranks(paths: dict[str, str], cases: dict[str, tuple[str, dict, bool]]) -> dict:
    """Every case (a format of `paths`, a layout, built on meta or not) on this rank, reads recorded per case."""
    real, out = weights_io.safe_open, {}
    for name, (fmt, dims_kw, meta) in cases.items():
        weights_io.safe_open = rec = _RecordingOpen(real)
        out[name] = _parallel_case(paths[fmt], dims_kw, meta, rec)
    weights_io.safe_open = real
    return out


def _check_ranks(results: list[dict], sd: dict[str, torch.Tensor]) -> None:
    """Gathered tensors equal `sd` bitwise; each rank read exactly the bytes it holds, all through get_slice; the
    forward matches one device to 1e-5 (TP sums partial products in another order: a few ulps; FSDP2 alone is
    the same math)."""
    model = DiT(TINY)
    model.load_state_dict(sd)
    with torch.no_grad():
        want_forward = model(*_inputs())
    total = sum(t.nbytes for t in sd.values())
    for rank, per_case in enumerate(results):
        for name, got in per_case.items():
            _assert_equal(got["state"], sd)
            torch.testing.assert_close(got["forward"], want_forward, atol=1e-5, rtol=0)
            if got["layout"] != "dcp":
                assert got["whole"] == [] and got["sliced"] == got["bytes_read"] == got["local"], (rank, name)
                assert got["local"] < total


WORLD2 = {
    "tp2_save_pretrained": ("save_pretrained", {"tp": 2}, False),
    "tp2_hunyuan": ("export_hunyuan", {"tp": 2}, False),
    "dp_shard2_meta_save_pretrained": ("save_pretrained", {"dp_shard": 2}, True),
    "tp2_dcp": ("dcp", {"tp": 2}, False),
}
WORLD4 = {
    "tp2_dp_shard2_save_pretrained": ("save_pretrained", {"tp": 2, "dp_shard": 2}, False),
    "tp2_dp_shard2_meta_hunyuan": ("export_hunyuan", {"tp": 2, "dp_shard": 2}, True),
    "dp_shard4_dcp": ("dcp", {"dp_shard": 4}, False),
}


def test_two_ranks_read_only_their_slices_and_match_one_rank(written):
    paths, sd = written
    results = run_ranks(_ranks, world_size=2, args=({k: str(v) for k, v in paths.items()}, WORLD2))
    _check_ranks(results, sd)
    for per_case in results:
        q = dict(per_case["tp2_save_pretrained"]["reads"])["transformer_blocks.0.attn.to_q.weight"]
        assert q == sd["double_blocks.0.img_attn.q.weight"].nbytes // 2  # this rank's 32 of 64 rows
    fsdp = [r["dp_shard2_meta_save_pretrained"]["bytes_read"] for r in results]
    assert sum(fsdp) == sum(t.nbytes for t in sd.values())  # FSDP2 shards every tensor: disjoint halves


@pytest.mark.slow
def test_four_ranks_tp_times_fsdp(written):
    """FSDP2 over TP DTensors (strided sharding on a 2D mesh), and a checkpoint resharded to dp_shard=4."""
    paths, sd = written
    results = run_ranks(_ranks, world_size=4, args=({k: str(v) for k, v in paths.items()}, WORLD4))
    _check_ranks(results, sd)
