"""Samplers: small pure functions over one denoiser contract, `model(x_t, t, cond) -> prediction`.

    x0 = ddim_sample(unet, process, (4, 4, 32, 32), cond=c, uncond=unet.null_condition(4),
                     guidance_scale=4.0, num_steps=50, generator=torch.Generator().manual_seed(0))

`prediction` is whatever `process.prediction_type` says (epsilon or v); the process turns it into
(x0_hat, eps_hat). Classifier-free guidance (Ho & Salimans 2022, eq. 6) combines the conditional and the
unconditional prediction, both from ONE batched forward pass over [uncond; cond]:

    pred = pred_u + s * (pred_c - pred_u)

Three samplers share that contract: ddim_sample (Song et al. 2021), dpmpp_2m_sample (DPM-Solver++(2M), Lu et al.
2022: second order, about as good in 20 steps as DDIM in 50) and ddpm_sample (ancestral, every step).

Guiding v is the same as guiding eps: at a fixed x_t, eps is an affine function of v with the same weights for
both branches. With s == 1 (or no `uncond`) the model runs once, on the conditional input only.

Noise is drawn from `generator` on the generator's device and then moved, so a seed gives the same images on
CPU and GPU. `generator` may also be a list with one generator per image (as in diffusers): image i's noise then
comes from generator i alone, whatever the batch it is drawn in. Nothing here clips x0_hat: latents are not bounded like pixels are.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from src.diffusion.schedule import DiffusionProcess
from src.models.unet import Condition

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[Condition]], torch.Tensor]
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]  # one for the batch, or one per image


def _randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):  # row i from generator i: (B, ...) = cat of B draws of (1, ...)
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
        return torch.cat([_randn((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def guided_prediction(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Optional[Condition],
    uncond: Optional[Condition] = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """The model's prediction at (x, t), with classifier-free guidance when `uncond` is given and scale != 1.

    guidance_rescale = phi > 0 pulls the guided prediction's per-sample standard deviation back towards the
    conditional one's (Lin et al. 2024, eq. 15-16), which keeps high guidance from over-saturating:
        pred_rescaled = pred * std(pred_c) / std(pred)                                  (eq. 15)
        pred_final    = phi * pred_rescaled + (1 - phi) * pred                          (eq. 16)
    """
    if uncond is None or guidance_scale == 1.0:
        return model(x, t, cond)
    both = model(torch.cat([x, x]), torch.cat([t, t]), Condition.cat(uncond, cond))  # (2B, C, H, W)
    pred_u, pred_c = both.chunk(2)
    pred = pred_u + guidance_scale * (pred_c - pred_u)
    if guidance_rescale > 0:
        dims = list(range(1, pred.dim()))
        std, std_c = pred.std(dim=dims, keepdim=True), pred_c.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
        # a constant prediction has nothing to rescale (0 / 0 made its sample NaN, as in diffusers)
        rescaled = pred * torch.where(std > 0, std_c / std, torch.ones_like(std))  # eq. 15
        pred = guidance_rescale * rescaled + (1 - guidance_rescale) * pred  # eq. 16
    return pred


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Descending sub-sequence of [0, T) with `num_steps` entries, "trailing" spacing: it starts at T - 1, the
    step the model was trained to denoise from pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", table 2). With num_steps == T it is every step T-1 .. 0."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    stride = num_timesteps / num_steps
    return [int(round(num_timesteps - i * stride)) - 1 for i in range(num_steps)]


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    process: DiffusionProcess,
    shape,
    cond: Optional[Condition] = None,
    uncond: Optional[Condition] = None,
    guidance_scale: float = 1.0,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    device="cpu",
    progress: bool = False,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta = 0 is the deterministic ODE-like sampler; eta = 1 with num_steps = T is DDPM.

    Each step from t to the previous timestep s (s = -1 after the last step, where alpha_bar_{-1} = 1):
      1. pred = guided model output at (x_t, t)
      2. (x0_hat, eps_hat) from pred                                   (eq. 9, or the v-parameterisation)
      3. sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)          (eq. 16)
      4. x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z         (eq. 12)
    Returns x_0 with `shape`, float32. eta outside [0, 1] is refused: below 0, step 4 would shrink the eps_hat term
    by sigma^2 yet add no noise, collapsing the samples towards their mean; above 1, sigma^2 exceeds 1 - ab_s at the
    low-noise steps (1.59 (1 - ab_s) at eta 1.5, 50 steps), where step 4 is undefined (diffusers returns NaN).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    x = _randn(shape, generator, device)  # x_T ~ N(0, I), (B, C, H, W)
    timesteps = ddim_timesteps(process.num_timesteps, num_steps)
    ab_all = process.alphas_cumprod  # float64 (T,)
    for i, t in enumerate(tqdm(timesteps, desc="ddim", disable=not progress)):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        # 1.
        pred = guided_prediction(model, x, t_batch, cond, uncond, guidance_scale, guidance_rescale).float()
        # 2.
        x0, eps = process.predict_x0_and_eps(x, t_batch, pred)
        # 3.
        ab_t = float(ab_all[t])
        ab_s = float(ab_all[prev]) if prev >= 0 else 1.0
        sigma = eta * ((1 - ab_s) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_s) ** 0.5
        # 4.
        x = ab_s**0.5 * x0 + max(1 - ab_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn(shape, generator, device)
    return x


def _alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of a VP process at alpha_bar: alpha = sqrt(ab), sigma = sqrt(1 - ab),
    lambda = log(alpha / sigma) (half the log-SNR), +-inf at the clean and at a zero-SNR end."""
    alpha, sigma = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if alpha == 0.0:
        return alpha, sigma, -math.inf
    if sigma == 0.0:
        return alpha, sigma, math.inf
    return alpha, sigma, math.log(alpha) - math.log(sigma)


