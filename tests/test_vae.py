"""Autoencoder, posterior and quantiser: shapes, closed forms, gradients, serialisation, diffusers layout."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from src.config import ModelConfig, VAEConfig, load_model_config, to_dict
from src.models.diffusers_compat import vae_state_to_diffusers
from src.models.quantizer import VectorQuantizer, nearest_codes
from src.models.serialization import save_models
from src.models.vae import DiagonalGaussian, build_autoencoder, load_autoencoder
from tests.conftest import ROOT


def tiny_cfg(**overrides) -> VAEConfig:
    base = dict(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, groupnorm_groups=4)
    base.update(overrides)
    return VAEConfig(**base)


def test_design_config_maps_256_to_4x32x32_latent():
    cfg = load_model_config(ROOT / "configs" / "ldm.yaml").vae
    with torch.device("meta"):  # shapes only: no memory, no compute
        vae = build_autoencoder(cfg)
        mean, std = vae.latent_moments(torch.empty(2, 3, 256, 256))
        image = vae.decode_latent(mean)
    assert mean.shape == std.shape == (2, 4, 32, 32)
    assert image.shape == (2, 3, 256, 256)


def test_parameters_map_one_to_one_onto_diffusers_autoencoderkl():
    from diffusers import AutoencoderKL

    cfg = load_model_config(ROOT / "configs" / "ldm.yaml").vae
    with torch.device("meta"):
        ours = build_autoencoder(cfg)
        theirs = AutoencoderKL(
            block_out_channels=tuple(cfg.vae_channels_per_block),
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=cfg.residual_layers_per_block,
            latent_channels=cfg.latent_channels,
        )
    ours_shapes = {k: v.shape for k, v in vae_state_to_diffusers(ours.state_dict()).items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_vq_parameters_map_onto_diffusers_vqmodel():
    from diffusers import VQModel

    cfg = tiny_cfg(quantize=True, codebook_size=32, vq_embed_dim=3, groupnorm_groups=8)
    ours = build_autoencoder(cfg)
    theirs = VQModel(
        block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4,
        num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=8,
    )
    ours_shapes = {k: v.shape for k, v in vae_state_to_diffusers(dict(ours.named_parameters())).items()}
    theirs_shapes = {k: v.shape for k, v in theirs.named_parameters()}
    assert ours_shapes == theirs_shapes


def test_kl_equals_closed_form_and_logvar_is_clamped():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)  # (B, 2C, h, w)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(moments[:, :4], torch.exp(0.5 * moments[:, 4:]))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p)  # (B, C, h, w)
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-6)
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1))
    assert extreme.logvar.max().item() == 20.0
    assert torch.isfinite(extreme.kl()).all()
    assert DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -99.0)], 1)).logvar.item() == -30.0


def test_sampling_uses_generator_and_mode_is_mean():
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert torch.equal(post.mode(), post.mean)


def test_kl_autoencoder_round_trip_shapes_and_gradients():
    vae = build_autoencoder(tiny_cfg())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vae(x)
    assert out.reconstruction.shape == x.shape and out.quant is None
    assert out.posterior.mean.shape == (2, 4, 8, 8)
    (out.reconstruction - x).abs().mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0


def test_vq_straight_through_gradient_reaches_encoder():
    vae = build_autoencoder(tiny_cfg(quantize=True, codebook_size=16, vq_embed_dim=3))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vae(x)
    assert out.posterior is None and out.quant.indices.shape == (2, 8, 8)
    # reconstruction only: the lookup has no gradient, so only straight-through can carry one to the encoder
    (out.reconstruction - x).abs().mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad is None or vae.quantize.embedding.weight.grad.abs().sum() == 0
    vae.zero_grad()
    vae(x).quant.loss.backward()  # the codebook term trains the codebook
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0


def test_nearest_codes_matches_brute_force():
    torch.manual_seed(0)
    z, codes = torch.randn(300, 5), torch.randn(40, 5)
    expected = torch.cdist(z, codes).argmin(1)
    assert torch.equal(nearest_codes(z, codes, chunk=64), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_codes_are_chosen_in_fp32_under_autocast(dtype):
    """Training and decoding run under autocast: its low-precision matmul picked another code for ~2-15 % of the
    rows (256-8192 codes of width 4), so the distances must stay fp32."""
    torch.manual_seed(0)
    z, codes = torch.randn(4000, 4), torch.randn(1024, 4)
    expected = torch.cdist(z, codes).argmin(1)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(nearest_codes(z, codes), expected)


def test_quantizer_loss_is_codebook_plus_beta_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, beta=0.25, reset_steps=0)
    z = torch.randn(1, 2, 3, 3)
    out = vq(z)
    err = ((out.z_q - z) ** 2).mean()
    torch.testing.assert_close(out.loss, err * 1.25)
    torch.testing.assert_close(out.z_q, vq.lookup(z))


def test_dead_codes_are_reseeded_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, beta=0.25, reset_steps=2).train()
    with torch.no_grad():
        vq.embedding.weight[1:] = 100.0  # far from any input: never chosen
        vq.embedding.weight[0] = 0.0
    z = torch.randn(2, 2, 4, 4)
    for _ in range(3):
        out = vq(z)
    assert out.usage.item() > 1 / 8  # re-seeded codes are now chosen
    assert vq.embedding.weight[1:].abs().max() < 10
    assert vq.unused_steps.max() < 2


def _ddp_reseed_worker(rank: int, world: int, init_file: str, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, reset_steps=1).train()  # same init on both ranks
    torch.manual_seed(100 + rank)
    for _ in range(3):
        vq(torch.randn(2, 3, 4, 4) + rank)  # different encoder outputs per rank
    results[rank] = vq.embedding.weight.detach().clone()
    dist.destroy_process_group()


def test_reseeding_keeps_codebooks_identical_across_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_reseed_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    initial = VectorQuantizer(16, 3).embedding.weight.detach()
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], initial)
    assert results[0].abs().max() > 1 / 16  # re-seeded away from the uniform(-1/K, 1/K) init


@pytest.mark.parametrize("quantize", [False, True])
def test_load_autoencoder_rebuilds_from_file_alone(tmp_path, quantize):
    cfg = tiny_cfg(quantize=quantize, codebook_size=16, vq_embed_dim=3)
    vae = build_autoencoder(cfg).eval()
    model_cfg = ModelConfig(vae=cfg)
    path = save_models(tmp_path / "model.safetensors", {"vae": vae}, {"model_config": to_dict(model_cfg), "stage": 1})
    loaded = load_autoencoder(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        m1, s1 = vae.latent_moments(x)
        m2, s2 = loaded.latent_moments(x)
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(vae.decode_latent(m1), loaded.decode_latent(m2))
    assert not loaded.training
    if quantize:
        assert torch.equal(s2, torch.zeros_like(s2))
    # stage 2's model file holds more modules next to the VAE
    extra = torch.nn.Linear(2, 2)
    path2 = save_models(tmp_path / "s2.safetensors", {"vae": vae, "unet": extra}, {"model_config": to_dict(model_cfg)})
    assert load_autoencoder(path2).config == cfg


def test_load_autoencoder_rejects_file_without_vae(tmp_path):
    path = save_models(tmp_path / "m.safetensors", {"unet": torch.nn.Linear(2, 2)}, {"stage": 2})
    with pytest.raises(ValueError, match="no autoencoder"):
        load_autoencoder(path)


def test_img_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="not divisible"):
        build_autoencoder(tiny_cfg(img_size=15))


def test_decode_latent_runs_in_fp32_under_fp16_autocast():
    vae = build_autoencoder(tiny_cfg()).eval()
    z = torch.randn(1, 4, 8, 8) * 50  # large latents: fp16 activations would lose range
    with torch.no_grad():
        reference = vae.decode_latent(z)
        with torch.autocast("cpu", dtype=torch.float16):
            out = vae.decode_latent(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)
