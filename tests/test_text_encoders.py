"""HunyuanVideo's text conditioning (text.encoder=hf) against diffusers' HunyuanVideoPipeline.encode_prompt.

Tiny random Llama + CLIP text models and tokenizers are built offline (a byte-level BPE trained here on the template
and the captions; a CLIP BPE from a vocab.json + merges.txt), saved to tmp_path, then loaded once by our encoder
from those folders and once into the pipeline. Both run the same models on the same token ids, so the states,
mask and pooled output must be bit-identical (tolerance 0).
"""

from __future__ import annotations

import json
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline  # noqa: E402
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from vidtron.errors import ConfigError  # noqa: E402
from vidtron.launch.data import main as data_main  # noqa: E402
from vidtron.models.dit.configs import FLAVORS  # noqa: E402
from vidtron.models.text import build_text_encoder  # noqa: E402
from vidtron.models.text.hf import HUNYUAN_VIDEO_TEMPLATE, TEMPLATES  # noqa: E402
from vidtron.platform.config import TextConfig  # noqa: E402
from vidtron.platform.data.index import LATENT_EXT, SampleIndex  # noqa: E402
from vidtron.platform.data.latents import load_latent_sample, load_uncond  # noqa: E402

TEXT_DIM, POOLED_DIM = FLAVORS["dit-tiny"].text_dim, FLAVORS["dit-tiny"].pooled_dim  # 64, 32: the encode CLI's DiT
LLM_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LONG = " ".join(["a green square turns slowly while the camera pans over a wooden table"] * 30)  # > 256 tokens
CAPTIONS = ["a red circle moves left", "", "A Blue triangle, spinning fast!", LONG]


def _llm_tokenizer(pad: bool, padding_side: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (like Llama 3's) that adds BOS; eos <|eot_id|>; pad <|end_of_text|> only when `pad`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=LLM_SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([HUNYUAN_VIDEO_TEMPLATE, *CAPTIONS[:3], "a red square moves right"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]
    )
    extra = {"pad_token": "<|end_of_text|>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", padding_side=padding_side, **extra
    )


def _clip_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE from a vocab.json + merges.txt (characters, characters + </w>, two merges)."""
    folder.mkdir()
    chars = string.ascii_lowercase + string.digits + ".,:'-!?"
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "re", "red</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: local folder}: llm (pad token, right padding), llm_nopad (no pad token, left padding), clip."""
    root = tmp_path_factory.mktemp("text_models")
    torch.manual_seed(0)
    llm_tok = _llm_tokenizer(pad=True, padding_side="right")
    llm_cfg = LlamaConfig(
        vocab_size=len(llm_tok),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    llm = LlamaModel(llm_cfg).eval()
    for name, tok in (("llm", llm_tok), ("llm_nopad", _llm_tokenizer(pad=False, padding_side="left"))):
        llm.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    clip_tok = _clip_tokenizer(root / "clip_files")
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=POOLED_DIM,
        intermediate_size=2 * POOLED_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    CLIPTextModel(clip_cfg).eval().save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    return {name: str(root / name) for name in ("llm", "llm_nopad", "clip")}


@pytest.fixture(scope="module")
def llava_folder(folders, tmp_path_factory):
    """A tiny LLaVA checkpoint whose Llama text tower has the weights of folders["llm"]."""
    text = LlamaModel.from_pretrained(folders["llm"])
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    cfg = LlavaConfig(text_config=text.config, vision_config=vision, image_token_index=text.config.vocab_size - 1)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.model.language_model.load_state_dict(text.state_dict())
    folder = tmp_path_factory.mktemp("llava") / "llava"
    llava.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folders["llm"]).save_pretrained(folder)
    return str(folder)


def _config(folders, llm: str = "llm", **kw) -> TextConfig:
    return TextConfig(encoder="hf", llm_path=folders[llm], clip_path=folders["clip"], **kw)


def _pipeline(folders, dtype: torch.dtype = torch.float32) -> HunyuanVideoPipeline:
    """diffusers' pipeline on the same folders (the tokenizer with a pad token; no transformer or VAE needed)."""
    return HunyuanVideoPipeline(
        text_encoder=LlamaModel.from_pretrained(folders["llm"], dtype=dtype).eval(),
        tokenizer=AutoTokenizer.from_pretrained(folders["llm"]),
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=CLIPTextModel.from_pretrained(folders["clip"], dtype=dtype).eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folders["clip"]),
    )


