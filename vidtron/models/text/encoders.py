"""Text encoders behind one interface: `encode(captions) -> TextBatch(states, mask, pooled)`.

`ByteTextEncoder` needs no downloads: UTF-8 bytes as tokens, a tiny frozen transformer with weights drawn
from a fixed seed, giving LLM-like hidden states [B, T, D] and a pooled vector [B, P] (the stand-ins for
HunyuanVideo's LLM states and CLIP pooled output). `HFTextEncoder` loads a real LLM and CLIP text model from
local paths (no hub access) when `transformers` is installed.

Legend: B captions, T text tokens, D text dim, P pooled dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vidtron.platform.errors import ConfigError

BOS, PAD, VOCAB = 256, 257, 258


@dataclass
class TextBatch:
    states: torch.Tensor  # [B, T, D] float
    mask: torch.Tensor  # [B, T] bool, True = valid, padding at the end
    pooled: torch.Tensor  # [B, P] float

    def index(self, idx: torch.Tensor) -> TextBatch:
        return TextBatch(self.states[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> TextBatch:
        return TextBatch(self.states.to(device), self.mask.to(device), self.pooled.to(device))


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


class HFTextEncoder:
    """A local LLM (hidden states) + CLIP text model (pooled), loaded with local_files_only=True."""

    def __init__(self, llm_path: str, clip_path: str, max_tokens: int):
        try:
            from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer
        except Exception as err:
            raise ConfigError(
                "text.encoder", "hf", "needs `pip install transformers`; or use text.encoder=byte"
            ) from err
        if not llm_path or not clip_path:
            raise ConfigError("text.llm_path/clip_path", (llm_path, clip_path), "give local folders for both")
        self.max_tokens = max_tokens
        self.llm_tok = AutoTokenizer.from_pretrained(llm_path, local_files_only=True)
        self.llm = AutoModel.from_pretrained(llm_path, local_files_only=True).eval()
        self.clip_tok = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
        self.clip = CLIPTextModel.from_pretrained(clip_path, local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextBatch:
        tok = self.llm_tok(
            captions, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        states = self.llm(**tok, output_hidden_states=True).hidden_states[-3]  # HunyuanVideo takes the third-last layer
        ctok = self.clip_tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = self.clip(**ctok).pooler_output
        return TextBatch(states=states.float(), mask=tok["attention_mask"].bool(), pooled=pooled.float())


def build_text_encoder(kind: str, dim: int, pooled_dim: int, max_tokens: int, llm_path: str = "", clip_path: str = ""):
    if kind == "byte":
        return ByteTextEncoder(dim, pooled_dim, max_tokens)
    if kind == "hf":
        return HFTextEncoder(llm_path, clip_path, max_tokens)
    raise ConfigError("text.encoder", kind, "choose 'byte' or 'hf'")
