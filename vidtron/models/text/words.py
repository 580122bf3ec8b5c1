"""`WordTextEncoder` (text.encoder=words): a download-free stand-in whose outputs name each word outright.

Each word (lower-cased runs of letters and digits, after a BOS token) gets a fixed Gaussian vector drawn from a
generator keyed by (seed, word): no vocabulary, no hash buckets, so two words never share a vector. Token k's state
is its word vector plus the fixed vector of position k; the pooled vector sums the words' pooled-width vectors, each
bound to its position by a fixed random sign per channel, so it keeps the word order ("moves left from the middle
right" and "moves right from the middle left" pool apart). Nothing is learned: a DiT reads colour, shape and
direction from fixed slots, which makes new combinations of seen words easy to compose (the `make demo` task).

Legend: B captions, T text tokens, D text dim, P pooled dim.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from vidtron.models.text.batch import TextBatch

BOS = "<bos>"
WORD_RE = re.compile(r"[a-z0-9]+")


class WordTextEncoder(nn.Module):
    """Frozen word-vector encoder; deterministic for a given (dims, max_tokens, seed)."""

    def __init__(self, dim: int, pooled_dim: int, max_tokens: int = 16, seed: int = 0):
        super().__init__()
        self.dim, self.pooled_dim, self.max_tokens, self.seed = dim, pooled_dim, max_tokens, seed
        self.register_buffer("pos_TD", _gaussian(f"{seed}/position", (max_tokens, dim)), persistent=False)
        signs = _gaussian(f"{seed}/binding", (max_tokens, pooled_dim)).sign()
        self.register_buffer("bind_TP", torch.where(signs == 0, 1.0, signs), persistent=False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokenize(self, captions: list[str]) -> list[list[str]]:
        """Each caption as [BOS, word, ...], cut to max_tokens."""
        return [[BOS, *WORD_RE.findall(text.lower())][: self.max_tokens] for text in captions]

    def word_vectors(self, word: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The word's fixed (state vector [D], pooled vector [P])."""
        if word not in self._cache:
            self._cache[word] = (
                _gaussian(f"{self.seed}/state/{word}", (self.dim,)),
                _gaussian(f"{self.seed}/pooled/{word}", (self.pooled_dim,)),
            )
        return self._cache[word]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextBatch:
        tokens = self.tokenize(captions)
        states = torch.zeros(len(captions), self.max_tokens, self.dim)  # [B, T, D]
        pooled = torch.zeros(len(captions), self.pooled_dim)  # [B, P]
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)  # [B, T]
        for i, words in enumerate(tokens):
            n = len(words)
            state_nD, pooled_nP = (torch.stack(v) for v in zip(*(self.word_vectors(w) for w in words)))
            states[i, :n] = (state_nD + self.pos_TD[:n]) / 2**0.5  # unit variance per channel
            pooled[i] = (pooled_nP * self.bind_TP[:n]).sum(0) / n**0.5
            mask[i, :n] = True
        return TextBatch(states=states, mask=mask, pooled=pooled)


def _gaussian(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) values drawn from a generator keyed by a string (stable across runs, processes and platforms)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen)
