"""Text encoders: built-in byte-level and word-level stand-ins (no downloads) and HunyuanVideo's LLM + CLIP from local
folders."""

from vidtron.models.text.encoders import ByteTextEncoder, TextBatch, build_text_encoder
from vidtron.models.text.words import WordTextEncoder

__all__ = ["ByteTextEncoder", "TextBatch", "WordTextEncoder", "build_text_encoder"]