@pytest.fixture(scope="module")
def pipe(folders):
    return _pipeline(folders)


def _theirs(pipe, crop_start: int | None, captions=CAPTIONS, device: str = "cpu"):
    template = {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": crop_start}
    with torch.no_grad():
        return pipe.encode_prompt(captions, prompt_template=template, device=torch.device(device))


def _max_diffs(ours, theirs) -> dict[str, float]:
    states, pooled, mask = theirs
    return {
        "states": (ours.states - states.float().cpu()).abs().max().item(),
        "mask": (ours.mask.long() - mask.long().cpu()).abs().max().item(),
        "pooled": (ours.pooled - pooled.float().cpu()).abs().max().item(),
    }


def test_template_is_hunyuan_videos_and_config_names_match():
    assert HUNYUAN_VIDEO_TEMPLATE == DEFAULT_PROMPT_TEMPLATE["template"]
    assert set(TEMPLATES) == set(TextConfig.TEMPLATES)


def test_encoder_equals_hunyuan_video_pipeline(folders, pipe):
    enc = build_text_encoder(_config(folders), TEXT_DIM, POOLED_DIM)
    # crop_start counted: BOS + the template before the caption (diffusers' 95 is this count for Llama 3's tokenizer)
    prefix = enc.llm_tok(HUNYUAN_VIDEO_TEMPLATE.split("{}")[0])["input_ids"]
    assert enc.crop_start == len(prefix) and prefix[0] == enc.llm_tok.bos_token_id
    ours = enc.encode(CAPTIONS)
    theirs = _theirs(pipe, None)  # None: diffusers counts the template's tokens itself (its "{}" is one token here)
    assert ours.states.shape == (len(CAPTIONS), 256, TEXT_DIM) and ours.states.dtype == torch.float32
    assert ours.pooled.shape == (len(CAPTIONS), POOLED_DIM) and ours.mask.dtype == torch.bool
    assert _max_diffs(ours, theirs) == {"states": 0.0, "mask": 0.0, "pooled": 0.0}
    # the caption's tokens (+ <|eot_id|>) are valid, the rest padding; the long caption fills all 256
    n_tokens = ours.mask.sum(1).tolist()
    assert n_tokens[1] == 1 and n_tokens[3] == 256 and 1 < n_tokens[0] < 256
    assert all(ours.mask[i, :n].all() and not ours.mask[i, n:].any() for i, n in enumerate(n_tokens))


def test_tokenizer_without_pad_token_pads_with_eos_on_the_right(folders, pipe):
    nopad = AutoTokenizer.from_pretrained(folders["llm_nopad"])
    assert nopad.pad_token is None and nopad.padding_side == "left"
    enc = build_text_encoder(_config(folders, "llm_nopad"), TEXT_DIM, POOLED_DIM)
    assert enc.llm_tok.pad_token == "<|eot_id|>" and enc.llm_tok.padding_side == "right"
    ours = enc.encode(CAPTIONS)
    # diffusers' tokenizer pads with <|end_of_text|>: the valid states cannot depend on the pad id (causal, masked)
    states, pooled, mask = _theirs(pipe, enc.crop_start)
    assert torch.equal(ours.mask, mask.bool()) and torch.equal(ours.pooled, pooled)
    assert torch.equal(ours.states[ours.mask], states[mask.bool()])
    # and with the pipeline's tokenizer given the same fallback (diffusers' LTX-2 pipelines: pad_token = eos_token),
    # everything matches, padding included
    pipe_nopad = _pipeline(folders)
    pipe_nopad.tokenizer = nopad
    nopad.pad_token, nopad.padding_side = nopad.eos_token, "right"
    assert _max_diffs(ours, _theirs(pipe_nopad, enc.crop_start)) == {"states": 0.0, "mask": 0.0, "pooled": 0.0}


def test_skip_layer_crop_and_lengths_follow_the_config(folders, pipe):
    cfg = _config(folders, hidden_layer_skip=0, crop_start=5, llm_max_tokens=40, clip_max_tokens=20)
    enc = build_text_encoder(cfg, TEXT_DIM, POOLED_DIM)
    ours = enc.encode(CAPTIONS[:3])
    template = {"template": HUNYUAN_VIDEO_TEMPLATE, "crop_start": 5}
    with torch.no_grad():
        states, mask = pipe._get_llama_prompt_embeds(
            CAPTIONS[:3], template, device=torch.device("cpu"), max_sequence_length=40, num_hidden_layers_to_skip=0
        )
        pooled = pipe._get_clip_prompt_embeds(CAPTIONS[:3], device=torch.device("cpu"), max_sequence_length=20)
    assert ours.states.shape == (3, 40, TEXT_DIM)
    assert torch.equal(ours.states, states) and torch.equal(ours.mask, mask.bool()) and torch.equal(ours.pooled, pooled)
    none = build_text_encoder(_config(folders, template="none", llm_max_tokens=8), TEXT_DIM, POOLED_DIM)
    assert none.crop_start == 0 and none.encode(["a red circle"]).mask[0, 0]  # BOS kept: nothing to crop


def test_llava_checkpoint_uses_its_llama_text_tower(folders, llava_folder, pipe):
    enc = build_text_encoder(TextConfig(encoder="hf", llm_path=llava_folder, clip_path=folders["clip"]), 64, 32)
    assert type(enc.llm) is LlamaModel
    assert _max_diffs(enc.encode(CAPTIONS[:2]), _theirs(pipe, None, CAPTIONS[:2])) == {
        "states": 0,
        "mask": 0,
        "pooled": 0,
    }


def test_diffusers_hunyuan_video_folder(folders, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "hv")  # model_index.json, text_encoder/, tokenizer/, text_encoder_2/, ...
    cfg = TextConfig(encoder="hf", llm_path=str(tmp_path / "hv"), clip_path=str(tmp_path / "hv"))
    ours = build_text_encoder(cfg, TEXT_DIM, POOLED_DIM).encode(CAPTIONS[:2])
    assert _max_diffs(ours, _theirs(pipe, None, CAPTIONS[:2])) == {"states": 0, "mask": 0, "pooled": 0}


def test_dtype_and_device_come_from_the_config(folders):
    enc = build_text_encoder(_config(folders, dtype="bfloat16"), TEXT_DIM, POOLED_DIM)
    assert enc.llm.dtype == torch.bfloat16 and enc.clip.dtype == torch.bfloat16 and enc.device.type == "cpu"
    ours = enc.encode(CAPTIONS[:2])
    assert ours.states.dtype == torch.float32  # bfloat16 -> float32 is exact
    theirs = _theirs(_pipeline(folders, torch.bfloat16), enc.crop_start, CAPTIONS[:2])
    assert theirs[0].dtype == torch.bfloat16
    assert _max_diffs(ours, theirs) == {"states": 0.0, "mask": 0.0, "pooled": 0.0}
    if not torch.cuda.is_available():
        auto = build_text_encoder(_config(folders, device="auto", dtype="auto"), TEXT_DIM, POOLED_DIM)
        assert auto.device == torch.device("cpu") and auto.llm.dtype == torch.float32
        with pytest.raises(ConfigError, match="text.device='cuda'"):
            build_text_encoder(_config(folders, device="cuda"), TEXT_DIM, POOLED_DIM)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_runs_float16_on_cuda_like_the_pipeline(folders):
    enc = build_text_encoder(_config(folders, device="auto", dtype="auto"), TEXT_DIM, POOLED_DIM)
    assert enc.device.type == "cuda" and enc.llm.dtype == torch.float16 and enc.clip.dtype == torch.float16
    ours = enc.encode(CAPTIONS)
    assert ours.states.device.type == "cpu" and ours.states.dtype == torch.float32
    theirs = _theirs(_pipeline(folders, torch.float16).to("cuda"), None, CAPTIONS, "cuda")
    assert _max_diffs(ours, theirs) == {"states": 0.0, "mask": 0.0, "pooled": 0.0}  # same kernels, same inputs


def test_width_mismatch_and_bad_settings_are_config_errors(folders, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"text.llm_path=64: .*text_dim is 128"):
        build_text_encoder(_config(folders), 128, POOLED_DIM)
    with pytest.raises(ConfigError, match=r"text.clip_path=32: .*pooled_dim is 768"):
        build_text_encoder(_config(folders), TEXT_DIM, 768)
    with pytest.raises(ConfigError, match="text.hidden_layer_skip=4"):
        build_text_encoder(_config(folders, hidden_layer_skip=4), TEXT_DIM, POOLED_DIM)  # 3 layers: 0..3
    with pytest.raises(ConfigError, match="text.crop_start=999"):
        build_text_encoder(_config(folders, crop_start=999), TEXT_DIM, POOLED_DIM)
    bad = {"device": "gpu", "dtype": "fp8", "template": "hunyuan", "crop_start": -2, "llm_max_tokens": 0}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"text.{key}="):
            TextConfig(**{key: value})
    # the CLI refuses before it reads any data: one line, exit code 2 (dit-small wants 4096 / 768)
    hf = ["--text-encoder", "hf", "--llm-path", folders["llm"], "--clip-path", folders["clip"]]
    args = ["encode", "--root", str(tmp_path), "--out", str(tmp_path / "lat"), "--flavor", "dit-small", *hf]
    assert data_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text.llm_path=64" in err and "text_dim is 4096" in err
    manifest = {"encoder": "byte", "max_tokens": 8, "llm_path": ""}  # a run manifest's dict (fields added later)
    assert build_text_encoder(manifest, TEXT_DIM, POOLED_DIM).encode(["hi"]).states.shape == (1, 8, TEXT_DIM)


