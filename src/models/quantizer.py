"""Vector quantiser of the VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

    out = quantizer(z)      # z (B, D, h, w) -> out.z_q (straight-through), out.loss, out.indices, ...

Each latent vector is replaced by its nearest codebook entry; gradients skip the non-differentiable lookup
(straight-through estimator, Eq. 3 of the paper: z + sg[z_q - z]). The loss is Eq. 3's last two terms:

    loss = ||sg[z] - e||^2  +  beta * ||z - sg[e]||^2          (codebook + commitment)

A code that no vector has chosen for `reset_steps` training forward passes is re-seeded from a randomly
chosen encoder output of the current batch, so large codebooks do not collapse onto a few codes. It happens on
the device, without a host read: every pass draws a candidate for every code, and the dead codes take theirs
(the draws come from the `generator` handed in: the trainer's checkpointed one). Under torch.distributed the
usage counts are summed over processes and the candidates are broadcast from rank 0, so every process keeps an
identical codebook. The parameter is named `embedding` as in diffusers' VectorQuantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w) quantised latent with straight-through gradient to z
    loss: torch.Tensor  # () codebook + beta * commitment
    indices: torch.Tensor  # (B, h, w) chosen code per position
    perplexity: torch.Tensor  # () exp(entropy) of the code histogram of this batch (all processes when training)
    usage: torch.Tensor  # () fraction of codes chosen at least once in this batch (all processes when training)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_codes(z_flat: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest code for each row of z_flat (N, D) among codebook (K, D), in chunks of rows.

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin and is dropped.
    """
    with torch.autocast(z_flat.device.type, enabled=False):  # autocast would run the matmul in fp16/bf16
        codebook = codebook.float()
        e_sq = (codebook**2).sum(1)  # (K,)
        out = []
        for rows in z_flat.float().split(chunk):
            dist_sq = e_sq[None, :] - 2.0 * rows @ codebook.t()  # (n, K)
            out.append(dist_sq.argmin(1))
    return torch.cat(out)  # (N,)


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, reset_steps: int = 1000):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.reset_steps = reset_steps
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        # training forward passes since each code was last chosen, and forward passes so far
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise without losses or bookkeeping: (B, D, h, w) -> (B, D, h, w)."""
        b, d, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        idx = nearest_codes(z_flat, self.embedding.weight)
        return self.embedding(idx).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)

    def forward(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> QuantizerOutput:
        """`generator` (on z's device): the re-seeding's draws; the global RNG without one."""
        b, d, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        if self.training and self.reset_steps > 0:
            self._reseed_dead_codes(z_flat.detach(), generator)
        idx = nearest_codes(z_flat.detach(), self.embedding.weight)  # (BHW,)
        z_q = self.embedding(idx).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, h, w)
        codebook_loss = F.mse_loss(z_q.float(), z.detach().float())
        commitment_loss = F.mse_loss(z.float(), z_q.detach().float())
        loss = codebook_loss + self.beta * commitment_loss
        counts = torch.bincount(idx, minlength=self.num_codes).float()  # (K,)
        if self.training:
            if _distributed():  # only training passes run on every process together
                dist.all_reduce(counts)
            self._update_usage(counts)
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()
        z_st = z + (z_q - z).detach()  # straight-through: forward is z_q, gradient flows to z
        return QuantizerOutput(z_st, loss, idx.view(b, h, w), perplexity.detach(), usage.detach())

    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        used = counts > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        self.num_updates.add_(1)

    @torch.no_grad()
    def _reseed_dead_codes(self, z_flat: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Replace every code unused for `reset_steps` passes by a (slightly jittered) encoder output. Device ops
        only: each code gets a candidate, and the dead ones (the same on every rank) take it, so the host never
        waits to learn which codes are dead (nonzero() would make every training pass wait for the GPU)."""
        dead = self.unused_steps >= self.reset_steps  # (K,) bool
        k, device = self.num_codes, z_flat.device
        gen_device = generator.device if generator is not None else device
        pick = torch.randint(0, z_flat.shape[0], (k,), generator=generator, device=gen_device).to(device)  # (K,)
        noise = torch.randn(k, self.dim, generator=generator, device=gen_device).to(device)  # (K, D)
        candidates = z_flat[pick].float() + 0.01 * z_flat.float().std() * noise  # (K, D)
        if _distributed():
            dist.broadcast(candidates, src=0)
        weight = self.embedding.weight
        weight.copy_(torch.where(dead[:, None], candidates.to(weight.dtype), weight))
        self.unused_steps.masked_fill_(dead, 0)
