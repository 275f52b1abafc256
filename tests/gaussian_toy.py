"""The Gaussian toy problem of the sampler tests: data N(MU, STD^2) per dimension, whose optimal denoiser is known
in closed form (see tests/test_diffusion.py's docstring)."""

from src.diffusion.schedule import DiffusionProcess

MU, STD = 1.5, 0.5


def gaussian_eps_denoiser(process: DiffusionProcess, mu: float = MU, std: float = STD):
    def model(x, t, cond):
        ab = process.gather("alphas_cumprod", t, x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)

    return model


def gaussian_v_denoiser(process: DiffusionProcess, mu: float = MU, std: float = STD):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) from the posterior mean
    E[x0 | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab), defined at zero SNR (ab = 0) too."""

    def model(x, t, cond):
        ab = process.gather("alphas_cumprod", t, x)
        x0 = mu + ab.sqrt() * std**2 * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model
