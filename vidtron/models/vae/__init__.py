"""HunyuanVideo's causal 3D VAE (diffusers `AutoencoderKLHunyuanVideo`-compatible) and its tiled encode / decode."""

from vidtron.models.vae.configs import FLAVORS, VAEConfig
from vidtron.models.vae.model import CausalVAE

__all__ = ["FLAVORS", "CausalVAE", "VAEConfig"]
