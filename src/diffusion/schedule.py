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

Recipe levers that live here (each off by default):
    rescale_betas_zero_snr   Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
                             Algorithm 1: the schedule is rescaled so that alpha_bar_{T-1} = 0 (the last step is
                             pure noise, as at sampling time). Needs v-prediction: eps says nothing about x_0 there.
    snr_gamma                Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy":
                             per-timestep loss weights min(SNR_t, gamma) / SNR_t (eps) or / (SNR_t + 1) (v).
    noise_offset             Guttenberg 2023, "Diffusion with Offset Noise": eps + offset * N(0, 1) per (B, C),
                             constant over the image, so the model learns to change an image's mean colour.
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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha_bar is exactly 0 (Lin et al. 2024, Algorithm 1), float64 in, float64 out.

    1. s_t = sqrt(alpha_bar_t)
    2. shift so that s_{T-1} = 0 and scale so that s_0 keeps its value: s <- (s - s_{T-1}) * s_0 / (s_0 - s_{T-1})
    3. alpha_bar = s^2;  alpha_t = alpha_bar_t / alpha_bar_{t-1} (alpha_0 = alpha_bar_0);  beta = 1 - alpha
    """
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()  # 1.
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)  # 2.
    alpha_bar = s**2  # 3.
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def check_betas(betas: torch.Tensor, prediction_type: str, rescale_betas_zero_snr: bool) -> None:
    """Refuse a schedule the formulas below cannot use. beta_0 must be > 0: with beta_start 0, alpha_bar_0 = 1, the
    DDPM posterior at t = 0 is 0 / 0 (ddpm_sample returns NaN) and SNR_0 is infinite. The betas must be < 1 but for
    the last one of rescale_betas_zero_snr: a beta of 1 makes alpha_bar exactly 0 from there on (DDIM then divides
    by 0), and zero terminal SNR needs v-prediction, since an epsilon prediction says nothing about x_0 there
    (x0_hat = (x_t - eps) / 0; Lin et al. 2024, sec. 3.2)."""
    if rescale_betas_zero_snr and prediction_type != "v_prediction":
        raise ValueError("rescale_betas_zero_snr needs prediction_type v_prediction: at zero terminal SNR an epsilon "
                         "prediction carries no information about x_0 (Lin et al. 2024, sec. 3.2)")
    inner = betas[:-1] if rescale_betas_zero_snr else betas  # the rescaled last beta is exactly 1
    low, high = betas.min().item(), inner.max().item() if len(inner) else 0.0
    if not (low > 0 and high < 1):
        raise ValueError(f"the betas must lie in (0, 1), got {low:.6g} .. {high:.6g}: set 0 < beta_start, beta_end < 1 "
                         "(beta_start 0 adds no noise at t = 0, where DDPM sampling divides 0 by 0; for a pure-noise "
                         "last step use rescale_betas_zero_snr with v_prediction)")


class DiffusionProcess:
    """Schedule buffers plus the three formulas training and sampling need: noising, target, and inversion."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
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
        self.rescale_betas_zero_snr = rescale_betas_zero_snr

        self.betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)  # (T,) float64
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        check_betas(self.betas, prediction_type, rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (x_{-1} is the clean sample)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # DDPM eq. 7: q(x_{t-1} | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        # signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021); 0 at a zero-SNR last step
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self._device_cache: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_config(cls, cfg) -> "DiffusionProcess":
        """From a Stage2TrainConfig (num_diffusion_timesteps, beta_schedule, beta_start, beta_end, prediction_type,
        rescale_betas_zero_snr)."""
        return cls(
            num_timesteps=cfg.num_diffusion_timesteps,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            prediction_type=cfg.prediction_type,
            rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        )

    def to_dict(self) -> dict:
        """JSON-able description, stored in model.safetensors metadata so sampling rebuilds the same process."""
        return {
            "num_timesteps": self.num_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionProcess":
        """Inverse of to_dict; files written before a field existed get that field's default."""
        known = {"num_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "rescale_betas_zero_snr"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown diffusion process keys {sorted(unknown)}")
        return cls(**d)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"DiffusionProcess({args})"

    # ---------------------------------------------------------------------------------------------- helpers

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The table self.<name> (alphas_cumprod, snr, ...) at t, reshaped to broadcast against `like`
        (B, C, H, W) -> (B, 1, 1, 1), in like's dtype/device. Each table is copied once per device, kept by name."""
        key = (name, like.device)
        table = self._device_cache.get(key)
        if table is None:
            table = getattr(self, name).to(device=like.device, dtype=torch.float32)  # no float64 on some devices
            self._device_cache[key] = table
        t = t.to(like.device).long()
        out = table[t].to(like.dtype)  # (B,)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # ---------------------------------------------------------------------------------------------- formulas

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise: (B, C, H, W); t: (B,) long in [0, T).
        """
        ab = self.gather("alphas_cumprod", t, x0)  # (B, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: eps (DDPM eq. 14), or v = sqrt(ab) eps - sqrt(1 - ab) x_0
        (Salimans & Ho 2022, "Progressive Distillation", sec. 4 / appendix D)."""
        if self.prediction_type == "epsilon":
            return noise
        ab = self.gather("alphas_cumprod", t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predict_x0_and_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert the network's prediction into (x0_hat, eps_hat), whatever the prediction type.

        epsilon:       x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)           (DDIM eq. 9, "predicted x_0")
        v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v
        """
        ab = self.gather("alphas_cumprod", t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * model_output
            eps = (1 - ab).sqrt() * x_t + ab.sqrt() * model_output
        return x0, eps

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and sec. 3.4), (B,) float32.

        The x_0-loss weight is min(SNR_t, gamma); the eps loss equals SNR_t times the x_0 loss and the v loss
        (SNR_t + 1) times it, so the weight of the regression this process trains is
            epsilon:       min(SNR_t, gamma) / SNR_t
            v_prediction:  min(SNR_t, gamma) / (SNR_t + 1)
        """
        snr = self.gather("snr", t, torch.empty(0, dtype=torch.float32, device=t.device)).view(-1)  # (B,)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def sample_timesteps(self, batch_size: int, device="cpu", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t ~ Uniform{0, .., T-1}, (B,) long (DDPM Algorithm 1, line 3)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)


def offset_noise(shape, offset: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """eps ~ N(0, I) plus `offset` times one N(0, 1) draw per (sample, channel), shared by all pixels
    (Guttenberg 2023). With offset 0 it is plain N(0, I) and draws exactly the numbers torch.randn does.
    Drawn on the generator's device. (B, C, H, W)."""
    device = generator.device if generator is not None else "cpu"
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator, device=device)
    return noise


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_fn: str = "mse", weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean regression loss between the prediction and the target, computed in float32 (safe under bf16/fp16).

    mse    DDPM's simplified objective L_simple (eq. 14)
    l1     mean absolute error (LDM's optional `l1` loss)
    huber  Huber loss with delta = HUBER_DELTA
    `weights` (B,) scale each sample's mean loss (min-SNR weighting) before the batch mean.
    """
    pred, target = pred.float(), target.float()
    if loss_fn == "mse":
        per_element = F.mse_loss(pred, target, reduction="none")
    elif loss_fn == "l1":
        per_element = F.l1_loss(pred, target, reduction="none")
    elif loss_fn == "huber":
        per_element = F.huber_loss(pred, target, delta=HUBER_DELTA, reduction="none")
    else:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; expected one of {LOSS_FNS}")
    per_sample = per_element.reshape(per_element.shape[0], -1).mean(1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()
