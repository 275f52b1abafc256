"""Stage-1 loss terms on hand-made inputs, the PatchGAN discriminator and the perceptual-network choice."""

import logging
import math

import pytest
import torch

from src.config import Stage1TrainConfig, VAEConfig
from src.losses.autoencoder import (
    AutoencoderLoss,
    adaptive_weight,
    hinge_d_loss,
    reconstruction_loss,
    vanilla_d_loss,
)
from src.losses.perceptual import build_perceptual_loss
from src.models.discriminator import (
    NLayerDiscriminator,
    build_discriminator,
    patch_map_size,
    sync_batchnorm_if_distributed,
)
from src.models.vae import build_autoencoder


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
    w = torch.nn.Parameter(torch.ones(4))
    a, b = torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    rec, gen = (w * a).sum(), (w * b).sum()  # gradients a (norm 5) and b (norm 1)
    d = adaptive_weight(rec, gen, w)
    assert d.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not d.requires_grad
    # a generator loss with no gradient at W: 5 / 1e-4 = 5e4, clamped to 1e4
    assert adaptive_weight((w * a).sum(), (w * 0).sum(), w).item() == pytest.approx(1e4)


def test_hinge_and_vanilla_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 softplus
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    # a perfect discriminator has zero hinge loss
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0.0


def test_reconstruction_losses():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(0.25)


def _setup(disc_start: int, quantize: bool = False):
    torch.manual_seed(0)
    vae = build_autoencoder(
        VAEConfig(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, groupnorm_groups=4,
                  quantize=quantize, codebook_size=16, vq_embed_dim=3)
    )
    cfg = Stage1TrainConfig(use_lpips=False, disc_start=disc_start, disc_start_dim=8, disc_depth=2, kl_weight=0.1)
    return vae, build_discriminator(cfg), AutoencoderLoss(cfg, None), torch.rand(2, 3, 16, 16) * 2 - 1


def test_generator_loss_before_disc_start_is_rec_plus_weighted_kl():
    vae, disc, loss_fn, x = _setup(disc_start=10)
    out = vae(x)
    loss, logs = loss_fn.generator_loss(x, out, disc, vae.last_layer(), step=9)
    expected = (x - out.reconstruction).abs().mean() + 0.1 * out.posterior.kl().mean()
    torch.testing.assert_close(loss, expected)
    assert "gen_loss" not in logs
    assert "lpips_loss" not in logs  # the perceptual term is off: no all-zero curve in the logs


def test_generator_loss_after_disc_start_adds_adaptive_gan_term_without_training_disc():
    vae, disc, loss_fn, x = _setup(disc_start=10)
    out = vae(x)
    loss, logs = loss_fn.generator_loss(x, out, disc, vae.last_layer(), step=10)
    base = logs["rec_loss"] + 0.1 * logs["kl_loss"]
    torch.testing.assert_close(loss.detach(), base + logs["adaptive_weight"] * 0.5 * logs["gen_loss"])
    assert logs["adaptive_weight"] > 0
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # only the autoencoder learns from this loss
    assert all(p.requires_grad for p in disc.parameters())
    d_loss, d_logs = loss_fn.discriminator_loss(disc, x, out.reconstruction)
    d_loss.backward()
    assert disc.main[0].weight.grad.abs().sum() > 0
    assert set(d_logs) == {"disc_loss", "logits_real", "logits_fake"}


def test_the_generator_is_scored_as_the_discriminator_step_scores_reconstructions():
    """BatchNorm in train mode: the generator's pass and the discriminator's pass over the same reconstructions
    must see the same batch statistics, or the adversarial term rewards what D has learned to reject."""
    vae, disc, loss_fn, x = _setup(disc_start=0)
    out = vae(x, sample=False)  # an untrained autoencoder's reconstructions
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(30):  # D learns to tell them from the images
        opt.zero_grad()
        d_loss, d_logs = loss_fn.discriminator_loss(disc, x, out.reconstruction)
        d_loss.backward()
        opt.step()
    assert d_logs["logits_real"] > d_logs["logits_fake"] + 1  # it can
    _, d_logs = loss_fn.discriminator_loss(disc, x, out.reconstruction)
    _, logs = loss_fn.generator_loss(x, out, disc, vae.last_layer(), step=0)
    torch.testing.assert_close(-logs["gen_loss"], d_logs["logits_fake"])


def test_vq_generator_loss_uses_codebook_weight():
    vae, disc, loss_fn, x = _setup(disc_start=10, quantize=True)
    out = vae(x)
    loss, logs = loss_fn.generator_loss(x, out, disc, vae.last_layer(), step=0)
    torch.testing.assert_close(loss, (x - out.reconstruction).abs().mean() + 1.0 * out.quant.loss)
    assert 1.0 <= logs["perplexity"].item() <= 16 and 0 < logs["codebook_usage"].item() <= 1


def test_patchgan_is_pix2pix_70x70_layout():
    with torch.device("meta"):
        disc = NLayerDiscriminator(3, 64, 3, 4, 0.2)
        out = disc(torch.empty(1, 3, 256, 256))
    assert out.shape == (1, 1, 30, 30)  # the 70x70 PatchGAN's patch map
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:4])
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3


@pytest.mark.parametrize("size,depth,kernel", [(256, 3, 4), (32, 3, 4), (16, 2, 4), (16, 3, 4), (32, 4, 4), (8, 2, 3)])
def test_patch_map_size_is_the_forward_pass_size(size, depth, kernel):
    with torch.device("meta"):
        disc = NLayerDiscriminator(3, 4, depth, kernel)
        try:
            side = disc(torch.empty(2, 3, size, size)).shape[-1]
        except RuntimeError:  # a conv's input is smaller than its kernel
            side = 0
    assert patch_map_size(size, depth, kernel) == side


def test_patchgan_channels_cap_at_8x_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 16, 5, 4, 0.2)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128, 128, 1]
    assert convs[3].weight.std().item() == pytest.approx(0.02, rel=0.1)
    # CPU multi-process runs keep plain BatchNorm: PyTorch's SyncBatchNorm needs an accelerator
    assert sync_batchnorm_if_distributed(disc, 2, torch.device("cpu")) is disc
    synced = sync_batchnorm_if_distributed(disc, 2, torch.device("cuda"))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())


def test_no_lpips_warns_about_blurry_reconstructions(caplog):
    with caplog.at_level(logging.WARNING):
        assert build_perceptual_loss(Stage1TrainConfig(use_lpips=False)) is None
    assert "blurry" in caplog.text


def test_missing_vgg_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for cfg in (Stage1TrainConfig(use_lpips_package=True), Stage1TrainConfig()):
        with pytest.raises(FileNotFoundError) as err:
            build_perceptual_loss(cfg)
        assert "vgg16-397923af.pth" in str(err.value) and str(tmp_path) in str(err.value)


def test_lpips_checkpoint_is_loaded_frozen(tmp_path):
    from src.losses.ranking import RankingHead
    from src.models.lpips import LPIPS, save_lpips_checkpoint

    torch.manual_seed(0)
    trained = LPIPS().eval()
    with torch.no_grad():
        for p in trained.lins.parameters():
            p.uniform_(0.5, 1.0)  # trained linear layers are non-negative
    path = save_lpips_checkpoint(tmp_path / "lpips.pt", trained, RankingHead(), {"img_size": 32})
    net = build_perceptual_loss(Stage1TrainConfig(lpips_checkpoint=str(path)))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d_same, d_diff = net(x, x), net(x, -x)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()
    torch.testing.assert_close(d_diff, trained(x, -x).detach())  # the checkpoint's weights, not a fresh init
