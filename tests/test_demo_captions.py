"""Caption following: the detector on rendered clips, held-out combos in generated data, vidtron-eval, and a short
train -> sample run whose samples show the captioned colour far above chance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from vidtron.errors import ConfigError
from vidtron.launch.data import main as data_main
from vidtron.launch.eval import main as eval_main
from vidtron.platform.data.shards import read_clips
from vidtron.platform.data.synth import DIRECTIONS, ClipSpec, clip_spec, render_clip
from vidtron.platform.data.synth_media import parse_holdout, parse_size_range
from vidtron.platform.video_io import write_gif
from vidtron.recipes.dit_t2v.data import load_autoencoder
from vidtron.tools.caption_eval import (
    DEFAULT_HOLDOUT,
    all_combos,
    caption_for,
    detect,
    evaluate,
    evaluate_folder,
    parse_caption,
    read_gif,
    split_by_holdout,
)


@pytest.mark.parametrize("frames,height,width", [(9, 64, 64), (5, 48, 80)])
def test_detector_reads_rendered_clips(frames, height, width):
    specs = [clip_spec(1, i) for i in range(40)]
    result = evaluate([render_clip(s, frames, height, width) for s in specs], [s.caption for s in specs])
    acc = result["accuracy"]
    assert acc["colour"] == acc["shape"] == acc["direction"] == 1.0, acc
    assert acc["region"] >= 0.95 and acc["overall"] >= 0.95, acc  # a start centre on a region border can flip


def test_detector_reads_what_vidtron_sample_writes(tmp_path):
    """GIFs at 4x (palette-quantised) detect like the raw frames."""
    spec = clip_spec(0, 3)
    video = render_clip(spec, 9, 64, 64)
    frames = read_gif(write_gif(video, tmp_path / "a.gif", scale=4))
    assert frames.shape == (9, 256, 256, 3)
    assert detect(frames) == detect(video)


def test_noise_gets_a_guess_not_an_error():
    rng = np.random.default_rng(0)
    found = detect(rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8))
    assert found.colour and found.shape and found.direction and found.region


def test_captions_parse_and_held_out_prompts_look_like_training_captions():
    assert parse_caption("a red circle moves right from the middle left") == {
        "colour": "red",
        "shape": "circle",
        "direction": "right",
        "region": "middle left",
    }
    assert "region" not in parse_caption("a red circle moves right")
    with pytest.raises(ConfigError):
        parse_caption("a cat sleeps")
    training = {clip_spec(0, i).caption for i in range(3000)}
    assert {caption_for(c, k) for c in all_combos() for k in range(3)} == training  # the same 216 captions


def test_holdout_keeps_combos_out_and_leaves_the_default_stream_alone():
    holdout = parse_holdout(DEFAULT_HOLDOUT)
    assert len(holdout) == 12
    for attr in range(3):  # every word still appears in training
        assert {c[attr] for c in all_combos() if c not in holdout} == {c[attr] for c in all_combos()}
    for i in range(200):
        plain, held = clip_spec(0, i), clip_spec(0, i, holdout)
        assert (held.colour, held.shape, held.direction) not in holdout
        if (plain.colour, plain.shape, plain.direction) not in holdout:
            assert held == plain
    with pytest.raises(ConfigError, match="--holdout"):
        parse_holdout("red:hexagon:left")
    with pytest.raises(ConfigError, match="every combo"):
        parse_holdout(",".join(":".join(c) for c in all_combos()))


def test_shape_size_rescales_the_radius_and_nothing_else(tmp_path):
    """`vidtron-data synth --shape-size 0.18,0.25` (the demo's): the same clips as the default stream but for
    the radius, every shape inside the frame along its whole track, and the detector still reads them."""
    for i in range(200):
        plain, big = clip_spec(0, i), clip_spec(0, i, size_range=(0.18, 0.25))
        assert 0.18 <= big.size < 0.25 and big == dataclasses.replace(plain, size=big.size)
    specs = [clip_spec(2, i, size_range=(0.25, 0.25)) for i in range(60)]  # the largest allowed
    clips = [render_clip(s, 5, 64, 64) for s in specs]
    for spec in specs:  # the centre's track +- the radius stays within the frame (pixel i spans [i, i + 1))
        r, start = spec.size * 64, np.array(spec.start_yx) * 64
        track = np.stack([start, start + 0.4 * 64 * np.array(DIRECTIONS[spec.direction])])
        assert (track - r).min() >= -1e-6 and (track + r).max() <= 64 + 1e-6, spec
    assert evaluate(clips, [s.caption for s in specs])["accuracy"]["overall"] >= 0.95
    args = ["synth", "--out", str(tmp_path / "d"), "--clips", "4", "--frames", "1", "--height", "32", "--width", "32"]
    for bad in ("0.3,0.2", "0.2,0.3", "big"):
        assert data_main([*args, "--shape-size", bad]) == 2
    with pytest.raises(ConfigError, match="--shape-size='0.2,0.3'"):
        parse_size_range("0.2,0.3")
    assert not (tmp_path / "d").exists()
    assert data_main([*args, "--shape-size", "0.25,0.25"]) == 0
    for clip in read_clips(tmp_path / "d"):
        want = render_clip(clip_spec(0, int(clip.key), size_range=(0.25, 0.25)), 1, 32, 32)
        assert np.array_equal(clip.video, want)
    assert data_main(["fit-ae", "--root", str(tmp_path / "d"), "--latent-channels", "8"]) == 0  # refit, 8 wide
    assert load_autoencoder(tmp_path / "d").channels == 8
    mp4 = [*args[:2], str(tmp_path / "e"), *args[3:], "--format", "mp4", "--durations", "5"]
    assert data_main([*mp4, "--shape-size", "0.25,0.25"]) == 0


def test_synth_holdout_option(tmp_path):
    args = ["synth", "--out", str(tmp_path / "d"), "--clips", "24", "--frames", "1", "--height", "16", "--width", "16"]
    assert data_main([*args, "--holdout", "red:circle:left,blue:square:up"]) == 0
    assert json.loads((tmp_path / "d" / "holdout.json").read_text()) == {
        "holdout": ["blue:square:up", "red:circle:left"]
    }
    assert data_main([*args[:2], str(tmp_path / "e"), *args[3:], "--holdout", "red:circle"]) == 2


def test_eval_cli_scores_a_sample_folder(tmp_path, capsys):
    """vidtron-eval captions on files laid out like vidtron-sample's: real clips score 100%, split by holdout."""
    holdout = parse_holdout(DEFAULT_HOLDOUT)
    captions = [caption_for(c, 0) for c in sorted(holdout)[:3]] + [caption_for(("red", "circle", "right"), 1)]
    for i, spec in enumerate(_spec_for(c) for c in captions):
        write_gif(render_clip(spec, 9, 64, 64), tmp_path / f"sample_{i}.gif", scale=4)
        (tmp_path / f"sample_{i}.txt").write_text(spec.caption + "\n")
    out = tmp_path / "eval.json"
    assert eval_main(["captions", "--samples", str(tmp_path), "--holdout", DEFAULT_HOLDOUT, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "seen" in printed
    result = json.loads(out.read_text())
    assert result["accuracy"]["overall"] == 1.0
    assert result["split"]["held_out"]["n"] == 3 and result["split"]["seen"]["n"] == 1
    assert split_by_holdout(result, holdout)["seen"]["accuracy"]["overall"] == 1.0
    assert eval_main(["captions", "--samples", str(tmp_path / "nothing")]) == 2


def _spec_for(caption: str) -> ClipSpec:
    """A clip that shows `caption`, starting in the middle of its named region."""
    want = parse_caption(caption)
    vert, horiz = want["region"].split()
    start = ({"top": 0.3, "middle": 0.5, "bottom": 0.7}[vert], {"left": 0.3, "centre": 0.5, "right": 0.7}[horiz])
    return ClipSpec(want["shape"], want["colour"], want["direction"], start, 0.15, (30, 40, 20))


STEPS = 600  # optimizer steps of the short training (~15 s on one thread)
CHANNELS = 32  # latent channels of the stand-in autoencoder (16 by default)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """The demo's data, reduced to stills: 256 clips of 1 x 32 x 32 (4 DiT tokens), the demo's combos held out;
    its stand-in autoencoder has 32 channels (--latent-channels), so a non-default latent width runs through
    train -> sample -> decode."""
    out = tmp_path_factory.mktemp("captions") / "data"
    args = ["synth", "--out", str(out), "--clips", "256", "--frames", "1", "--height", "32", "--width", "32"]
    args += ["--latent-channels", str(CHANNELS)]
    assert data_main([*args, "--shard-size", "256", "--holdout", DEFAULT_HOLDOUT]) == 0
    return out


def test_model_must_take_the_autoencoders_channels(colour_data, tmp_path, capsys):
    """A 32-channel data root and a 16-channel model: refused before training, naming model.latent_channels, by
    both data paths."""
    from vidtron.launch.train import main as train_main

    args = [f"data.root={colour_data}", f"run_dir={tmp_path / 'run'}", "data.frames=1", "data.height=32"]
    args += ["data.width=32", "metrics.wandb=false", "trainer.steps=1"]
    for data_format in ("memory", "video"):  # latents encoded once into RAM; the streaming loader
        assert train_main([*args, f"data.format={data_format}"]) == 2
        want = f"model.latent_channels=0: the data's autoencoder gives {CHANNELS} latent channels"
        assert want in capsys.readouterr().err, data_format


def test_short_training_follows_the_colour_word(colour_data, tmp_path, one_torch_thread):
    """train -> checkpoint -> vidtron-sample (CFG) -> decode: the sampled clips show the captioned colour far above
    chance (1/6). A broken flow-matching sign, time convention, CFG or decode lands at or below chance. The demo's
    text encoder (text.encoder=words) makes the colour word easy to read, so a few hundred steps suffice."""
    from vidtron.launch.sample import main as sample_main
    from vidtron.launch.train import main as train_main

    run = tmp_path / "run"
    overrides = ["data.frames=1", "data.height=32", "data.width=32", "data.batch_size=16"]
    overrides += ["text.encoder=words", "text.max_tokens=12", "optim.lr=3e-3", f"trainer.steps={STEPS}"]
    overrides += [f"model.latent_channels={CHANNELS}"]
    overrides += ["metrics.wandb=false", "trainer.progress=false"]
    assert train_main([f"data.root={colour_data}", f"run_dir={run}", *overrides]) == 0
    prompts = [caption_for(c, k) for k, c in enumerate(all_combos()[::3])]  # 24: 4 per colour
    args = ["--run-dir", str(run), "--out", str(tmp_path / "samples"), "--steps", "10", "--shift", "1"]
    assert sample_main([*args, "--cfg-scale", "3", *(a for p in prompts for a in ("--prompt", p))]) == 0
    acc = evaluate_folder(tmp_path / "samples")["accuracy"]
    assert acc["colour"] >= 0.5, acc  # chance 1/6 (4.4 sigma below 0.5 at n=24); 600 steps reached 0.92


def test_demo_contact_sheet_shows_one_sample_per_combo(tmp_path):
    """held_out_samples.png: samples 0, every, 2 every, ... as rows of their frames at half the GIF's size."""
    from vidtron.launch.demo import contact_sheet

    captions = [caption_for(c, 0) for c in all_combos()[:6]]
    for i, caption in enumerate(captions):
        write_gif(render_clip(_spec_for(caption), 5, 32, 32), tmp_path / f"sample_{i}.gif", scale=4)
        (tmp_path / f"sample_{i}.txt").write_text(caption + "\n")
    sheet = contact_sheet(tmp_path, tmp_path / "sheet.png", every=2, rows=12)
    video = np.asarray(Image.open(sheet).convert("RGB"))
    assert video.shape == (3 * 64, 5 * 64, 3)  # 3 rows (samples 0, 2, 4) of 5 frames of 128 / 2 pixels
    assert sheet.with_suffix(".txt").read_text().splitlines() == [f"row {r}: {captions[2 * r]}" for r in range(3)]
    assert np.array_equal(video[:64, :64], read_gif(tmp_path / "sample_0.gif")[0, ::2, ::2])
