"""vidtron: a 5D-parallel training platform for large video diffusion models."""

__version__ = "0.1.0"