@torch.no_grad()
def dpmpp_2m_sample(
    model: Denoiser,
    process: DiffusionProcess,
    shape,
    cond: Optional[Condition] = None,
    uncond: Optional[Condition] = None,
    guidance_scale: float = 1.0,
    num_steps: int = 20,
    generator: Generators = None,
    device="cpu",
    progress: bool = False,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a multistep second-order solver of the
    diffusion ODE in its data-prediction form, on the same "trailing" timesteps as DDIM, ending at the clean
    sample. With lambda = log(alpha / sigma), h_i = lambda_{i} - lambda_{i-1} and D the denoised estimate x0_hat:

      1. x0_i = data prediction of the guided model output at (x_i, t_i)
      2. first step and last step (first order, = DDIM):  D = x0_i
         otherwise, r = h_{i-1} / h_i:                     D = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1}
      3. x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_{i+1}) - 1) D                  (eq. 5 / Alg. 2)
    The last step goes to sigma = 0, where step 3 returns D itself (the same final step as diffusers'
    DPMSolverMultistepScheduler with final_sigmas_type="zero"). Returns x_0 with `shape`, float32.
    """
    x = _randn(shape, generator, device)  # x_T ~ N(0, I), (B, C, H, W)
    timesteps = ddim_timesteps(process.num_timesteps, num_steps)
    ab_all = process.alphas_cumprod  # float64 (T,)
    x0_prev, h_prev = None, None
    for i, t in enumerate(tqdm(timesteps, desc="dpm-solver++", disable=not progress)):
        last = i + 1 == len(timesteps)
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(float(ab_all[t]))
        alpha_s, sigma_s, lambda_s = _alpha_sigma_lambda(1.0 if last else float(ab_all[timesteps[i + 1]]))
        # 1.
        pred = guided_prediction(model, x, t_batch, cond, uncond, guidance_scale, guidance_rescale).float()
        x0, _ = process.predict_x0_and_eps(x, t_batch, pred)
        # 2.
        h = lambda_s - lambda_t
        if x0_prev is None or last:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # 3. exp(-h) = (alpha_t sigma_s) / (sigma_t alpha_s), finite at both ends of the schedule
        exp_neg_h = (alpha_t * sigma_s) / (sigma_t * alpha_s)
        x = (sigma_s / sigma_t) * x - alpha_s * (exp_neg_h - 1.0) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def ddpm_sample(
    model: Denoiser,
    process: DiffusionProcess,
    shape,
    cond: Optional[Condition] = None,
    uncond: Optional[Condition] = None,
    guidance_scale: float = 1.0,
    generator: Generators = None,
    device="cpu",
    progress: bool = False,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps (Ho et al. 2020, Algorithm 2, posterior form).

    For t = T-1 .. 0:
      1. pred = guided model output at (x_t, t); (x0_hat, eps_hat) from pred
      2. mean = coef_x0 * x0_hat + coef_xt * x_t                      (eq. 7, the posterior q(x_{t-1} | x_t, x_0))
      3. x_{t-1} = mean + sqrt(beta_tilde_t) z, z ~ N(0, I); no noise at the last step     (eq. 7, sigma^2 = beta_tilde)
    Returns x_0 with `shape`, float32.
    """
    x = _randn(shape, generator, device)  # x_T ~ N(0, I)
    for t in tqdm(range(process.num_timesteps - 1, -1, -1), desc="ddpm", disable=not progress):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        # 1.
        pred = guided_prediction(model, x, t_batch, cond, uncond, guidance_scale, guidance_rescale).float()
        x0, _ = process.predict_x0_and_eps(x, t_batch, pred)
        # 2.
        x = float(process.posterior_mean_coef_x0[t]) * x0 + float(process.posterior_mean_coef_xt[t]) * x
        # 3.
        if t > 0:
            x = x + float(process.posterior_variance[t]) ** 0.5 * _randn(shape, generator, device)
    return x
