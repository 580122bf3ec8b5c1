"""Text encoders behind one interface: `encode(captions) -> TextBatch(states, mask, pooled)`.

`ByteTextEncoder` needs no downloads: UTF-8 bytes as tokens, a tiny frozen transformer with weights drawn
from a fixed seed, giving LLM-like hidden states [B, T, D] and a pooled vector [B, P] (the stand-ins for
HunyuanVideo's LLM states and CLIP pooled output); `WordTextEncoder` (words.py) gives each word a fixed vector
instead (no downloads either; easy to compose, for small demos). `HFTextEncoder` (hf.py) computes HunyuanVideo's real
conditioning from a local LLM and CLIP text model (no hub access) when `transformers` is installed.

Legend: B captions, T text tokens, D text dim, P pooled dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from vidtron.errors import ConfigError
from vidtron.models.text.batch import TextBatch
from vidtron.models.text.config import TextConfig
from vidtron.models.text.words import WordTextEncoder

BOS, PAD, VOCAB = 256, 257, 258


class ByteTextEncoder(nn.Module):
    """Frozen byte-token transformer; deterministic for a given (dims, seed)."""

    def __init__(
        self, dim: int, pooled_dim: int, max_tokens: int = 32, layers: int = 2, width: int = 64, seed: int = 0
    ):
        super().__init__()
        self.max_tokens = max_tokens
        heads = 4 if width % 4 == 0 else 1
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.zeros(max_tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.to_states = nn.Linear(width, dim)
        self.to_pooled = nn.Linear(width, pooled_dim)
        self._init(seed)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, T] long, mask [B, T] bool (BOS first, padding at the end)."""
        ids = torch.full((len(captions), self.max_tokens), PAD, dtype=torch.long)
        for i, text in enumerate(captions):
            toks = [BOS, *text.encode("utf-8")][: self.max_tokens]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, ids != PAD

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextBatch:
        ids, mask = self.tokenize(captions)
        h = self.embed(ids) + self.pos  # [B, T, width]
        h = self.blocks(h, src_key_padding_mask=~mask)
        states = torch.nn.functional.layer_norm(self.to_states(h), (self.to_states.out_features,))
        states = states * mask.unsqueeze(-1)
        mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # [B, width]
        return TextBatch(states=states, mask=mask, pooled=self.to_pooled(mean))


def _text_config(text) -> TextConfig:
    """A TextConfig, or its dict form from a run manifest (keys it lacks take TextConfig's defaults)."""
    if isinstance(text, TextConfig):
        return text
    if isinstance(text, Mapping):
        known = {f.name for f in dataclasses.fields(TextConfig)}
        return TextConfig(**{k: v for k, v in text.items() if k in known})
    raise TypeError(f"expected a TextConfig or a dict, got {type(text).__name__}")


def build_text_encoder(text: TextConfig | Mapping, text_dim: int, pooled_dim: int):
    """The text encoder of a run's `text` config whose outputs fit a DiT with these widths (checked for hf before
    any weights load: a ConfigError names the mismatch)."""
    cfg = _text_config(text)
    if cfg.encoder == "byte":
        return ByteTextEncoder(text_dim, pooled_dim, cfg.max_tokens)
    if cfg.encoder == "words":
        return WordTextEncoder(text_dim, pooled_dim, cfg.max_tokens)
    if cfg.encoder == "hf":
        from vidtron.models.text.hf import HFTextEncoder  # imports transformers only when asked for

        return HFTextEncoder(
            cfg.llm_path,
            cfg.clip_path,
            text_dim,
            pooled_dim,
            template=cfg.template,
            crop_start=cfg.crop_start,
            hidden_layer_skip=cfg.hidden_layer_skip,
            llm_max_tokens=cfg.llm_max_tokens,
            clip_max_tokens=cfg.clip_max_tokens,
            device=cfg.device,
            dtype=cfg.dtype,
        )
    raise ConfigError("text.encoder", cfg.encoder, "choose 'byte', 'words' or 'hf'")
