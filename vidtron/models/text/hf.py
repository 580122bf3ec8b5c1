"""HunyuanVideo's text conditioning from local Hugging Face folders: LLM hidden states + CLIP-L pooled output.

What it computes (the same as diffusers' `HunyuanVideoPipeline.encode_prompt` and the HunyuanVideo repo):
- LLM (a Llama, or the Llama text tower of a LLaVA checkpoint): each caption is put into the prompt template
  ("hunyuan-video": a system prompt asking for a detailed video description, then the caption as the user turn),
  tokenized right-padded / truncated to crop_start + llm_max_tokens tokens, run with its attention mask; the
  states are hidden_states[-(hidden_layer_skip + 1)] (the third-last layer for the default 2), and the first
  crop_start tokens (BOS + the template before the caption) are dropped from the states and the mask.
- CLIP text model: the caption alone, padded / truncated to clip_max_tokens (77), run without a mask (as
  diffusers does; CLIP is causal, so padding after the end token cannot change it); the pooled output is kept.
Each path is a model folder holding its tokenizer, or a diffusers HunyuanVideo folder (model_index.json) whose
text_encoder/ + tokenizer/ (LLM) and text_encoder_2/ + tokenizer_2/ (CLIP) are used.
A tokenizer without a pad token pads with its eos token (else its unk token), as diffusers' pipelines do;
padded positions are masked out and, the models being causal, do not change the valid states.

Legend: B captions, S LLM tokens before the crop (crop_start + T), T text tokens after the crop
(llm_max_tokens), D LLM width (the DiT's text_dim), P CLIP width (the DiT's pooled_dim), C CLIP tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.models.text.batch import TextBatch

# HunyuanVideo's LLM prompt template for video ("{}" is the caption); diffusers' DEFAULT_PROMPT_TEMPLATE.
HUNYUAN_VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
TEMPLATES = {"hunyuan-video": HUNYUAN_VIDEO_TEMPLATE, "none": "{}"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def template_text(template: str) -> str:
    """A template name (TEMPLATES) or a custom string with one "{}" -> the template string."""
    text = TEMPLATES.get(template, template)
    if text.count("{}") != 1:
        raise ConfigError("text.template", template, f"choose one of {sorted(TEMPLATES)} or a string with one {{}}")
    return text


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Device auto: cuda (this process's current device) when available, else cpu; dtype auto: float16 on cuda
    (HunyuanVideo's text-encoder precision), float32 on cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("text.device", device, "CUDA is not available here: use text.device=cpu (or auto)")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ConfigError("text.dtype", dtype, f"choose auto or one of {sorted(DTYPES)}")
    return dev, DTYPES[dtype]


def ensure_pad_token(tokenizer, field: str, path: str) -> None:
    """Give a tokenizer without a pad token its eos token (else unk) as the pad token; pad on the right, since
    the template crop counts from the front."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(field, path, "its tokenizer has no pad, eos or unk token: add a pad_token to it")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"


def model_and_tokenizer(path: str, model_sub: str, tokenizer_sub: str) -> tuple[str, str]:
    """A model folder that holds its tokenizer -> (path, path); a diffusers pipeline folder (model_index.json, e.g.
    a HunyuanVideo checkpoint) -> its (model, tokenizer) subfolders."""
    root = Path(path)
    if (root / "model_index.json").exists():
        return str(root / model_sub), str(root / tokenizer_sub)
    return path, path


def _width(config) -> int:
    """Hidden size of a text model config (a LLaVA config: of its text tower)."""
    return getattr(config, "text_config", config).hidden_size


def check_widths(llm_config, clip_config, text_dim: int, pooled_dim: int) -> None:
    """The LLM's width must be the DiT's text_dim and CLIP's its pooled_dim."""
    for field, got, want, name in (
        ("text.llm_path", _width(llm_config), text_dim, "text_dim"),
        ("text.clip_path", _width(clip_config), pooled_dim, "pooled_dim"),
    ):
        if got != want:
            fix = f"this model is {got} wide but the DiT's {name} is {want}: use a text model of width {want}"
            raise ConfigError(field, got, fix + f", or a model.flavor whose {name} is {got}")


