"""The VAE objective: L1 + LPIPS + adaptive-weighted hinge adversarial + KL, and the discriminator's hinge loss.

Generator side (VQGAN / LDM's LPIPSWithDiscriminator, with HunyuanVideo's weights):
    nll   = l1_weight * |x - x_hat| + l2_weight * (x - x_hat)^2 + lpips_weight * LPIPS(x, x_hat)
            (means over pixels / frames; l2_weight is 0 unless configured: HunyuanVideo uses L1)
    G     = -mean D(x_hat)                                                     (hinge generator loss)
    lam   = ||d nll / d w_last|| / (||d G / d w_last|| + 1e-4), clamped to [0, max], no gradient
    loss  = nll + adv_weight * lam * G * [step > disc_start] + kl_weight * KL   (KL summed over latents, batch mean)
Discriminator side: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), only after disc_start steps.
w_last is the decoder's last conv weight. Under data parallelism the two gradients are averaged over the ranks
before taking norms (`reduce`), so lam equals a single rank's on the whole batch.

Shape legend: B batch, C channels, F frames, H, W pixels; Z latent channels, f, h, w latent sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vidtron.models.vae.model import kl_divergence
from vidtron.recipes.vae.config import VAERecipeConfig
from vidtron.recipes.vae.lpips import LPIPS

Reduce = Callable[[torch.Tensor], torch.Tensor]  # mean of a tensor over data-parallel ranks


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q || N(0, I)) summed over latent dims, mean over the batch: a scalar."""
    return kl_divergence(mean, logvar).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)); 0 once margins hold."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean D(x_hat)."""
    return -fake_logits.mean()


def adversarial_on(step: int, disc_start: int) -> bool:
    """True once `disc_start` optimizer steps have completed (step is 1-based): VQGAN's adopt_weight switch."""
    return step > disc_start


def adaptive_weight(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """VQGAN's lambda = ||grad_w nll|| / (||grad_w G|| + 1e-4), clamped to [0, max_weight], detached."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        g_nll, g_adv = reduce(g_nll), reduce(g_adv)
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def lpips_frames(lpips: LPIPS, x_BCFHW: torch.Tensor, y_BCFHW: torch.Tensor, max_frames: int = 0) -> torch.Tensor:
    """Mean LPIPS over the clips' frames (at most `max_frames` evenly spaced ones when > 0): a scalar."""
    frames = x_BCFHW.size(2)
    if 0 < max_frames < frames:
        idx = torch.linspace(0, frames - 1, max_frames).round().long().to(x_BCFHW.device)
        x_BCFHW, y_BCFHW = x_BCFHW.index_select(2, idx), y_BCFHW.index_select(2, idx)
    x = x_BCFHW.transpose(1, 2).flatten(0, 1)  # [B*F, C, H, W]
    y = y_BCFHW.transpose(1, 2).flatten(0, 1)
    return lpips(x, y).mean()


class VAEObjective:
    """The configured loss: `generator_terms` for the VAE's update, `discriminator_loss` for the critic's."""

    def __init__(self, cfg: VAERecipeConfig, lpips: LPIPS | None):
        self.cfg = cfg
        self.lpips = lpips  # None: the LPIPS term is off

    def to(self, device: torch.device | str) -> VAEObjective:
        if self.lpips is not None:
            self.lpips.to(device)
        return self

    def nll(self, video: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction terms: {"l1", "l2", "lpips", "nll"} (lpips is 0 when off)."""
        diff = video - recon
        l1, l2 = diff.abs().mean(), diff.pow(2).mean()
        if self.lpips is not None and self.cfg.lpips_weight > 0:
            lp = lpips_frames(self.lpips, video, recon, self.cfg.lpips_frames)
        else:
            lp = l1.new_zeros(())
        nll = self.cfg.l1_weight * l1 + self.cfg.l2_weight * l2 + self.cfg.lpips_weight * lp
        return {"l1": l1, "l2": l2, "lpips": lp, "nll": nll}

    def generator_terms(
        self,
        disc: torch.nn.Module,
        video: torch.Tensor,
        recon: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        step: int,
        last_layer: torch.Tensor,
        reduce: Reduce | None = None,
    ) -> dict[str, torch.Tensor]:
        """All generator-side terms for optimizer step `step`; "loss" is the one to backpropagate. The adversarial
        term (and the discriminator forward) only runs after cfg.disc_start steps and while grad is enabled."""
        cfg = self.cfg
        terms = self.nll(video, recon)
        terms["kl"] = kl_loss(mean, logvar)
        zero = terms["nll"].new_zeros(())
        terms["g_loss"], terms["adaptive_weight"] = zero, zero
        if adversarial_on(step, cfg.disc_start) and cfg.adv_weight > 0 and torch.is_grad_enabled():
            terms["g_loss"] = hinge_g_loss(disc(recon))
            terms["adaptive_weight"] = adaptive_weight(
                terms["nll"], terms["g_loss"], last_layer, cfg.adaptive_weight_max, reduce
            )
        adv = cfg.adv_weight * terms["adaptive_weight"] * terms["g_loss"]
        terms["loss"] = terms["nll"] + adv + cfg.kl_weight * terms["kl"]
        return terms

    def discriminator_loss(
        self, disc: torch.nn.Module, video: torch.Tensor, recon: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{"d_loss", "logits_real", "logits_fake"}: the critic's hinge loss on real clips vs detached recons."""
        real, fake = disc(video), disc(recon.detach())
        return {
            "d_loss": hinge_d_loss(real, fake),
            "logits_real": real.mean().detach(),
            "logits_fake": fake.mean().detach(),
        }
