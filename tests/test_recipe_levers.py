"""The recipe levers of stage 2: zero-terminal SNR, min-SNR-gamma weighting, offset noise, guidance rescale and the
DPM-Solver++(2M) sampler, each checked against diffusers or a closed form, and each config key honoured when set
and rejected when misspelt."""

import pytest
import torch
import yaml

from src.config import ConfigError, Stage2TrainConfig, load_config
from src.diffusion.samplers import ddim_sample, dpmpp_2m_sample, guided_prediction
from src.diffusion.schedule import DiffusionProcess, diffusion_loss, offset_noise
from src.models.unet import Condition
from src.training.stage2 import Stage2SetupError, build_process, diffusion_step_loss
from tests.gaussian_toy import MU, STD, gaussian_eps_denoiser, gaussian_v_denoiser

# ------------------------------------------------------------------------------------------ zero terminal SNR


@pytest.mark.parametrize("schedule,diffusers_name,start,end", [("linear", "linear", 1e-4, 0.02),
                                                                ("scaled_linear", "scaled_linear", 0.00085, 0.012)])
def test_zero_terminal_snr_matches_diffusers(schedule, diffusers_name, start, end):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, beta_start=start, beta_end=end,
                        rescale_betas_zero_snr=True, prediction_type="v_prediction")
    p = DiffusionProcess(1000, schedule, start, end, "v_prediction", rescale_betas_zero_snr=True)
    plain = DiffusionProcess(1000, schedule, start, end, "v_prediction")
    assert p.alphas_cumprod[-1].item() == 0.0 and p.snr[-1].item() == 0.0  # the last step is pure noise
    assert p.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)  # first kept
    torch.testing.assert_close(p.alphas_cumprod[:-1].float(), ref.alphas_cumprod[:-1].float(), rtol=1e-4, atol=1e-7)
    assert DiffusionProcess.from_dict(p.to_dict()).to_dict() == p.to_dict()


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ValueError, match="v_prediction"):
        DiffusionProcess(1000, "linear", rescale_betas_zero_snr=True)
    with pytest.raises(Stage2SetupError, match="v_prediction"):
        build_process(Stage2TrainConfig(rescale_betas_zero_snr=True))


def test_old_files_without_the_new_field_still_load():
    d = DiffusionProcess(1000, "linear").to_dict()
    del d["rescale_betas_zero_snr"]
    assert DiffusionProcess.from_dict(d).rescale_betas_zero_snr is False


# ------------------------------------------------------------------------------------------ min-SNR weighting


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper(prediction_type):
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02, prediction_type)
    t = torch.tensor([0, 10, 100, 300, 999])
    ab = p.alphas_cumprod[t]
    snr = ab / (1 - ab)
    x0_weight = torch.minimum(snr, torch.full_like(snr, 5.0))  # Hang et al. eq. 9 on the x_0 loss
    expected = x0_weight / snr if prediction_type == "epsilon" else x0_weight / (snr + 1)
    torch.testing.assert_close(p.min_snr_weights(t, 5.0), expected.float(), rtol=1e-5, atol=1e-7)
    # low-noise steps are down-weighted, high-noise steps keep weight 1 (eps) or SNR / (SNR + 1) (v)
    w = p.min_snr_weights(t, 5.0)
    assert w[0] < 0.01 and w[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))


def test_weighted_loss_is_the_weighted_mean_of_per_sample_losses():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    assert diffusion_loss(pred, target, "mse", w).item() == pytest.approx((per_sample * w).mean().item(), rel=1e-6)
    assert diffusion_loss(pred, target, "mse").item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())


def test_training_loss_honours_snr_gamma_and_noise_offset():
    """The same draws, the same model: only the keys under test change the loss."""

    class Echo(torch.nn.Module):  # a fixed 'denoiser' that predicts half its input
        def forward(self, x, t, cond):
            return 0.5 * x

        def drop_condition(self, cond, prob, generator):
            return cond

    z0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # some t < 90, where SNR > 5

    def loss(**keys):
        cfg = Stage2TrainConfig(**keys)
        net = Echo()
        return diffusion_step_loss(net, net, build_process(cfg), z0, None, cfg, torch.Generator().manual_seed(2)).item()

    base = loss()
    assert loss() == base
    assert loss(snr_gamma=5.0) != pytest.approx(base, rel=1e-3)
    assert loss(noise_offset=0.1) != pytest.approx(base, rel=1e-4)
    # the linear schedule's last SNR is already ~4e-5, so rescaling it moves the loss only a little, but it moves
    assert loss(prediction_type="v_prediction", rescale_betas_zero_snr=True) != loss(prediction_type="v_prediction")


