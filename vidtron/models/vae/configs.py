"""VAEConfig, the named flavors, and conversion to / from diffusers' `AutoencoderKLHunyuanVideo` config.

The field names equal diffusers' constructor arguments (they are already clear); `to_diffusers_config` and
`from_diffusers_config` are still the only place the two vocabularies meet.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidtron.errors import ConfigError

_DOWN_BLOCK = "HunyuanVideoDownBlock3D"  # the only block type diffusers' HunyuanVideo encoder builds
_UP_BLOCK = "HunyuanVideoUpBlock3D"  # the only block type diffusers' HunyuanVideo decoder builds
_ACTIVATIONS = ("silu", "swish")  # diffusers' names for the same SiLU
_FIELDS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "norm_num_groups",
    "scaling_factor",
    "spatial_compression_ratio",
    "temporal_compression_ratio",
    "mid_block_add_attention",
)


@dataclass
class VAEConfig:
    """Shape of HunyuanVideo's causal 3D VAE. Defaults are the released "884-16c" model (`vae-884-16c`)."""

    in_channels: int = 3  # video channels in (RGB in [-1, 1])
    out_channels: int = 3  # video channels out
    latent_channels: int = 16  # latent channels C (the DiT's in_channels)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per down block (up blocks reversed)
    layers_per_block: int = 2  # resnets per down block; up blocks have layers_per_block + 1
    act_fn: str = "silu"  # resnet activation ("silu" == "swish")
    norm_num_groups: int = 32  # GroupNorm groups; divides every entry of block_out_channels
    scaling_factor: float = 0.476986  # z_dit = z * scaling_factor puts latents at ~unit variance for the DiT
    spatial_compression_ratio: int = 8  # H, W -> H / s, W / s; a power of two, one x2 per block from the first
    temporal_compression_ratio: int = 4  # F = 4k+1 -> k+1 (first frame alone); only 4 is supported (diffusers too)
    mid_block_add_attention: bool = True  # causal self-attention in the encoder's and decoder's mid block
    gradient_checkpointing: bool = False  # recompute each down / mid / up block in backward (not a diffusers key)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)  # YAML / JSON give lists
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.act_fn not in _ACTIVATIONS:
            raise ConfigError("vae.act_fn", self.act_fn, f"use one of {_ACTIVATIONS}")
        if not self.scaling_factor > 0:
            raise ConfigError("vae.scaling_factor", self.scaling_factor, "must be > 0 (0.476986 for HunyuanVideo)")
        self._check_blocks()
        self._check_compression()

    def _check_blocks(self) -> None:
        blocks = self.block_out_channels
        if len(blocks) < 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in blocks):
            raise ConfigError(
                "vae.block_out_channels",
                blocks,
                "give >= 3 positive ints (time halves in the two blocks before the last)",
            )
        bad = [c for c in blocks if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                "vae.norm_num_groups", self.norm_num_groups, f"must divide every block_out_channels entry (not {bad})"
            )

    def _check_compression(self) -> None:
        if self.temporal_compression_ratio != 4:
            raise ConfigError(
                "vae.temporal_compression_ratio", self.temporal_compression_ratio, "only 4 is supported (884 VAE)"
            )
        s = self.spatial_compression_ratio
        n = len(self.block_out_channels)
        if isinstance(s, bool) or not isinstance(s, int) or s < 2 or s & (s - 1) or s.bit_length() - 1 > n:
            raise ConfigError(
                "vae.spatial_compression_ratio", s, f"must be a power of two between 2 and 2**{n} (one x2 per block)"
            )

    @property
    def num_spatial_downsamples(self) -> int:
        """log2(spatial_compression_ratio): the first this many blocks halve H and W."""
        return self.spatial_compression_ratio.bit_length() - 1

    def resample_factors(self, i: int) -> tuple[int, int, int]:
        """(t, h, w) factor of the resampler after block i (down block i in the encoder, up block i in the
        decoder; the same rule in both, as in diffusers). (1, 1, 1) means the block has no resampler."""
        n = len(self.block_out_channels)
        hw = 2 if i < self.num_spatial_downsamples else 1
        # time halves in the two blocks before the last one: log2(4) = 2 blocks
        t = 2 if n - 3 <= i < n - 1 else 1
        return (t, hw, hw)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"vae.{name}", value, f"must be an integer >= {minimum}")


FLAVORS: dict[str, VAEConfig] = {
    # HunyuanVideo v1 VAE (diffusers' AutoencoderKLHunyuanVideo() defaults): 246,478,803 parameters
    "vae-884-16c": VAEConfig(),
    # same structure, trains on CPU in minutes: 210,475 parameters
    "vae-tiny": VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
}


def to_diffusers_config(cfg: VAEConfig) -> dict:
    """The `AutoencoderKLHunyuanVideo` config dict (as in its config.json, minus the `_`-prefixed keys)."""
    d = {name: getattr(cfg, name) for name in _FIELDS}
    d["block_out_channels"] = list(cfg.block_out_channels)
    d["down_block_types"] = [_DOWN_BLOCK] * len(cfg.block_out_channels)
    d["up_block_types"] = [_UP_BLOCK] * len(cfg.block_out_channels)
    return d


def from_diffusers_config(d: dict) -> VAEConfig:
    """Build a VAEConfig from a diffusers config dict; keys starting with `_` are ignored, missing keys take
    diffusers' defaults (which are ours)."""
    known = set(_FIELDS) | {"down_block_types", "up_block_types"}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ConfigError("diffusers config", unknown, f"unknown keys; expected a subset of {sorted(known)}")
    cfg = VAEConfig(**{name: d[name] for name in _FIELDS if name in d})
    n = len(cfg.block_out_channels)
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = list(d.get(key, [block] * n))
        if types != [block] * n:
            raise ConfigError(key, types, f"must be {n} x {block!r} (one per block_out_channels entry)")
    return cfg
