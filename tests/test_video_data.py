"""Video data at scale: mp4 synth, decode + frame sampling + resize, corrupt samples, latent shards, training."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import run_training
from vidtron.errors import ConfigError, DataError
from vidtron.launch.data import fit_autoencoder
from vidtron.launch.data import main as data_main
from vidtron.models.vae import FLAVORS, CausalVAE
from vidtron.models.vae.configs import to_diffusers_config
from vidtron.models.vae.state_dict_adapter import to_diffusers
from vidtron.platform.checkpoint import committed_checkpoints
from vidtron.platform.config import BucketConfig, DataConfig
from vidtron.platform.data.index import LATENT_EXT, SampleIndex, write_tar
from vidtron.platform.data.latents import load_latent_sample, to_model_input
from vidtron.platform.data.loader import BucketLoader
from vidtron.platform.data.synth import clip_spec, render_clip
from vidtron.platform.data.synth_media import media_sample
from vidtron.platform.data.video import (
    DecodeRequest,
    decode_cpu,
    encode_video,
    frame_indices,
    make_decoder,
    resize_crop,
)
from vidtron.platform.metrics import read_metrics
from vidtron.recipes.dit_t2v.stream import build_latent_encoder
from vidtron.recipes.dit_t2v.task import DiTTextToVideo
from vidtron.recipes.registry import compose_config

BUCKETS = [(9, 64, 64, 4), (5, 48, 80, 4), (17, 64, 64, 2), (1, 64, 64, 6), (1, 48, 80, 6)]
BUCKET_ARG = (
    "data.buckets=[" + ",".join(f"{{frames:{f},height:{h},width:{w},max_batch:{b}}}" for f, h, w, b in BUCKETS) + "]"
)
SHAPES_ARG = ",".join(f"{f}x{h}x{w}" for f, h, w, _ in BUCKETS)


@pytest.fixture(scope="module")
def mp4_data(tmp_path_factory):
    """24 clips as mp4 (1-frame ones as png): 1, 5, 9 or 17 frames at 64x64 or 48x80, 3 shards."""
    out = tmp_path_factory.mktemp("mp4") / "clips"
    args = ["synth", "--out", str(out), "--clips", "24", "--format", "mp4", "--shard-size", "8"]
    assert data_main([*args, "--durations", "1,5,9,17", "--sizes", "64x64,48x80"]) == 0
    return out


def _members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_synth_mp4_writes_real_videos(mp4_data, tmp_path):
    members = _members(mp4_data / "shard-00000.tar")
    exts = {name.split(".", 1)[1] for name in members}
    assert exts <= {"mp4", "png", "json"} and "mp4" in exts
    name = next(n for n in members if n.endswith(".mp4"))
    meta = json.loads(members[name.replace(".mp4", ".json")])
    (tmp_path / "a.mp4").write_bytes(members[name])
    import av

    with av.open(str(tmp_path / "a.mp4")) as container:  # a real file any player opens
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (meta["frames"], meta["height"], meta["width"], 3)
    want = render_clip(clip_spec(0, meta["index"]), meta["frames"], meta["height"], meta["width"])
    assert np.abs(frames.astype(int) - want).mean() < 4  # lossy H.264 / MPEG-4, close to the rendered clip
    webm = encode_video(want, "webm")
    got = decode_cpu(DecodeRequest(webm, "webm", tuple(range(meta["frames"])), meta["height"], meta["width"]))
    assert np.abs(got.astype(int) - want).mean() < 4


def test_decode_samples_frames_with_interval_and_resizes_to_bucket():
    video = render_clip(clip_spec(0, 3), 17, 48, 80)  # [17, 48, 80, 3]
    idx = (1, 3, 5, 7, 9)
    buf = io.BytesIO()
    np.save(buf, video)
    from_npy = decode_cpu(DecodeRequest(buf.getvalue(), "video.npy", idx, 64, 64))
    assert from_npy.shape == (5, 64, 64, 3)
    np.testing.assert_array_equal(from_npy, resize_crop(video[list(idx)], 64, 64))
    from_mp4 = decode_cpu(DecodeRequest(encode_video(video, "mp4"), "mp4", idx, 64, 64))
    assert from_mp4.shape == (5, 64, 64, 3)
    assert np.abs(from_mp4.astype(int) - from_npy).mean() < 6  # swscale vs torch resize, plus the codec
    with pytest.raises(DataError, match="needs 17"):  # 9 frames every 2nd from a 9-frame clip
        frame_indices(9, 9, 2, 0)


def _dali_usable() -> bool:
    try:
        make_decoder("dali")
        return True
    except ConfigError:
        return False


@pytest.mark.skipif(_dali_usable(), reason="DALI and CUDA are present")
def test_dali_without_dali_or_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="data.decoder='dali'.*data.decoder=cpu"):
        make_decoder("dali")


@pytest.mark.gpu
@pytest.mark.skipif(not _dali_usable(), reason="needs nvidia-dali and CUDA")
def test_dali_matches_cpu_decode():
    video = render_clip(clip_spec(0, 5), 17, 48, 80)
    req = DecodeRequest(encode_video(video, "mp4"), "mp4", (0, 4, 8, 12, 16), 64, 64)
    (gpu,) = make_decoder("dali").decode([req])
    assert gpu.shape == (5, 64, 64, 3) and gpu.dtype == np.uint8
    assert np.abs(gpu.astype(int) - decode_cpu(req)).mean() < 6


def _corrupt_root(root):
    """2 shards: 10 good clips, plus garbage video bytes, a truncated mp4, bad JSON and a sample with no JSON."""
    root.mkdir()
    good = [media_sample(0, i, "mp4", [5, 9], [(64, 64)]) for i in range(10)]
    _, bad_bytes = media_sample(0, 10, "mp4", [9], [(64, 64)])
    _, cut = media_sample(0, 11, "mp4", [9], [(64, 64)])
    cut["mp4"] = cut["mp4"][: len(cut["mp4"]) // 2]
    bad_bytes["mp4"] = b"\x00garbage" * 200
    _, bad_json = media_sample(0, 12, "mp4", [9], [(64, 64)])
    bad_json["json"] = b'{"caption": "unterminated'
    _, no_json = media_sample(0, 13, "mp4", [9], [(64, 64)])
    no_json.pop("json")
    write_tar(root / "a.tar", [*good[:5], ("garbage", bad_bytes), ("badjson", bad_json)])
    write_tar(root / "b.tar", [*good[5:], ("truncated", cut), ("nojson", no_json)])
    return root


def test_corrupt_samples_are_skipped_counted_and_training_continues(tmp_path):
    root = _corrupt_root(tmp_path / "bad")
    fit_autoencoder(root)  # skips the unreadable clips too
    cfg = DataConfig(root=str(root), format="video", buckets=[BucketConfig(5, 64, 64, 4)])
    loader = BucketLoader(cfg, seed=0)
    assert loader.skipped == {"bad json": 1, "no json member": 1}  # found while indexing
    assert len(loader.index) == 12
    for cursor in range(loader.plan.batches_per_epoch):
        lb = loader.local_batch(cursor, 0, 1)
        loader.pixels(lb)
        names = [loader.index.entries[it.sample].key for it in lb.items]
        assert [w == 0 for w in lb.weight.tolist()] == [n in ("garbage", "truncated") for n in names]
    assert loader.skipped == {"bad json": 1, "no json member": 1, "unreadable media": 2}  # found while decoding
    assert {(s, k) for s, k, r in loader.index.skips.samples if r == "unreadable media"} == {
        ("a.tar", "garbage"),
        ("b.tar", "truncated"),
    }
    state = run_training(
        root,
        tmp_path / "run",
        "data.format=video",
        "data.buckets=[{frames:5,height:64,width:64,max_batch:4}]",
        "trainer.steps=4",
    )
    assert len(state.losses) == 4 and all(math.isfinite(x) for x in state.losses)


def test_unreadable_shards_raise_or_keep_what_they_can(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    write_tar(root / "a.tar", [media_sample(0, i, "mp4", [5], [(64, 64)]) for i in range(4)])
    data = (root / "a.tar").read_bytes()
    (root / "a.tar").write_bytes(data[: int(len(data) * 0.6)])  # truncated tar: the first samples survive
    index = SampleIndex(root)
    assert 1 <= len(index) < 4 and index.skips.counts["truncated or corrupt tar"] == 1
    (root / "b.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match="b.tar has no readable sample"):
        SampleIndex(root)


def test_encode_writes_latent_shards_over_ranks(mp4_data, tmp_path):
    out = tmp_path / "latents"
    for rank in range(2):
        args = ["encode", "--root", str(mp4_data), "--out", str(out), "--buckets", SHAPES_ARG, "--seed", "0"]
        assert data_main([*args, "--rank", str(rank), "--world", "2", "--shard-size", "5"]) == 0
    assert {p.name for p in out.glob("*.tar")} >= {"latents-r000-00000.tar", "latents-r001-00000.tar"}
    raw, lat = SampleIndex(mp4_data), SampleIndex(out, (LATENT_EXT,))
    assert sorted(e.key for e in lat.entries) == sorted(e.key for e in raw.entries)  # every sample once
    # the cached latents equal what format=video computes on the fly at epoch 0
    cfg = DataConfig(root=str(mp4_data), format="video", buckets=[BucketConfig(*b) for b in BUCKETS])
    loader, encoder = BucketLoader(cfg, seed=0), build_latent_encoder(mp4_data)
    lb = loader.local_batch(0, 0, 1)
    on_the_fly = encoder(to_model_input(loader.pixels(lb)))
    by_key = {e.key: e for e in lat.entries}
    for row, item in enumerate(lb.items):
        cached = load_latent_sample(lat.read(by_key[loader.index.entries[item.sample].key]), item.image)
        torch.testing.assert_close(cached["latents"], on_the_fly[row], rtol=0, atol=1e-5)


def test_encode_with_a_causal_vae_folder(mp4_data, tmp_path):
    torch.manual_seed(0)
    vae = CausalVAE(FLAVORS["vae-tiny"]).eval()
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(vae.config)))
    save_file(to_diffusers(vae.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    args = ["encode", "--root", str(mp4_data), "--out", str(tmp_path / "lat"), "--buckets", "9x64x64,1x64x64"]
    assert data_main([*args, "--vae", str(folder), "--world", "4", "--rank", "3"]) == 0  # a quarter: 6 clips
    lat = SampleIndex(tmp_path / "lat", (LATENT_EXT,))
    entry = lat.entries[0]
    sample = load_latent_sample(lat.read(entry))
    f = 1 + (entry.frames - 1) // 4
    assert sample["latents"].shape == (16, f, 8, 8) and sample["states"].shape == (32, 64)
    assert 0 < len(lat) <= 6


def test_train_from_buckets_resumes_exactly_and_reads_latents(mp4_data, tmp_path):
    common = ["data.format=video", BUCKET_ARG, "trainer.steps=6", "seed=2", "optim.warmup_steps=2"]
    whole = run_training(mp4_data, tmp_path / "whole", *common)
    first = run_training(mp4_data, tmp_path / "split", *common, "trainer.stop_after_steps=3")
    second = run_training(mp4_data, tmp_path / "split", *common)
    assert first.losses + second.losses == whole.losses
    manifest = json.loads((committed_checkpoints(tmp_path / "split")[-1] / "manifest.json").read_text())
    assert manifest["data"] == {"cursor": 6, "skip": [], "cursor_unit": "global_batches"}  # global batches consumed
    out = tmp_path / "lat"
    assert data_main(["encode", "--root", str(mp4_data), "--out", str(out), "--buckets", SHAPES_ARG]) == 0
    state = run_training(
        out, tmp_path / "latent", "data.format=latent", BUCKET_ARG, "data.image_ratio=0.3", "trainer.steps=4"
    )
    assert len(state.losses) == 4 and all(math.isfinite(x) for x in state.losses)


def test_weighted_loss_does_not_depend_on_dp(mp4_data, tmp_path):
    """A 3-sample batch: dp=1's loss == the mean of dp=2's rank losses (one rank has a padding row)."""
    cfg = compose_config(
        [
            f"data.root={mp4_data}",
            f"run_dir={tmp_path}",
            "data.format=video",
            "data.buckets=[{frames:5,height:48,width:80,max_batch:3}]",
        ]
    )
    task = DiTTextToVideo(cfg)
    model = task.materialize(task.build_model(), torch.device("cpu"))  # build_model gives meta tensors
    cursor = next(c for c in range(20) if len(task.stream.loader.plan.at(c)[1].items) == 3)
    one = task.loss(model, task.local_batch(1, cursor, 0, 1), torch.device("cpu"))
    two = [task.loss(model, task.local_batch(1, cursor, r, 2), torch.device("cpu")) for r in range(2)]
    torch.testing.assert_close(one, (two[0] + two[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~70 s on 2 shared cores: torchrun with 2, then 4 processes
def test_real_two_then_four_processes_match_one(mp4_data, tmp_path):
    """4 steps on 2 ranks, resumed on 4 ranks for 4 more: the losses of one process, to 1e-5 (FSDP reduction order)."""
    args = [
        f"data.root={mp4_data}",
        "data.format=video",
        BUCKET_ARG,
        "trainer.steps=8",
        "metrics.wandb=false",
        "seed=1",
    ]
    cmd = [sys.executable, "-m", "vidtron.launch.train", *args, f"run_dir={tmp_path / 'multi'}"]
    subprocess.run([*cmd, "trainer.stop_after_steps=4", "launcher.nproc_per_node=2"], check=True, timeout=600)
    subprocess.run([*cmd, "launcher.nproc_per_node=4"], check=True, timeout=600)
    single = run_training(mp4_data, tmp_path / "one", "data.format=video", BUCKET_ARG, "trainer.steps=8", "seed=1")
    multi = [r["loss"] for r in read_metrics(tmp_path / "multi")]
    assert len(multi) == 8 and max(abs(a - b) for a, b in zip(multi, single.losses)) < 1e-5
    events = [json.loads(x) for x in (tmp_path / "multi" / "events.jsonl").read_text().splitlines()]
    assert [e["layout"] for e in events if e["event"] == "start"] == ["dp_shard2", "dp_shard4"]