class HFTextEncoder:
    """HunyuanVideo's LLM + CLIP text encoders from local folders (local_files_only: no hub access); `encode`
    returns a TextBatch on the CPU in float32 (exact for bfloat16 / float16 runs too)."""

    def __init__(
        self,
        llm_path: str,
        clip_path: str,
        text_dim: int,
        pooled_dim: int,
        *,
        template: str = "hunyuan-video",
        crop_start: int = -1,
        hidden_layer_skip: int = 2,
        llm_max_tokens: int = 256,
        clip_max_tokens: int = 77,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel
        except ImportError as err:
            fix = "needs `pip install transformers`; or use text.encoder=byte"
            raise ConfigError("text.encoder", "hf", fix) from err
        if not llm_path or not clip_path:
            raise ConfigError("text.llm_path/clip_path", (llm_path, clip_path), "give local folders for both")
        self.template = template_text(template)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.llm_max_tokens, self.clip_max_tokens = llm_max_tokens, clip_max_tokens
        llm_path, llm_tok_path = model_and_tokenizer(llm_path, "text_encoder", "tokenizer")
        clip_path, clip_tok_path = model_and_tokenizer(clip_path, "text_encoder_2", "tokenizer_2")
        llm_config = AutoConfig.from_pretrained(llm_path, local_files_only=True)
        check_widths(llm_config, AutoConfig.from_pretrained(clip_path, local_files_only=True), text_dim, pooled_dim)
        layers = getattr(llm_config, "text_config", llm_config).num_hidden_layers
        if not 0 <= hidden_layer_skip <= layers:
            raise ConfigError("text.hidden_layer_skip", hidden_layer_skip, f"must be in [0, {layers}] for this LLM")
        self.state_index = -(hidden_layer_skip + 1)  # into hidden_states: the embeddings + one entry per layer

        self.llm_tok = AutoTokenizer.from_pretrained(llm_tok_path, local_files_only=True)
        ensure_pad_token(self.llm_tok, "text.llm_path", llm_tok_path)
        self.crop_start = self._crop_start(crop_start, template)
        llm = AutoModel.from_pretrained(llm_path, local_files_only=True, dtype=self.dtype)
        self.llm = getattr(llm, "language_model", llm).to(self.device).eval().requires_grad_(False)  # LLaVA: text
        self.clip_tok = AutoTokenizer.from_pretrained(clip_tok_path, local_files_only=True)
        ensure_pad_token(self.clip_tok, "text.clip_path", clip_tok_path)
        clip = CLIPTextModel.from_pretrained(clip_path, local_files_only=True, dtype=self.dtype)
        self.clip = clip.to(self.device).eval().requires_grad_(False)

    def _crop_start(self, crop_start: int, template: str) -> int:
        """-1: the tokens before the caption, BOS + the template's prefix (what diffusers computes when crop_start is
        None; its fixed 95 is this count for HunyuanVideo's Llama-3 tokenizer), 0 for template=none (BOS kept). An
        explicit value may not reach into the caption."""
        if template == "none":
            prefix = 0
        else:
            prefix = len(self.llm_tok(self.template.split("{}")[0])["input_ids"])
        if crop_start > prefix:
            raise ConfigError("text.crop_start", crop_start, f"this tokenizer puts {prefix} tokens before the caption")
        return prefix if crop_start < 0 else crop_start

    @torch.no_grad()
    def encode_llm(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> states [B, T, D] in the encoder's dtype, mask [B, T] bool (on the encoder's device)."""
        tok = self.llm_tok(
            [self.template.replace("{}", c) for c in captions],  # = diffusers' format() for these templates
            padding="max_length",
            max_length=self.crop_start + self.llm_max_tokens,
            truncation=True,
            return_tensors="pt",
        )
        ids_BS, mask_BS = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.llm(input_ids=ids_BS, attention_mask=mask_BS, output_hidden_states=True)
        states_BSD = out.hidden_states[self.state_index]
        return states_BSD[:, self.crop_start :], mask_BS[:, self.crop_start :].bool()

    @torch.no_grad()
    def encode_clip(self, captions: list[str]) -> torch.Tensor:
        """-> pooled [B, P] in the encoder's dtype (on the encoder's device)."""
        tok = self.clip_tok(
            captions, padding="max_length", max_length=self.clip_max_tokens, truncation=True, return_tensors="pt"
        )
        return self.clip(input_ids=tok["input_ids"].to(self.device)).pooler_output

    def encode(self, captions: list[str]) -> TextBatch:
        states_BTD, mask_BT = self.encode_llm(captions)
        pooled_BP = self.encode_clip(captions)
        return TextBatch(states=states_BTD.float().cpu(), mask=mask_BT.cpu(), pooled=pooled_BP.float().cpu())