# ------------------------------------------------------------------------------------------------ offset noise


def test_offset_noise():
    plain = offset_noise((3, 4, 6, 6), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0)))
    noise = offset_noise((4000, 4, 8, 8), 0.3, torch.Generator().manual_seed(0))
    channel_means = noise.mean(dim=(2, 3))  # (B, C): N(0, 1/64 + 0.3^2)
    assert channel_means.std().item() == pytest.approx((1 / 64 + 0.09) ** 0.5, rel=0.05)
    assert noise.std().item() == pytest.approx((1 + 0.09) ** 0.5, rel=0.02)


# ---------------------------------------------------------------------------------------------- guidance rescale


def test_guidance_rescale_matches_diffusers_and_its_end_points():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    outs = {"u": torch.randn(2, 4, 6, 6, generator=g), "c": 3 * torch.randn(2, 4, 6, 6, generator=g)}

    def model(x, t, cond):  # uncond rows first (labels 0), cond rows second (labels 1)
        return torch.where(cond.labels.view(-1, 1, 1, 1) == 0, outs["u"].repeat(2, 1, 1, 1), outs["c"].repeat(2, 1, 1, 1))

    x, t = torch.zeros(2, 4, 6, 6), torch.zeros(2, dtype=torch.long)
    cond, uncond = Condition(labels=torch.ones(2, dtype=torch.long)), Condition(labels=torch.zeros(2, dtype=torch.long))
    plain = guided_prediction(model, x, t, cond, uncond, 5.0)
    torch.testing.assert_close(plain, outs["u"] + 5.0 * (outs["c"] - outs["u"]))
    for phi in (0.0, 0.7, 1.0):
        ours = guided_prediction(model, x, t, cond, uncond, 5.0, guidance_rescale=phi)
        torch.testing.assert_close(ours, rescale_noise_cfg(plain, outs["c"], guidance_rescale=phi))
    full = guided_prediction(model, x, t, cond, uncond, 5.0, guidance_rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), outs["c"].std(dim=(1, 2, 3)))  # eq. 15
    # a sample whose predictions are constant (std 0) is left as guided, not turned into 0 / 0 = NaN
    outs["u"][1], outs["c"][1] = 0.5, 0.25
    flat = guided_prediction(model, x, t, cond, uncond, 5.0, guidance_rescale=0.7)
    torch.testing.assert_close(flat[1], torch.full_like(flat[1], 0.5 + 5.0 * (0.25 - 0.5)))
    torch.testing.assert_close(flat[0], rescale_noise_cfg(plain, outs["c"], guidance_rescale=0.7)[0])


# -------------------------------------------------------------------------------------------- DPM-Solver++(2M)


def _diffusers_dpmpp(process: DiffusionProcess, model, x_T: torch.Tensor, num_steps: int) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=process.num_timesteps, beta_schedule=process.beta_schedule, beta_start=process.beta_start,
        beta_end=process.beta_end, prediction_type=process.prediction_type, algorithm_type="dpmsolver++",
        solver_order=2, timestep_spacing="trailing",
    )
    sched.set_timesteps(num_steps)
    x = x_T.clone()
    for t in sched.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long), None)
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type,num_steps", [("epsilon", 20), ("v_prediction", 20), ("epsilon", 7)])
def test_dpmpp_2m_matches_diffusers(prediction_type, num_steps):
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02, prediction_type)
    model = gaussian_eps_denoiser(p) if prediction_type == "epsilon" else gaussian_v_denoiser(p)
    ours = dpmpp_2m_sample(model, p, (4, 3, 8, 8), num_steps=num_steps, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the same initial noise
    ref = _diffusers_dpmpp(p, model, x_T, num_steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_dpmpp_2m_in_20_steps_samples_the_data_distribution():
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02)
    x = dpmpp_2m_sample(gaussian_eps_denoiser(p), p, (3000, 2), num_steps=20, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(MU, abs=0.03) and x.std().item() == pytest.approx(STD, abs=0.03)
    # closer to DDIM-50 than DDIM-20 is (second order)
    ddim50 = ddim_sample(gaussian_eps_denoiser(p), p, (3000, 2), num_steps=50, generator=torch.Generator().manual_seed(1))
    ddim20 = ddim_sample(gaussian_eps_denoiser(p), p, (3000, 2), num_steps=20, generator=torch.Generator().manual_seed(1))
    assert (x - ddim50).abs().mean() < (ddim20 - ddim50).abs().mean()


def test_dpmpp_2m_at_zero_terminal_snr_is_finite_and_exact():
    p = DiffusionProcess(1000, "linear", 1e-4, 0.02, "v_prediction", rescale_betas_zero_snr=True)
    x = dpmpp_2m_sample(gaussian_v_denoiser(p), p, (3000, 2), num_steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.03) and x.std().item() == pytest.approx(STD, abs=0.03)


# ---------------------------------------------------------------------------------------------------- config keys

NEW_KEYS = {"rescale_betas_zero_snr": True, "snr_gamma": 5.0, "noise_offset": 0.05, "val_sampler": "dpmpp_2m",
            "val_guidance_rescale": 0.7}


def test_new_keys_are_read_and_misspelt_ones_rejected(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**NEW_KEYS, "prediction_type": "v_prediction"}))
    cfg = load_config(path, Stage2TrainConfig)
    assert {k: getattr(cfg, k) for k in NEW_KEYS} == NEW_KEYS
    assert build_process(cfg).rescale_betas_zero_snr is True
    for key in NEW_KEYS:
        path.write_text(yaml.safe_dump({key + "s": NEW_KEYS[key]}))
        with pytest.raises(ConfigError, match=f"closest valid key: '{key}'"):
            load_config(path, Stage2TrainConfig)
    path.write_text(yaml.safe_dump({"val_sampler": "euler"}))
    with pytest.raises(ConfigError, match="val_sampler"):
        load_config(path, Stage2TrainConfig)
    for bad in ({"snr_gamma": 0.0}, {"noise_offset": -0.1}, {"val_guidance_rescale": 1.5}):
        with pytest.raises(Stage2SetupError):
            build_process(Stage2TrainConfig(**bad))


