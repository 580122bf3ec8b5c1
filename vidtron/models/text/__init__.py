"""Text encoders: a built-in byte-level encoder (no downloads) and HunyuanVideo's LLM + CLIP from local folders."""

from vidtron.models.text.encoders import ByteTextEncoder, TextBatch, build_text_encoder

__all__ = ["ByteTextEncoder", "TextBatch", "build_text_encoder"]