def test_latent_shards_hold_the_hf_states(folders, tmp_path):
    clips = tmp_path / "clips"
    args = ["synth", "--out", str(clips), "--clips", "3", "--frames", "5", "--height", "32", "--width", "32"]
    assert data_main(args) == 0
    out = tmp_path / "lat"
    args = ["encode", "--root", str(clips), "--out", str(out), "--buckets", "5x32x32", "--text-encoder", "hf"]
    assert (
        data_main([*args, "--llm-path", folders["llm"], "--clip-path", folders["clip"], "--llm-max-tokens", "48"]) == 0
    )
    enc = build_text_encoder(_config(folders, llm_max_tokens=48), TEXT_DIM, POOLED_DIM)
    lat = SampleIndex(out, (LATENT_EXT,))
    assert len(lat) == 3
    for entry in lat.entries:
        cached, want = load_latent_sample(lat.read(entry)), enc.encode([entry.caption])
        assert cached["states"].shape == (48, TEXT_DIM) and torch.equal(cached["mask"], want.mask[0])
        # the shard's captions ran as one batch: float sums may group differently than for one caption
        torch.testing.assert_close(cached["states"], want.states[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached["pooled"], want.pooled[0], rtol=0, atol=1e-5)
    uncond, empty = load_uncond(out), enc.encode([""])
    assert torch.equal(uncond.states, empty.states) and torch.equal(uncond.mask, empty.mask)
