"""The HunyuanVideo DiT as a plain single-device nn.Module (dual-stream -> single-stream, 3D RoPE, token refiner).

Shapes: B batch, C latent channels, F latent frames, H, W latent height/width, V video tokens
(F/pt * H/p * W/p), T text tokens, E text-encoder width, D model dim, P output channels per token.

Inputs, shapes and units are those of diffusers' `HunyuanVideoTransformer3DModel.forward`, and with weights
loaded through `state_dict_adapter.from_diffusers` the outputs match it to fp32 rounding, text-to-video
(`image_condition_type=None`) and image-to-video (`"token_replace"`: `config.image_condition`, `image_cond`).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from vidtron.errors import ConfigError
from vidtron.models.dit.blocks import DoubleStreamBlock, FinalLayer, SingleStreamBlock
from vidtron.models.dit.configs import DiTConfig
from vidtron.models.dit.layers import ConditionEmbedding, FirstFrame, RMSNorm, rope_cos_sin
from vidtron.models.dit.refiner import TextRefiner


class DiT(nn.Module):
    """HunyuanVideo DiT: text-to-video, or image-to-video with `config.image_condition="token_replace"` (the same
    weights; latent frame 0 is the clean reference image). Build on the meta device, then `to_empty(...)` and
    `init_weights()`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D, Dh, M = config.hidden_size, config.head_dim, config.mlp_hidden
        self.patch_embed = nn.Conv3d(config.in_channels, D, kernel_size=config.patch, stride=config.patch)
        self.cond_embed = ConditionEmbedding(D, config.pooled_dim, guidance=config.guidance_embeds)
        self.text_refiner = TextRefiner(config.text_dim, D, Dh, config.num_refiner_blocks, config.mlp_ratio)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(D, Dh, M) for _ in range(config.num_double_blocks)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(D, Dh, M) for _ in range(config.num_single_blocks)])
        self.final_layer = FinalLayer(D, math.prod(config.patch) * config.out_channels)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
        image_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents [B, C, F, H, W]; timestep [B] in 0..1000; text_states [B, T, E]; text_mask [B, T] (1 = valid,
        padding at the end; None = all valid); pooled [B, pooled_dim]; guidance [B] (scale * 1000) when the
        config embeds guidance; image_cond [B] bool, for an image_condition="token_replace" DiT only: the samples
        whose latent frame 0 is a clean reference image (None = all), its tokens modulated by the timestep-0
        conditioning as in diffusers. Returns the prediction [B, C_out, F, H, W]."""
        grid = self.token_grid(latents.shape)
        rope = rope_cos_sin(grid, self.config.rope_axes_dim, self.config.rope_theta, latents.device)  # 2 x [V, Dh]
        cond_BD = self.cond_embed(timestep, pooled, guidance)
        first = self.first_frame(grid, pooled, image_cond)  # None for text-to-video: the blocks' T2V path
        img_BVD = self.patch_embed(latents).flatten(2).transpose(1, 2)
        txt_BTD = self.text_refiner(text_states, timestep, text_mask)
        joint_mask_BT = prefix_text_mask(text_mask)
        extra = () if first is None else (first,)  # positional, so the CP / SP block hooks shard its mask
        for block in self.double_blocks:
            img_BVD, txt_BTD = block(img_BVD, txt_BTD, cond_BD, rope, joint_mask_BT, *extra)
        for block in self.single_blocks:
            img_BVD, txt_BTD = block(img_BVD, txt_BTD, cond_BD, rope, joint_mask_BT, *extra)
        return self.unpatchify(self.final_layer(img_BVD, cond_BD), grid)  # [B, C_out, F, H, W]

    def first_frame(
        self, grid: tuple[int, int, int], pooled_BP: torch.Tensor, image_cond_B: torch.Tensor | None
    ) -> FirstFrame | None:
        """The token-replace conditioning (mask of the frame-0 tokens of image-conditioned samples, timestep-0
        conditioning), or None for a text-to-video DiT."""
        if not self.config.image_condition:
            if image_cond_B is not None:
                fix = "this DiT is text-to-video (image_condition=''); train with model.image_condition=token_replace"
                raise ConfigError("image_cond", "given", fix)
            return None
        gf, gh, gw = grid
        frame0_1V1 = (torch.arange(gf * gh * gw, device=pooled_BP.device) < gh * gw)[None, :, None]
        mask_BV1 = frame0_1V1 if image_cond_B is None else frame0_1V1 & image_cond_B.bool()[:, None, None]
        return FirstFrame(mask_BV1, self.cond_embed.at_timestep_zero(pooled_BP))

    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """(F/pt, H/p, W/p) for latents [B, C, F, H, W]; rejects sizes the patch does not divide."""
        if len(latent_shape) != 5 or latent_shape[1] != self.config.in_channels:
            fix = f"expected [B, {self.config.in_channels}, F, H, W]"
            raise ConfigError("latents.shape", tuple(latent_shape), fix)
        sizes, patch = latent_shape[2:], self.config.patch
        if any(n % p for n, p in zip(sizes, patch)):
            raise ConfigError("latents.shape", tuple(latent_shape), f"F, H, W must be divisible by the patch {patch}")
        return tuple(n // p for n, p in zip(sizes, patch))

    def unpatchify(self, x_BVP: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens [B, V, C_out * pt * p * p] (channel-major within a token) -> [B, C_out, F, H, W]."""
        (gf, gh, gw), (pt, ph, pw) = grid, self.config.patch
        x = x_BVP.reshape(x_BVP.shape[0], gf, gh, gw, -1, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, gf, pt, gh, ph, gw, pw]
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def num_params(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill every parameter in place from `init_function(seed)` (a plain, unsharded model)."""
        init = self.init_function(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(init(name, param.shape))

    def init_function(self, seed: int = 0):
        """(name, shape) -> the full initial tensor of parameter `name`, from a generator keyed by (seed, name), so
        a parameter's value does not depend on the order of initialisation or on the parallel layout (see
        vidtron/parallel/materialize.py): xavier-uniform linears / patch conv with zero bias, N(0, 0.02) timestep and
        guidance MLPs, unit norms, and adaLN-zero: every modulation / gate linear and the final projection start at
        zero. Works on a meta-device model (it reads only module types and names)."""
        modules = dict(self.named_modules())
        zero = {id(m) for m in self._zero_init_linears()}
        normal = {id(m) for m in self._normal_init_linears()}

        def init(name: str, shape: torch.Size) -> torch.Tensor:
            owner_name, _, kind = name.rpartition(".")
            owner = modules[owner_name]
            if kind == "bias" or id(owner) in zero:  # constants: expanded scalars, no full-size allocation
                return torch.zeros(()).expand(shape)
            if isinstance(owner, nn.LayerNorm | RMSNorm):
                return torch.ones(()).expand(shape)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if id(owner) in normal:
                return torch.empty(shape).normal_(0.0, 0.02, generator=gen)
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return torch.empty(shape).uniform_(-bound, bound, generator=gen)

        return init

    def _zero_init_linears(self) -> list[nn.Module]:
        zero = [b.mod for b in self.text_refiner.blocks] + [b.mod for b in self.single_blocks]
        zero += [m for b in self.double_blocks for m in (b.img_mod, b.txt_mod)]
        return zero + [self.final_layer.mod, self.final_layer.proj]

    def _normal_init_linears(self) -> list[nn.Module]:
        mlps = [mlp for e in (self.cond_embed, self.text_refiner.cond_embed) for mlp in (e.time_mlp, e.guidance_mlp)]
        return [fc for mlp in mlps if mlp is not None for fc in (mlp.fc1, mlp.fc2)]


def prefix_text_mask(text_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """The joint-attention text mask as diffusers builds it: the first sum(mask) tokens of each sample are
    valid (masks are expected to be padded at the end), bool [B, T]."""
    if text_mask_BT is None:
        return None
    num_valid_B1 = text_mask_BT.sum(dim=1, dtype=torch.int)[:, None]
    positions_1T = torch.arange(text_mask_BT.shape[1], device=text_mask_BT.device)[None, :]
    return positions_1T < num_valid_B1
