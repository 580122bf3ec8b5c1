"""text.encoder=words: fixed word vectors, deterministic, order-aware pooling, padded like the byte encoder."""

from __future__ import annotations

import pytest
import torch

from vidtron.errors import ConfigError
from vidtron.models.text.config import TextConfig
from vidtron.models.text.encoders import build_text_encoder
from vidtron.models.text.words import WordTextEncoder

CAPTIONS = ["a red circle moves right from the middle left", "a red circle moves left from the middle right", ""]


def test_shapes_mask_and_determinism():
    enc = build_text_encoder(TextConfig(encoder="words", max_tokens=12), 64, 32)
    assert isinstance(enc, WordTextEncoder)
    batch = enc.encode(CAPTIONS)
    assert batch.states.shape == (3, 12, 64) and batch.pooled.shape == (3, 32)
    assert batch.mask.sum(1).tolist() == [10, 10, 1]  # BOS + 9 words; the empty caption is BOS alone
    assert not batch.states[~batch.mask].any()  # padding is zero
    again = WordTextEncoder(64, 32, 12).encode(CAPTIONS)
    assert torch.equal(batch.states, again.states) and torch.equal(batch.pooled, again.pooled)


def test_a_word_has_one_vector_wherever_it_stands():
    enc = WordTextEncoder(16, 8, max_tokens=12)
    a, b = enc.encode(["a red circle", "a blue circle"]).states, enc.encode(["the red square"]).states
    assert torch.equal(a[0, 2], b[0, 2])  # "red" after BOS and one word, in different captions
    assert torch.equal(a[0, 3], a[1, 3])  # "circle" in the same slot
    assert not torch.allclose(a[0, 2], a[1, 2])  # "red" vs "blue"
    moved = enc.encode(["red"]).states[0, 1]  # "red" right after BOS: the same word vector, another position's
    assert not torch.allclose(moved, a[0, 2])


def test_pooled_keeps_word_order():
    pooled = WordTextEncoder(64, 32, max_tokens=12).encode(CAPTIONS[:2]).pooled
    assert (pooled[0] - pooled[1]).norm() > 0.3 * pooled[0].norm()  # the same bag of words, swapped slots


def test_truncates_and_ignores_case_and_punctuation():
    enc = WordTextEncoder(8, 4, max_tokens=3)
    batch = enc.encode(["A Red, circle moves", "a red"])
    assert batch.mask.sum(1).tolist() == [3, 3]
    assert torch.equal(batch.states[0], batch.states[1])


def test_unknown_encoder_names_the_choices():
    with pytest.raises(ConfigError, match="words"):
        TextConfig(encoder="bytes")
