"""The stage-1 objective: reconstruction + LPIPS + KL (or VQ) + a delayed PatchGAN (Esser et al. 2021,
"Taming Transformers", Eq. 4-7; Rombach et al. 2022, Sec. 3 and App. G).

Generator (autoencoder) loss, all terms averaged over elements:

    L_rec = |x - x_hat|  (or squared)  +  lpips_weight * LPIPS(x, x_hat)
    L     = L_rec  +  kl_weight * KL(q(z|x) || N(0, I))      (KL autoencoder)
                   +  codebook_weight * L_vq                  (VQ-VAE: codebook + beta * commitment)
                   +  d * disc_weight * L_gen                 (from disc_start on; L_gen = -mean D(x_hat))

with the adaptive weight (Taming Transformers, Eq. 7) taken at the decoder's last layer:

    d = ||grad L_rec|| / (||grad L_gen|| + 1e-4),   clamped to [0, 1e4] and not differentiated.

Discriminator loss on detached reconstructions, from disc_start on: hinge
0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) or vanilla 0.5 (mean softplus(-D(x)) + mean softplus(D(x_hat))).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Stage1TrainConfig
from ..models.vae import AutoencoderOutput

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error over all elements."""
    if kind == "l1":
        return (x.float() - x_hat.float()).abs().mean()
    if kind == "l2":
        return ((x.float() - x_hat.float()) ** 2).mean()
    raise ValueError(f"reconstruction_loss_fn must be 'l1' or 'l2', got {kind!r}")


def adaptive_weight(
    rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer: torch.Tensor, grad_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """d = ||dL_rec/dW|| / (||dL_gen/dW|| + 1e-4) at the last layer W, clamped to [0, 1e4], detached (Eq. 7).

    Under fp16 the gradients are taken of the losses times the loss scale s (`grad_scale`), as the backward
    pass does, so that they do not underflow in fp16; s cancels: d = ||s g_rec|| / (||s g_gen|| + s 1e-4).
    NaN when either gradient is not finite (under fp16: the scaled gradients overflowed).
    """
    s = grad_scale if grad_scale is not None else 1.0
    rec_norm = torch.autograd.grad(rec_loss * s, last_layer, retain_graph=True)[0].float().norm()
    gen_norm = torch.autograd.grad(gen_loss * s, last_layer, retain_graph=True)[0].float().norm()
    d = (rec_norm / (gen_norm + ADAPTIVE_EPS * s)).clamp(0.0, ADAPTIVE_MAX)
    finite = torch.isfinite(rec_norm) & torch.isfinite(gen_norm)
    return torch.where(finite, d, float("nan")).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class AutoencoderLoss(nn.Module):
    """Holds the frozen perceptual network and the loss weights; the networks it scores live elsewhere."""

    def __init__(self, cfg: Stage1TrainConfig, perceptual: Optional[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.perceptual = perceptual
        self.d_loss_fn = D_LOSSES[cfg.disc_loss]

    def disc_active(self, step: int) -> bool:
        """The adversarial terms and discriminator training run from generator step `disc_start` on."""
        return self.cfg.use_patchgan and step >= self.cfg.disc_start

    def perceptual_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.perceptual is None:
            return x.new_zeros((), dtype=torch.float32)
        return self.perceptual(x, x_hat).float().mean()

    def generator_loss(
        self,
        x: torch.Tensor,
        out: AutoencoderOutput,
        discriminator: Optional[nn.Module],
        last_layer: torch.Tensor,
        step: int,
        grad_scale: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total autoencoder loss for images x (B, 3, H, W) and the autoencoder's output on them.

        `grad_scale`: the fp16 loss scale, for the adaptive weight's gradients (None otherwise). When they
        overflow, d is 0 and logs["grad_overflow"] is True: the trainer then treats the step as an fp16 overflow.
        """
        cfg = self.cfg
        x_hat = out.reconstruction
        rec = reconstruction_loss(x, x_hat, cfg.reconstruction_loss_fn)
        lpips = self.perceptual_loss(x, x_hat)
        nll = rec + cfg.lpips_weight * lpips
        logs = {"rec_loss": rec.detach()}
        if self.perceptual is not None:  # no all-zero curve when the perceptual term is off
            logs["lpips_loss"] = lpips.detach()
        if out.posterior is not None:
            kl = out.posterior.kl().mean()
            loss = nll + cfg.kl_weight * kl
            logs["kl_loss"] = kl.detach()
        else:
            loss = nll + cfg.codebook_weight * out.quant.loss
            logs.update(vq_loss=out.quant.loss.detach(), perplexity=out.quant.perplexity, codebook_usage=out.quant.usage)
        if discriminator is not None and self.disc_active(step):
            set_requires_grad(discriminator, False)  # the generator step must not train D
            gen = -discriminator(x_hat).float().mean()
            set_requires_grad(discriminator, True)
            d = adaptive_weight(nll, gen, last_layer, grad_scale) if torch.is_grad_enabled() else nll.new_zeros(())
            if grad_scale is not None:  # fp16: an overflow of the scaled gradients is the loss scaler's business
                logs["grad_overflow"] = ~torch.isfinite(d)  # the step is skipped and the scale lowered
                d = torch.where(torch.isfinite(d), d, 0.0)
            loss = loss + d * cfg.disc_weight * gen
            logs.update(gen_loss=gen.detach(), adaptive_weight=d)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Real images and detached reconstructions in separate passes, as taming-transformers does. The
        PatchGAN's BatchNorm normalises each pass with its own batch's statistics, so a batch of reconstructions
        alone, the generator's pass, gets the very score this step trains on. (One pass over both would
        normalise by the mixed batch: the discriminator then learned to score reconstructions low only beside
        real images, while the generator was told its reconstructions looked real.)"""
        real = discriminator(x)  # (B, 1, h, w)
        fake = discriminator(x_hat.detach())  # (B, 1, h, w)
        loss = self.d_loss_fn(real, fake)
        logs = {"disc_loss": loss.detach(), "logits_real": real.detach().float().mean(), "logits_fake": fake.detach().float().mean()}
        return loss, logs
