"""The Gaussian diffusion process: the noise schedule, noising q(x_t | x_0) and the training target.

It is a small plain object, apart from the network (the UNet knows nothing about betas), in the spirit of
denoising-diffusion-pytorch's GaussianDiffusion but without the model inside:

    process = DiffusionProcess.from_config(train_cfg)
    t = torch.randint(0, process.num_timesteps, (B,))
    x_t = process.add_noise(x0, noise, t)                  # DDPM eq. 4
    loss = diffusion_loss(unet(x_t, t, cond), process.training_target(x0, noise, t), "mse")

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
    beta_t                      variance added at step t (t = 0 .. T-1 here, t = 1 .. T in the paper)
    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s          ("alphas_cumprod")
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)

The schedule is kept in float64 (the products over 1000 steps lose digits in float32) and gathered per
timestep in the dtype of the tensor being noised.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_FNS = ("mse", "l1", "huber")
HUBER_DELTA = 0.1  # quadratic for |error| < 0.1, linear above: robust to the rare large error at high noise


def make_betas(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_0 .. beta_{T-1} in float64.

    linear         DDPM's schedule: evenly spaced from beta_start to beta_end (1e-4 -> 0.02 for T = 1000).
    scaled_linear  LDM / Stable Diffusion: evenly spaced in sqrt(beta), then squared (used with 0.00085 -> 0.012).
    cosine         Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2),
                   s = 0.008, beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) clipped to 0.999 (beta_start/end unused).
    """
    T = num_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {schedule!r}; expected one of {BETA_SCHEDULES}")


class DiffusionProcess:
    """Schedule buffers plus the three formulas training and sampling need: noising, target, and inversion."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.prediction_type = prediction_type

        self.betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)  # (T,) float64
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (x_{-1} is the clean sample)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # DDPM eq. 7: q(x_{t-1} | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        self._device_cache: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_config(cls, cfg) -> "DiffusionProcess":
        """From a Stage2TrainConfig (num_diffusion_timesteps, beta_schedule, beta_start, beta_end, prediction_type)."""
        return cls(
            num_timesteps=cfg.num_diffusion_timesteps,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            prediction_type=cfg.prediction_type,
        )

    def to_dict(self) -> dict:
        """JSON-able description, stored in model.safetensors metadata so sampling rebuilds the same process."""
        return {
            "num_timesteps": self.num_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionProcess":
        unknown = set(d) - {"num_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"}
        if unknown:
            raise ValueError(f"unknown diffusion process keys {sorted(unknown)}")
        return cls(**d)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"DiffusionProcess({args})"

    # ---------------------------------------------------------------------------------------------- helpers

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] reshaped to broadcast against `like` (B, C, H, W) -> (B, 1, 1, 1), in like's dtype/device."""
        key = (id(values), like.device)
        table = self._device_cache.get(key)
        if table is None:
            table = values.to(device=like.device, dtype=torch.float32)  # float64 is unsupported on some devices
            self._device_cache[key] = table
        t = t.to(like.device).long()
        out = table[t].to(like.dtype)  # (B,)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # ---------------------------------------------------------------------------------------------- formulas

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise: (B, C, H, W); t: (B,) long in [0, T).
        """
        ab = self.gather(self.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: eps (DDPM eq. 14), or v = sqrt(ab) eps - sqrt(1 - ab) x_0
        (Salimans & Ho 2022, "Progressive Distillation", sec. 4 / appendix D)."""
        if self.prediction_type == "epsilon":
            return noise
        ab = self.gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predict_x0_and_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert the network's prediction into (x0_hat, eps_hat), whatever the prediction type.

        epsilon:       x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)           (DDIM eq. 9, "predicted x_0")
        v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v
        """
        ab = self.gather(self.alphas_cumprod, t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * model_output
            eps = (1 - ab).sqrt() * x_t + ab.sqrt() * model_output
        return x0, eps

    def sample_timesteps(self, batch_size: int, device="cpu", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t ~ Uniform{0, .., T-1}, (B,) long (DDPM Algorithm 1, line 3)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, loss_fn: str = "mse") -> torch.Tensor:
    """Mean regression loss between the prediction and the target, computed in float32 (safe under bf16/fp16).

    mse    DDPM's simplified objective L_simple (eq. 14)
    l1     mean absolute error (LDM's optional `l1` loss)
    huber  Huber loss with delta = HUBER_DELTA
    """
    pred, target = pred.float(), target.float()
    if loss_fn == "mse":
        return F.mse_loss(pred, target)
    if loss_fn == "l1":
        return F.l1_loss(pred, target)
    if loss_fn == "huber":
        return F.huber_loss(pred, target, delta=HUBER_DELTA)
    raise ValueError(f"unknown loss_fn {loss_fn!r}; expected one of {LOSS_FNS}")
