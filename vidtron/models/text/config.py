"""TextConfig: which text encoder conditions the DiT, and how (the `text:` section of the DiT recipes)."""

from __future__ import annotations

from dataclasses import dataclass

from vidtron.errors import ConfigError

# text.encoder: two built-in stand-ins (no downloads), HunyuanVideo's LLM + CLIP
TEXT_ENCODERS = ("byte", "words", "hf")


@dataclass
class TextConfig:
    """The text encoder. encoder=hf is HunyuanVideo's conditioning (vidtron/models/text/hf.py): LLM states with the
    prompt template and crop, CLIP-L pooled output, from local folders (no hub access)."""

    encoder: str = "byte"  # byte: built-in byte-token transformer; words: fixed word vectors (both no downloads);
    # hf: local LLM + CLIP paths
    max_tokens: int = 32  # encoder=byte / words: text tokens per caption (padded / truncated)
    llm_path: str = ""  # encoder=hf: local Llama / LLaVA-Llama folder + tokenizer, or a diffusers HunyuanVideo folder
    clip_path: str = ""  # encoder=hf: local CLIP text model folder + tokenizer, or a diffusers HunyuanVideo folder
    template: str = "hunyuan-video"  # encoder=hf: LLM prompt template: hunyuan-video, none, or a string with one {}
    crop_start: int = -1  # encoder=hf: tokens cut from the front; -1 = BOS + the template before the caption, counted
    hidden_layer_skip: int = 2  # encoder=hf: LLM states = hidden_states[-(hidden_layer_skip + 1)]
    llm_max_tokens: int = 256  # encoder=hf: LLM tokens per caption after the crop (padded / truncated)
    clip_max_tokens: int = 77  # encoder=hf: CLIP tokens per caption (its pooled output conditions the DiT)
    device: str = "cpu"  # encoder=hf: cpu, cuda, cuda:N, or auto (cuda when available)
    dtype: str = "float32"  # encoder=hf: float32, bfloat16, float16, or auto (float16 on cuda, float32 on cpu)

    TEMPLATES = ("hunyuan-video", "none")  # not a field (no annotation): the names vidtron/models/text/hf.py knows

    def __post_init__(self) -> None:
        if self.encoder not in TEXT_ENCODERS:
            fix = "choose 'byte' or 'words' (built-in) or 'hf' (local paths)"
            raise ConfigError("text.encoder", self.encoder, fix)
        for name in ("max_tokens", "llm_max_tokens", "clip_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text.{name}", getattr(self, name), "must be >= 1")
        if self.template not in self.TEMPLATES and self.template.count("{}") != 1:
            fix = f"choose {' or '.join(self.TEMPLATES)}, or a string with one {{}} where the caption goes"
            raise ConfigError("text.template", self.template, fix)
        if self.crop_start < -1:
            raise ConfigError("text.crop_start", self.crop_start, "must be >= 0, or -1 to count the template's tokens")
        if self.hidden_layer_skip < 0:
            raise ConfigError("text.hidden_layer_skip", self.hidden_layer_skip, "must be >= 0 (HunyuanVideo: 2)")
        kind, colon, index = self.device.partition(":")
        if not (self.device in ("cpu", "cuda", "auto") or (kind == "cuda" and colon and index.isdigit())):
            raise ConfigError("text.device", self.device, "choose cpu, cuda, cuda:N or auto")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError("text.dtype", self.dtype, "choose float32, bfloat16, float16 or auto")

    @property
    def tokens(self) -> int:
        """Text tokens per caption the DiT sees: llm_max_tokens for encoder=hf, max_tokens for the built-in encoders."""
        return self.llm_max_tokens if self.encoder == "hf" else self.max_tokens
