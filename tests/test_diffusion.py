"""The diffusion process and the samplers: closed forms, and exact sampling on a Gaussian toy problem.

The toy data distribution is N(mu, s^2) per dimension. For it the optimal denoiser is known in closed form:
with x_t = sqrt(ab) x0 + sqrt(1 - ab) eps,
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
so the samplers can be checked against the true data distribution without training anything.
"""

import math

import pytest
import torch

from src.config import Stage2TrainConfig
from src.diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample, guided_prediction
from src.diffusion.schedule import DiffusionProcess, diffusion_loss, make_betas
from src.models.unet import Condition
from tests.gaussian_toy import MU, STD, gaussian_eps_denoiser, gaussian_v_denoiser

N_SAMPLES = 3000


# ------------------------------------------------------------------------------------------------ schedule


def test_linear_alphas_cumprod_closed_form():
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02)
    assert p.betas[0].item() == pytest.approx(1e-4) and p.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), beta_s = beta_start + s (beta_end - beta_start) / (T - 1)
    for t in (0, 1, 10, 499, 999):
        expected = math.prod(1 - (1e-4 + s * (0.02 - 1e-4) / 999) for s in range(t + 1))
        assert p.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-9)
    assert torch.all(p.alphas_cumprod[1:] < p.alphas_cumprod[:-1])


