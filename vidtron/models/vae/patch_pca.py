"""A linear stand-in for the causal 3D VAE: PCA over 4x8x8 pixel patches -> C latent channels (16 by default).

Same interface and shapes as the real VAE: video [B, 3, F, H, W] in [-1, 1] with F = 4k+1 ->
latents [B, C, 1 + (F-1)/4, H/8, W/8]. The first frame is encoded alone (1x8x8 patches), later frames in
groups of 4 (4x8x8 patches), like the causal VAE. Latents are scaled to unit variance per channel.

Legend: B batch, F pixel frames, f latent frames, H, W pixels, h, w latent height/width, C latent channels,
P patch vector length (3*ft*8*8).
"""

from __future__ import annotations

import torch
from torch import nn

from vidtron.errors import ConfigError

SPATIAL, TEMPORAL, CHANNELS = 8, 4, 16


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ConfigError("video.shape", tuple(video.shape), "expected [B, 3, F, H, W]")
    _, _, frames, height, width = video.shape
    if (frames - 1) % TEMPORAL:
        raise ConfigError("frames", frames, "must be 4k+1")
    if height % SPATIAL or width % SPATIAL:
        raise ConfigError("height/width", (height, width), "must be multiples of 8")


def _to_patches(x_BCFHW: torch.Tensor, ft: int) -> torch.Tensor:
    """[B, 3, F, H, W] -> [B, F/ft, H/8, W/8, 3*ft*8*8]."""
    b, c, f, h, w = x_BCFHW.shape
    x = x_BCFHW.reshape(b, c, f // ft, ft, h // SPATIAL, SPATIAL, w // SPATIAL, SPATIAL)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, f // ft, h // SPATIAL, w // SPATIAL, -1)


def _from_patches(p_BfhwP: torch.Tensor, ft: int) -> torch.Tensor:
    """Inverse of `_to_patches`."""
    b, f, h, w, _ = p_BfhwP.shape
    x = p_BfhwP.reshape(b, f, h, w, 3, ft, SPATIAL, SPATIAL)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, 3, f * ft, h * SPATIAL, w * SPATIAL)


class PatchPCAAutoencoder(nn.Module):
    """Linear encode/decode: z = (patch - mean) @ basis / scale; patch = z * scale @ basis.T + mean."""

    def __init__(self, channels: int = CHANNELS):
        super().__init__()
        if not 1 <= channels <= 3 * SPATIAL * SPATIAL:
            fix = f"choose 1..{3 * SPATIAL * SPATIAL} (a first-frame patch has that many values); 16 = the causal VAE's"
            raise ConfigError("latent channels", channels, fix)
        self.channels = channels
        for name, ft in (("first", 1), ("rest", TEMPORAL)):
            p = 3 * ft * SPATIAL * SPATIAL
            self.register_buffer(f"{name}_mean", torch.zeros(p))
            self.register_buffer(f"{name}_basis", torch.zeros(p, channels))
            self.register_buffer(f"{name}_scale", torch.ones(channels))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PatchPCAAutoencoder:
        """The autoencoder a saved state describes (its channel count read from the basis)."""
        basis = state.get("first_basis")
        if basis is None or basis.ndim != 2:
            raise ConfigError("autoencoder state", sorted(state)[:4], "is not a stand-in autoencoder (no first_basis)")
        ae = cls(int(basis.shape[1]))
        ae.load_state_dict(state)
        return ae

    @torch.no_grad()
    def fit(self, videos: torch.Tensor, max_patches: int = 20000, seed: int = 0) -> PatchPCAAutoencoder:
        """Fit both PCA bases on videos [N, 3, F, H, W] in [-1, 1] (F >= 5 for the 4-frame basis)."""
        _check_video(videos)
        gen = torch.Generator().manual_seed(seed)
        first = _to_patches(videos[:, :, :1].double(), 1).reshape(-1, 3 * SPATIAL * SPATIAL)
        self._fit_one("first", first, max_patches, gen)
        if videos.shape[2] > 1:
            rest = _to_patches(videos[:, :, 1:].double(), TEMPORAL).reshape(-1, 3 * TEMPORAL * SPATIAL * SPATIAL)
            self._fit_one("rest", rest, max_patches, gen)
        return self

    def _fit_one(self, name: str, patches: torch.Tensor, max_patches: int, gen: torch.Generator) -> None:
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=gen)[:max_patches]]
        mean = patches.mean(0)
        _, _, v = torch.linalg.svd(patches - mean, full_matrices=False)
        basis = v[: self.channels].T  # [P, C], orthonormal columns
        v0 = v[: self.channels]
        basis = basis * torch.sign(v0.sum(1)).where(v0.sum(1) != 0, torch.ones(())).unsqueeze(0)  # fixed signs
        scale = ((patches - mean) @ basis).std(0).clamp_min(1e-6)
        getattr(self, f"{name}_mean").copy_(mean.float())
        getattr(self, f"{name}_basis").copy_(basis.float())
        getattr(self, f"{name}_scale").copy_(scale.float())

    def encode(self, video_BCFHW: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> [B, C, 1 + (F-1)/4, H/8, W/8]."""
        _check_video(video_BCFHW)
        parts = [self._encode_part("first", video_BCFHW[:, :, :1], 1)]
        if video_BCFHW.shape[2] > 1:
            parts.append(self._encode_part("rest", video_BCFHW[:, :, 1:], TEMPORAL))
        return torch.cat(parts, dim=2)

    def _encode_part(self, name: str, x: torch.Tensor, ft: int) -> torch.Tensor:
        p = _to_patches(x.float(), ft)  # [B, f, h, w, P]
        z = (p - getattr(self, f"{name}_mean")) @ getattr(self, f"{name}_basis") / getattr(self, f"{name}_scale")
        return z.permute(0, 4, 1, 2, 3)  # [B, C, f, h, w]

    def decode(self, z_BCfhw: torch.Tensor) -> torch.Tensor:
        """[B, C, f, h, w] -> [B, 3, 1 + 4(f-1), 8h, 8w] (not clamped)."""
        parts = [self._decode_part("first", z_BCfhw[:, :, :1], 1)]
        if z_BCfhw.shape[2] > 1:
            parts.append(self._decode_part("rest", z_BCfhw[:, :, 1:], TEMPORAL))
        return torch.cat(parts, dim=2)

    def _decode_part(self, name: str, z: torch.Tensor, ft: int) -> torch.Tensor:
        z = z.float().permute(0, 2, 3, 4, 1) * getattr(self, f"{name}_scale")  # [B, f, h, w, C]
        p = z @ getattr(self, f"{name}_basis").T + getattr(self, f"{name}_mean")
        return _from_patches(p, ft)
