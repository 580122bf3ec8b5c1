"""DiTConfig, the named flavors, and conversion to / from diffusers' `HunyuanVideoTransformer3DModel` config.

The field set mirrors diffusers' constructor arguments under our own names; `to_diffusers_config` and
`from_diffusers_config` are the only place the two vocabularies meet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vidtron.errors import ConfigError

# Geometry, pixel -> latent -> token, in one place. The autoencoders (the causal VAE and the stand-in) compress
# (t, h, w) by LATENT_STRIDE, the first frame alone: 4k+1 pixel frames -> k+1 latent frames; the DiT then patches
# latents by its (patch_size_t, patch_size, patch_size).
LATENT_STRIDE = (4, 8, 8)


def check_frames(frames: int, field: str, stride: int = LATENT_STRIDE[0]) -> None:
    """Raise ConfigError unless `frames` is stride*k + 1 (the causal VAE's rule; 1 = an image)."""
    if frames < 1 or (frames - 1) % stride:
        near = stride * ((max(frames, 1) - 1) // stride) + 1
        raise ConfigError(field, frames, f"must be {stride}k+1 (e.g. {near} or {near + stride})")


def latent_shape(frames: int, height: int, width: int, stride: tuple[int, int, int] = LATENT_STRIDE):
    """(f, h, w) latent grid of a (frames, height, width) pixel clip."""
    return (1 + (frames - 1) // stride[0], height // stride[1], width // stride[2])


IMAGE_CONDITIONS = ("", "token_replace")  # DiTConfig.image_condition values (diffusers' image_condition_type)

# our field -> diffusers config key (all other diffusers keys are fixed or ignored)
_DIFFUSERS_KEYS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_heads": "num_attention_heads",
    "head_dim": "attention_head_dim",
    "num_double_blocks": "num_layers",
    "num_single_blocks": "num_single_layers",
    "num_refiner_blocks": "num_refiner_layers",
    "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size",
    "patch_size_t": "patch_size_t",
    "guidance_embeds": "guidance_embeds",
    "text_dim": "text_embed_dim",
    "pooled_dim": "pooled_projection_dim",
    "rope_theta": "rope_theta",
    "rope_axes_dim": "rope_axes_dim",
}


@dataclass
class DiTConfig:
    """Shape of a HunyuanVideo dual-stream -> single-stream DiT. Defaults are the 13B model (`dit-13b`)."""

    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out (the predicted velocity)
    num_heads: int = 24  # attention heads; model dim = num_heads * head_dim
    head_dim: int = 128  # channels per head (even: RoPE rotates pairs)
    num_double_blocks: int = 20  # dual-stream blocks (separate video / text weights, joint attention)
    num_single_blocks: int = 40  # single-stream blocks (one stream over [video; text])
    num_refiner_blocks: int = 2  # token-refiner blocks applied to the text states
    mlp_ratio: float = 4.0  # MLP hidden = int(model dim * mlp_ratio)
    patch_size: int = 2  # spatial patch (h and w)
    patch_size_t: int = 1  # temporal patch
    guidance_embeds: bool = True  # add an embedding of the guidance scale to the conditioning (distilled CFG)
    text_dim: int = 4096  # width of the LLM text states
    pooled_dim: int = 768  # width of the pooled (CLIP) text embedding
    rope_theta: float = 256.0  # RoPE base
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE channels per (t, h, w) axis; sums to head_dim
    image_condition: str = ""  # "": text-to-video; "token_replace": image-to-video, latent frame 0 is the clean
    # reference image, its tokens modulated by the timestep-0 conditioning (HunyuanVideo-I2V; no extra weights)

    def __post_init__(self) -> None:
        self.rope_axes_dim = tuple(self.rope_axes_dim)  # YAML / JSON give lists
        for name in ("in_channels", "out_channels", "num_heads", "head_dim", "text_dim", "pooled_dim"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_double_blocks", "num_single_blocks", "num_refiner_blocks"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("patch_size", "patch_size_t"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.head_dim % 2:
            raise ConfigError("dit.head_dim", self.head_dim, "must be even (RoPE rotates channel pairs)")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ConfigError("dit.mlp_ratio", self.mlp_ratio, "must be > 0 (4.0 in HunyuanVideo)")
        if not self.rope_theta > 0:
            raise ConfigError("dit.rope_theta", self.rope_theta, "must be > 0 (256.0 in HunyuanVideo)")
        self._check_rope_axes()
        self._check_image_condition()

    def _check_image_condition(self) -> None:
        if self.image_condition not in IMAGE_CONDITIONS:
            fix = f"choose one of {IMAGE_CONDITIONS} ('' = text-to-video, token_replace = image-to-video)"
            raise ConfigError("dit.image_condition", self.image_condition, fix)
        if self.image_condition and self.patch_size_t != 1:
            fix = "token_replace conditions on latent frame 0 alone: needs patch_size_t=1 (as HunyuanVideo-I2V)"
            raise ConfigError("dit.patch_size_t", self.patch_size_t, fix)

    def _check_rope_axes(self) -> None:
        axes = self.rope_axes_dim
        if len(axes) != 3 or any(not isinstance(a, int) or a < 2 or a % 2 for a in axes):
            raise ConfigError("dit.rope_axes_dim", axes, "give three positive even ints, one per (t, h, w) axis")
        if sum(axes) != self.head_dim:
            raise ConfigError(
                "dit.rope_axes_dim", axes, f"must sum to head_dim={self.head_dim} (now {sum(axes)}); e.g. (16, 56, 56)"
            )

    @property
    def hidden_size(self) -> int:
        """Model dim D = num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of every MLP in the blocks."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch(self) -> tuple[int, int, int]:
        """(t, h, w) patch."""
        return (self.patch_size_t, self.patch_size, self.patch_size)

    def token_grid(self, latent_fhw: tuple[int, int, int]) -> tuple[int, int, int]:
        """(f, h, w) latent grid -> (t, h, w) grid of video tokens after patchify."""
        return tuple(n // p for n, p in zip(latent_fhw, self.patch))

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Video tokens of a (frames, height, width) pixel clip: pixel -> latent -> token."""
        t, h, w = self.token_grid(latent_shape(frames, height, width))
        return t * h * w


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"dit.{name}", value, f"must be an integer >= {minimum}")


FLAVORS: dict[str, DiTConfig] = {
    # HunyuanVideo v1 (diffusers' HunyuanVideoTransformer3DModel() defaults): 12,821,012,544 parameters
    "dit-13b": DiTConfig(),
    # scaled-down shape for scaling studies (same head dim and RoPE axes as 13B): ~0.47B parameters
    "dit-small": DiTConfig(num_heads=8, num_double_blocks=6, num_single_blocks=12, guidance_embeds=False),
    # trains in seconds on CPU
    "dit-tiny": DiTConfig(
        num_heads=2,
        head_dim=32,
        num_double_blocks=2,
        num_single_blocks=2,
        num_refiner_blocks=1,
        guidance_embeds=False,
        text_dim=64,
        pooled_dim=32,
        rope_axes_dim=(8, 12, 12),
    ),
}
# dit-tiny plus the guidance embedding: the student of recipe=dit_cfg_distill for a dit-tiny teacher
FLAVORS["dit-tiny-guided"] = dataclasses.replace(FLAVORS["dit-tiny"], guidance_embeds=True)


def to_diffusers_config(cfg: DiTConfig) -> dict:
    """The `HunyuanVideoTransformer3DModel` config dict (as in its config.json, minus `_class_name`)."""
    d = {key: getattr(cfg, ours) for ours, key in _DIFFUSERS_KEYS.items()}
    d["rope_axes_dim"] = list(cfg.rope_axes_dim)
    d["qk_norm"] = "rms_norm"
    d["image_condition_type"] = cfg.image_condition or None
    return d


def from_diffusers_config(d: dict) -> DiTConfig:
    """Build a DiTConfig from a diffusers config dict; keys starting with `_` are ignored, missing keys take
    diffusers' defaults (which are ours)."""
    if d.get("qk_norm", "rms_norm") != "rms_norm":
        raise ConfigError("qk_norm", d["qk_norm"], "only 'rms_norm' (HunyuanVideo) is supported")
    image_condition = d.get("image_condition_type") or ""
    if image_condition not in IMAGE_CONDITIONS:
        fix = "only None (text-to-video) and 'token_replace' (image-to-video) are supported"
        raise ConfigError("image_condition_type", d["image_condition_type"], fix)
    known = set(_DIFFUSERS_KEYS.values()) | {"qk_norm", "image_condition_type"}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ConfigError("diffusers config", unknown, f"unknown keys; expected a subset of {sorted(known)}")
    kwargs = {ours: d[key] for ours, key in _DIFFUSERS_KEYS.items() if key in d}
    if kwargs.get("out_channels") is None:  # diffusers: out_channels = out_channels or in_channels
        kwargs["out_channels"] = kwargs.get("in_channels", DiTConfig.in_channels)
    return DiTConfig(**kwargs, image_condition=image_condition)


def dit_config(flavor: str, overrides: dict | None = None, field: str = "model.flavor") -> DiTConfig:
    """The flavor's DiTConfig with `overrides` applied (head_dim changes rescale the RoPE axes)."""
    if flavor not in FLAVORS:
        raise ConfigError(field, flavor, f"choose one of {sorted(FLAVORS)}")
    cfg = FLAVORS[flavor]
    overrides = dict(overrides or {})
    if "head_dim" in overrides and overrides["head_dim"] != cfg.head_dim:
        overrides["rope_axes_dim"] = rope_axes_for(overrides["head_dim"])
    return dataclasses.replace(cfg, **overrides)


def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim over (t, h, w) RoPE axes like HunyuanVideo's (16, 56, 56) of 128: even parts, t ~ 1/8."""
    t = max(2, (head_dim // 8) // 2 * 2)
    hw = (head_dim - t) // 2 // 2 * 2
    return (head_dim - 2 * hw, hw, hw)