@pytest.mark.parametrize(
    "schedule,diffusers_name,start,end",
    [("linear", "linear", 1e-4, 0.02), ("scaled_linear", "scaled_linear", 0.00085, 0.012),
     ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)],
)
def test_schedules_match_diffusers(schedule, diffusers_name, start, end):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, beta_start=start, beta_end=end)
    p = DiffusionProcess(1000, schedule, start, end)
    torch.testing.assert_close(p.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_cosine_schedule_closed_form():
    p = DiffusionProcess(1000, "cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # alpha_bar(t) = f(t + 1) / f(0) for our 0-based t (no clipping here)
        assert p.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert p.betas.max().item() <= 0.999


def test_add_noise_closed_form_and_statistics():
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    out = p.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        ab = math.prod(1 - b for b in p.betas[: ti + 1].tolist())
        torch.testing.assert_close(out[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], rtol=1e-5, atol=1e-5)
    # x_t | x0 has variance 1 - alpha_bar_t: at t = 999 the signal is almost gone
    x0c = torch.full((20000,), 2.0)
    xt = p.add_noise(x0c, torch.randn(20000, generator=g), torch.full((20000,), 999))
    ab = p.alphas_cumprod[999].item()
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(ab), abs=0.03)
    assert xt.var().item() == pytest.approx(1 - ab, abs=0.03)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_and_inversion_round_trip(prediction_type):
    p = DiffusionProcess(1000, "linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([5, 300, 990])
    xt = p.add_noise(x0, noise, t)
    target = p.training_target(x0, noise, t)
    if prediction_type == "epsilon":
        torch.testing.assert_close(target, noise)
    else:
        ab = p.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    x0_hat, eps_hat = p.predict_x0_and_eps(xt, t, target)  # a perfect prediction inverts exactly
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(x0_hat[1:], x0[1:], rtol=1e-4, atol=2e-4)  # t=5 eps form divides by ~1: fine too
    torch.testing.assert_close(x0_hat[:1], x0[:1], rtol=1e-3, atol=1e-3)


def test_losses():
    pred = torch.tensor([0.0, 0.05, 1.0, -2.0])
    target = torch.zeros(4)
    assert diffusion_loss(pred, target, "mse").item() == pytest.approx((0.05**2 + 1 + 4) / 4)
    assert diffusion_loss(pred, target, "l1").item() == pytest.approx((0.05 + 1 + 2) / 4)
    d = 0.1  # quadratic below delta, linear above
    huber = (0.5 * 0.05**2 + d * (1 - d / 2) + d * (2 - d / 2)) / 4
    assert diffusion_loss(pred, target, "huber").item() == pytest.approx(huber)
    with pytest.raises(ValueError, match="loss_fn"):
        diffusion_loss(pred, target, "l3")
    assert diffusion_loss(pred.bfloat16(), target.bfloat16(), "mse").dtype == torch.float32


def test_config_and_dict_round_trip():
    cfg = Stage2TrainConfig(num_diffusion_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012, prediction_type="v_prediction")
    p = DiffusionProcess.from_config(cfg)
    assert (p.num_timesteps, p.prediction_type) == (500, "v_prediction")
    q = DiffusionProcess.from_dict(p.to_dict())
    assert q.to_dict() == p.to_dict()
    torch.testing.assert_close(q.alphas_cumprod, p.alphas_cumprod)
    with pytest.raises(ValueError):
        DiffusionProcess.from_dict({**p.to_dict(), "clip_sample": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("sigmoid", 10, 1e-4, 0.02)


def test_schedules_without_noise_at_the_first_step_or_with_zero_snr_for_epsilon_are_refused():
    from src.training.stage2 import Stage2SetupError, build_process

    # beta_start 0: alpha_bar_0 = 1, the DDPM posterior at t = 0 is 0 / 0 and ddpm_sample returned NaN
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionProcess(100, "linear", 0.0, 0.02)
    with pytest.raises(Stage2SetupError, match="beta_start"):
        build_process(Stage2TrainConfig(num_diffusion_timesteps=100, beta_start=0.0))
    # beta_end 1: alpha_bar reaches 0 (underflowing before the last step): eps-prediction's x0_hat divided by 0
    # (every sampler returned NaN) and DDIM raised ZeroDivisionError even for v-prediction
    for prediction_type in ("epsilon", "v_prediction"):
        with pytest.raises(ValueError, match="beta_end"):
            DiffusionProcess(1000, "linear", 1e-4, 1.0, prediction_type)
    # the one schedule with a beta of 1 that the samplers handle: the rescaled last step, with v-prediction
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02, "v_prediction", rescale_betas_zero_snr=True)
    assert p.betas[-1].item() == 1.0 and p.betas[:-1].max().item() < 1


# ------------------------------------------------------------------------------------------------ samplers


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    steps = ddim_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps == sorted(steps, reverse=True)
    assert len(set(steps)) == 50 and min(steps) >= 0


def test_ddim_eta0_is_deterministic():
    p = DiffusionProcess(1000)
    model = gaussian_eps_denoiser(p)
    a = ddim_sample(model, p, (64, 1), num_steps=20, eta=0.0, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(model, p, (64, 1), num_steps=20, eta=0.0, generator=torch.Generator().manual_seed(3))
    c = ddim_sample(model, p, (64, 1), num_steps=20, eta=0.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # eta = 0 draws only x_T: the same x_T through the ODE gives the same sample whatever follows in the stream
    g = torch.Generator().manual_seed(3)
    d = ddim_sample(model, p, (64, 1), num_steps=20, eta=0.0, generator=g)
    torch.randn(5, generator=g)
    torch.testing.assert_close(a, d, rtol=0, atol=0)


def test_ddim_full_steps_eta1_matches_ddpm_in_distribution():
    p = DiffusionProcess(1000)
    model = gaussian_eps_denoiser(p)
    ddpm = ddpm_sample(model, p, (N_SAMPLES, 1), generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample(model, p, (N_SAMPLES, 1), num_steps=1000, eta=1.0, generator=torch.Generator().manual_seed(1))
    # both sample the data distribution N(MU, STD^2) (standard errors: 0.009 for the mean, 0.007 for the std)
    for x in (ddpm, ddim):
        assert x.mean().item() == pytest.approx(MU, abs=0.04)
        assert x.std().item() == pytest.approx(STD, abs=0.03)
    assert abs(ddpm.mean().item() - ddim.mean().item()) < 0.05
    assert abs(ddpm.std().item() - ddim.std().item()) < 0.04
    # and with the same noise stream they are the same chain step by step (DDIM eq. 16 with eta=1 is DDPM's beta~)
    same = ddim_sample(model, p, (N_SAMPLES, 1), num_steps=1000, eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, ddpm, rtol=1e-4, atol=1e-4)


def test_ddim_50_steps_samples_the_data_distribution():
    p = DiffusionProcess(1000)
    x = ddim_sample(gaussian_eps_denoiser(p), p, (N_SAMPLES, 1), num_steps=50, generator=torch.Generator().manual_seed(5))
    assert x.mean().item() == pytest.approx(MU, abs=0.04)
    assert x.std().item() == pytest.approx(STD, abs=0.05)  # 50-step discretisation shrinks it a little


def test_v_prediction_gives_the_same_samples_as_epsilon():
    p_eps, p_v = DiffusionProcess(1000), DiffusionProcess(1000, prediction_type="v_prediction")
    for sampler in (lambda m, p: ddim_sample(m, p, (256, 2), num_steps=25, eta=0.5, generator=torch.Generator().manual_seed(7)),
                    lambda m, p: ddpm_sample(m, p, (256, 2), generator=torch.Generator().manual_seed(7))):
        a = sampler(gaussian_eps_denoiser(p_eps), p_eps)
        b = sampler(gaussian_v_denoiser(p_v), p_v)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


class CountingModel:
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.model(x, t, cond)


def label_denoiser(process: DiffusionProcess):
    """Toy class-conditional denoiser: class k's data is N(k, STD^2); the null class (index 9) is N(0, 1)."""

    def model(x, t, cond):
        ab = process.gather("alphas_cumprod", t, x)
        is_null = (cond.labels == 9).view(-1, *([1] * (x.dim() - 1)))
        mu = torch.where(is_null, 0.0, cond.labels.float().view_as(is_null))
        std = torch.where(is_null, 1.0, STD)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)

    return model


def test_guidance_scale_one_is_the_conditional_prediction():
    p = DiffusionProcess(1000)
    model = CountingModel(label_denoiser(p))
    cond, uncond = Condition(labels=torch.full((8,), 3)), Condition(labels=torch.full((8,), 9))
    x, t = torch.randn(8, 1, generator=torch.Generator().manual_seed(0)), torch.full((8,), 400)
    torch.testing.assert_close(guided_prediction(model, x, t, cond, uncond, 1.0), model.model(x, t, cond))
    assert model.calls == [8]  # one conditional forward, no wasted unconditional half
    a = ddim_sample(model, p, (8, 1), cond=cond, uncond=uncond, guidance_scale=1.0, num_steps=10,
                    generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, p, (8, 1), cond=cond, num_steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_combines_one_batched_forward():
    p = DiffusionProcess(1000)
    model = CountingModel(label_denoiser(p))
    cond, uncond = Condition(labels=torch.full((8,), 3)), Condition(labels=torch.full((8,), 9))
    x, t = torch.randn(8, 1, generator=torch.Generator().manual_seed(0)), torch.full((8,), 400)
    guided = guided_prediction(model, x, t, cond, uncond, 4.0)
    assert model.calls == [16]  # [uncond; cond] in one forward
    e_c, e_u = model.model(x, t, cond), model.model(x, t, uncond)
    torch.testing.assert_close(guided, e_u + 4.0 * (e_c - e_u))
    # guidance pushes samples away from the unconditional distribution: class 3 sampled with s=3 lands beyond 3
    model.calls.clear()
    xs = ddim_sample(model, p, (8, 1), cond=cond, uncond=uncond, guidance_scale=3.0, num_steps=10,
                     generator=torch.Generator().manual_seed(2))
    assert model.calls == [16] * 10
    assert xs.mean().item() > 3.5


def test_eta_outside_0_1_is_refused_not_a_collapsed_or_overdispersed_sampler():
    """eta < 0 would shrink DDIM's eps_hat term by sigma^2 and add no noise: the samples collapsed onto their mean
    (std 0.002 instead of 0.5 on the toy). eta > 1 makes sigma^2 > 1 - ab_s at the low-noise steps, where DDIM's
    step is undefined (diffusers: NaN; ours clamped the eps_hat term to 0 and kept the excess noise). The sampler
    and both scripts refuse both; --eta with another sampler too."""
    import evaluate_ldm
    import inference_ldm

    p = DiffusionProcess(1000)
    for eta in (-1.0, 1.5):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            ddim_sample(gaussian_eps_denoiser(p), p, (8, 1), num_steps=5, eta=eta,
                        generator=torch.Generator().manual_seed(0))
    # eta 1.5 is undefined on this grid: sigma^2 / (1 - ab_s) reaches 1.59 at 50 steps (1 is the limit)
    ts = ddim_timesteps(1000, 50)
    ab = p.alphas_cumprod
    assert max((1.5**2 * (1 - ab[t] / ab[s]) / (1 - ab[t])).item() for t, s in zip(ts, ts[1:])) > 1.5
    for parse in (inference_ldm.parse_args, evaluate_ldm.parse_args):
        for flags in (["--eta", "-1"], ["--eta", "1.5"], ["--sampler", "dpmpp_2m", "--eta", "1"], ["--sampler", "ddpm", "--eta", "0.5"]):
            with pytest.raises(SystemExit):
                parse(["--path_to_weights", "model.safetensors", *flags])
        assert parse(["--path_to_weights", "model.safetensors", "--eta", "1"]).eta == 1.0  # DDIM takes it
        assert parse(["--path_to_weights", "model.safetensors", "--sampler", "dpmpp_2m", "--eta", "0"]).eta == 0.0