def test_validation_grid_honours_val_sampler_and_guidance_rescale(stage2_setup, tmp_path, monkeypatch):
    """The stage-2 validation grid samples with val_sampler / val_sampler_steps / val_guidance_rescale: the latents it
    decodes are the pipeline's for those settings, and each setting changes them."""
    import copy
    import dataclasses

    from src.pipeline import LatentDiffusion
    from src.training.stage2 import validation_grid

    decoded = []  # the latents each grid decodes
    decode = LatentDiffusion.decode
    monkeypatch.setattr(LatentDiffusion, "decode", lambda self, z: decoded.append(z.clone()) or decode(self, z))

    ctx, _, initial = stage2_setup
    unet = copy.deepcopy(initial)  # its output layer starts at zero: every sampler would agree on eps = 0
    generator = torch.Generator().manual_seed(0)
    for p in unet.parameters():
        p.data = 0.05 * torch.randn(p.shape, generator=generator)
    saved = ctx.train_cfg, ctx.process, ctx.unet_module  # the fixture is shared: put them back
    # v-prediction keeps x0 near the data's scale under a random UNet (eps: x0 ~ x_T / sqrt(alpha_bar_T), ~100 x)
    ctx.process = process = build_process(dataclasses.replace(saved[0], prediction_type="v_prediction"))
    ctx.unet_module = unet
    settings = (("ddim", 0.0), ("dpmpp_2m", 0.0), ("dpmpp_2m", 0.7))
    try:
        for sampler, rescale in settings:
            ctx.train_cfg = dataclasses.replace(saved[0], val_sampler=sampler, val_sampler_steps=4,
                                                val_guidance_scale=3.0, val_guidance_rescale=rescale)
            assert validation_grid(ctx, unet, 0, tmp_path / f"{sampler}_{rescale}").is_file()
    finally:
        ctx.train_cfg, ctx.process, ctx.unet_module = saved

    pipe = LatentDiffusion(ctx.vae, unet, process, ctx.conditioning, ctx.scaling_factor, ctx.text_encoder)
    cond = ctx.val_text
    for (sampler, rescale), grid_z in zip(settings, decoded):
        z = pipe.sample_latents(cond.batch_size, cond, unet.null_condition(cond.batch_size), sampler, 4, 3.0,
                                generator=torch.Generator().manual_seed(saved[0].seed), guidance_rescale=rescale)
        torch.testing.assert_close(grid_z, z)
    scale = decoded[0].abs().mean()
    assert (decoded[0] - decoded[1]).abs().mean() > 1e-2 * scale  # the sampler
    # the guidance rescale: small here (a random UNet's conditional and null predictions have nearly the same std),
    # yet ~40 x the 1e-5 that assert_close above lets through
    assert (decoded[1] - decoded[2]).abs().mean() > 1e-4 * scale
