"""src/models/diffusers_compat.py: tiny random diffusers models round trip through ours and back with identical
tensors and the same outputs; the DDIMScheduler config reproduces our schedule; what can't be expressed is refused."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

from src.config import UNetConfig, VAEConfig
from src.diffusion.samplers import ddim_timesteps
from src.diffusion.schedule import DiffusionProcess
from src.models import diffusers_compat as dc
from src.models.unet import Condition, build_unet
from src.models.vae import build_autoencoder
from tests.stage2_helpers import tiny_unet

VAE_KW = dict(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
              sample_size=16, scaling_factor=0.5)
UNET_KW = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=8, time_embedding_dim=64)


def _perturbed(model):
    """Noise on every tensor, so zero- or one-initialised ones (biases, norms) are compared too."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_autoencoderkl_round_trips_with_identical_tensors_and_outputs(tmp_path):
    from diffusers import AutoencoderKL

    theirs = _perturbed(AutoencoderKL(**VAE_KW))
    theirs.save_pretrained(tmp_path / "vae")
    ours, factor = dc.load_vae_backbone(tmp_path / "vae")
    assert factor == 0.5 and ours.config.img_size == 16 and ours.config.vae_channels_per_block == [8, 16]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        moments = theirs.quant_conv(theirs.encoder(x))
        torch.testing.assert_close(ours.encode_raw(x), moments, rtol=0, atol=1e-5)
        z = moments[:, :4]
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=0, atol=1e-5)
    # the single .safetensors beside its config.json, with the image size set by the caller
    single, _ = dc.load_vae_backbone(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", img_size=32)
    assert single.config.img_size == 32
    # and back: identical tensors, a config diffusers builds the same model from
    config = dc.vae_config_to_diffusers(ours.config, factor)
    back = AutoencoderKL(**config)
    back.load_state_dict(dc.vae_state_to_diffusers(ours.state_dict()), strict=True)
    _assert_same_tensors(back.state_dict(), theirs.state_dict())
    for key, value in theirs.config.items():
        if key in config:
            assert json.dumps(config[key]) == json.dumps(value), key


def test_a_vae_without_mid_attention_exports_exactly_and_comes_back(tmp_path):
    """Ours has one mid resnet then, AutoencoderKL two: the second is written as the identity."""
    from diffusers import AutoencoderKL

    cfg = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, groupnorm_groups=4,
                    attention_layers=0)
    ours = _perturbed(build_autoencoder(cfg))
    assert len(ours.encoder.mid_block.resnets) == 1
    config = dc.vae_config_to_diffusers(cfg, 0.5)
    assert config["mid_block_add_attention"] is False
    dc.write_diffusers_model(tmp_path / "vae", "AutoencoderKL", config, dc.vae_state_to_diffusers(ours.state_dict()))
    theirs = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()  # every weight from the file, none random
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, sample_posterior=False).sample, ours(x, sample=False).reconstruction,
                                   rtol=0, atol=1e-5)
    back, _ = dc.load_vae_backbone(tmp_path / "vae")
    assert back.config.attention_layers == 0
    _assert_same_tensors(back.state_dict(), ours.state_dict())


def test_vae_mid_blocks_diffusers_and_ours_cannot_share_are_refused(tmp_path):
    from diffusers import AutoencoderKL

    # a trained AutoencoderKL without mid attention: two real resnets, which our mid block can't hold
    _perturbed(AutoencoderKL(**VAE_KW, mid_block_add_attention=False)).save_pretrained(tmp_path / "no_attention")
    with pytest.raises(dc.DiffusersFormatError, match=r"mid_block_add_attention=False.*two resnets.*has one"):
        dc.load_vae_backbone(tmp_path / "no_attention")
    cfg = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], groupnorm_groups=4, attention_layers=2)
    with pytest.raises(dc.DiffusersFormatError, match="attention_layers: 2.*never more"):
        dc.vae_config_to_diffusers(cfg, 0.5)


@pytest.mark.parametrize("linear_projection", [True, False])
def test_unet2dconditionmodel_round_trips_with_identical_tensors_and_outputs(tmp_path, linear_projection):
    from diffusers import UNet2DConditionModel

    theirs = _perturbed(UNet2DConditionModel(**UNET_KW, use_linear_projection=linear_projection))
    theirs.save_pretrained(tmp_path / "unet")
    ours, conditioning = dc.unet_from_diffusers(tmp_path / "unet")
    assert conditioning == "text"
    assert ours.config.attention_head_dim == 16 and ours.config.text_embed_dim == 16
    g = torch.Generator().manual_seed(2)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        mine = ours(x, t, Condition(text=text))
        ref = theirs(x, t, encoder_hidden_states=text).sample
    assert ref.abs().mean() > 1e-2
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
    back = UNet2DConditionModel(**dc.unet_config_to_diffusers(ours, 8))
    back.load_state_dict(dc.unet_state_to_diffusers(ours), strict=True)
    if linear_projection:  # 1x1-conv projections come back as linear ones (use_linear_projection=True)
        _assert_same_tensors(back.state_dict(), theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, encoder_hidden_states=text).sample, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["class", "none"])
def test_class_and_unconditional_unets_export_exactly(conditioning):
    from diffusers import UNet2DConditionModel

    cfg = tiny_unet(class_conditioning=True)  # class_embed_dim 32 == time_embed_proj_dim 32
    if conditioning == "class":  # a projected class embedding is folded into the table
        cfg = UNetConfig(**{**cfg.__dict__, "class_embed_dim": 24})
    torch.manual_seed(0)
    ours = _perturbed(build_unet(cfg, 4, conditioning))
    theirs = UNet2DConditionModel(**dc.unet_config_to_diffusers(ours, 8)).eval()
    state = dc.unet_state_to_diffusers(ours)
    theirs.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 5, 500, 999])
    labels = torch.tensor([0, 2, 3, 1]) if conditioning == "class" else None  # 3 = the null class
    context = torch.randn(4, 1, dc.ZEROED_CROSS_ATTENTION_DIM, generator=g)  # anything: the cross-attention adds 0
    with torch.no_grad():
        mine = ours(x, t, Condition(labels=labels) if labels is not None else None)
        torch.testing.assert_close(theirs(x, t, context, class_labels=labels).sample, mine, rtol=0, atol=1e-5)
        assert dc.conditioning_of(theirs.config, state) == conditioning
        config = {"_class_name": "UNet2DConditionModel", **theirs.config}
        again = build_unet(dc.unet_config_from_diffusers(config, cfg)[0], 4, conditioning).eval()
        again.load_state_dict(dc.unet_state_from_diffusers(state, conditioning))
        torch.testing.assert_close(again(x, t, Condition(labels=labels) if labels is not None else None), mine,
                                   rtol=0, atol=1e-5)


def test_unets_whose_head_count_is_not_channels_over_the_first_width_come_back(tmp_path):
    """heads = max(1, c // attention_head_dim) need not divide evenly: 16-wide heads over [40, 80] channels are
    [2, 5] heads of widths [20, 16], and a width wider than a block is one head. The export must import again."""
    from diffusers import UNet2DConditionModel

    for name, overrides in {"uneven": dict(unet_channels_per_block=[40, 80], attention_head_dim=16,
                                           time_embed_start_dim=40), "wide": dict(attention_head_dim=64)}.items():
        cfg = UNetConfig(**{**tiny_unet().__dict__, **overrides,
                            "down_block_types": ["AttnDown", "AttnDown"], "up_block_types": ["AttnUp", "AttnUp"]})
        ours = _perturbed(build_unet(cfg, 4, "none"))
        theirs = UNet2DConditionModel(**dc.unet_config_to_diffusers(ours, 8))
        theirs.load_state_dict(dc.unet_state_to_diffusers(ours), strict=True)
        theirs.save_pretrained(tmp_path / name)
        for base in (cfg, UNetConfig()):  # the config's width (or the default 64) if it fits, else one that does
            back, _ = dc.unet_from_diffusers(tmp_path / name, base)
            assert back.config.attention_head_dim == cfg.attention_head_dim, name
            _assert_same_tensors(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_ddim_scheduler_config_reproduces_our_schedule(schedule):
    from diffusers import DDIMScheduler

    process = DiffusionProcess(1000, schedule, 0.00085, 0.012, "v_prediction")
    config = dc.scheduler_config_from_process(process.to_dict())
    scheduler = DDIMScheduler(**config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), process.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert scheduler.config.prediction_type == "v_prediction"
    for steps in (1, 10, 50, 1000):
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == ddim_timesteps(1000, steps)
    assert dc.process_from_scheduler(config) == {"rescale_betas_zero_snr": False, **process.to_dict()}


def test_zero_terminal_snr_schedule_maps_onto_ddim_scheduler():
    from diffusers import DDIMScheduler

    if "rescale_betas_zero_snr" not in inspect.signature(DiffusionProcess).parameters:
        pytest.skip("this DiffusionProcess has no rescale_betas_zero_snr")
    process = DiffusionProcess(1000, "scaled_linear", 0.00085, 0.012, "v_prediction", rescale_betas_zero_snr=True)
    config = dc.scheduler_config_from_process(process.to_dict())
    scheduler = DDIMScheduler(**config)
    assert config["rescale_betas_zero_snr"] is True and scheduler.alphas_cumprod[-1] == 0
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), process.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert dc.process_from_scheduler(config) == process.to_dict()


def test_unknown_process_field_stops_the_scheduler_mapping():
    with pytest.raises(dc.DiffusersFormatError, match=r"\['karras_sigmas'\].*PROCESS_TO_SCHEDULER"):
        dc.scheduler_config_from_process({**DiffusionProcess(10).to_dict(), "karras_sigmas": True})


def test_folders_that_are_not_convertible_get_clear_errors(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

    (tmp_path / "empty").mkdir()
    with pytest.raises(dc.DiffusersFormatError, match="not a diffusers model: no config.json"):
        dc.load_vae_backbone(tmp_path / "empty")
    checkpoint = tmp_path / "run" / "checkpoint_20"  # a stage-1 checkpoint given where its model file belongs
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 20}))
    with pytest.raises(dc.DiffusersFormatError, match="training checkpoint folder, not a model: pass the run's "
                       f"model.safetensors \\({tmp_path / 'run' / 'model.safetensors'}\\)"):
        dc.load_vae_backbone(checkpoint)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(dc.DiffusersFormatError, match="only safetensors are read"):
        dc.load_vae_backbone(pickled)
    VQModel(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=4,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1).save_pretrained(tmp_path / "vq")
    with pytest.raises(dc.DiffusersFormatError, match="VQModel"):
        dc.load_vae_backbone(tmp_path / "vq")
    AutoencoderKL(**{**VAE_KW, "shift_factor": 0.1}).save_pretrained(tmp_path / "shifted")
    with pytest.raises(dc.DiffusersFormatError, match="shift_factor=0.1"):
        dc.load_vae_backbone(tmp_path / "shifted")
    # channel mismatch: the config says 16 channels where the weights have 32
    AutoencoderKL(**{**VAE_KW, "block_out_channels": (8, 32)}).save_pretrained(tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 16]}))
    with pytest.raises(dc.DiffusersFormatError, match=r"shape mismatch.*\(32, 8, 3, 3\) in the file"):
        dc.load_vae_backbone(tmp_path / "mismatch")
    # Stable Diffusion 1.x's layout: 8 heads at every level, so the head width changes per level
    UNet2DConditionModel(**{**UNET_KW, "attention_head_dim": 8}).save_pretrained(tmp_path / "sd1")
    with pytest.raises(dc.DiffusersFormatError, match=r"head widths \[4, 8\]"):
        dc.unet_from_diffusers(tmp_path / "sd1")
    UNet2DConditionModel(**{**UNET_KW, "down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D")}
                         ).save_pretrained(tmp_path / "other_block")
    with pytest.raises(dc.DiffusersFormatError, match="down_block_types.*AttnDownBlock2D"):
        dc.unet_from_diffusers(tmp_path / "other_block")
    UNet2DConditionModel(**UNET_KW).save_pretrained(tmp_path / "text_unet")
    with pytest.raises(dc.DiffusersFormatError, match="cross-attention is trained"):
        dc.unet_from_diffusers(tmp_path / "text_unet", conditioning="none")
    ours = build_unet(tiny_unet(), 4, "text")
    ours_cfg = UNetConfig(**{**ours.config.__dict__, "time_embed_start_dim": 8})
    with pytest.raises(dc.DiffusersFormatError, match="time_embed_start_dim 8"):
        dc.unet_config_to_diffusers(build_unet(ours_cfg, 4, "text"), 8)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert not dc.is_diffusers_model(tmp_path / "model.safetensors")  # no config.json beside it


def test_stable_diffusion_configs_map_onto_the_design_layout():
    """SD 2.x's UNet (64-wide heads) and SD's VAE are the design's configs/ldm.yaml; SD 1.x's 8 heads are refused."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from src.config import load_model_config
    from tests.conftest import ROOT

    design = load_model_config(ROOT / "configs" / "ldm.yaml")
    blocks = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):  # configs only: no memory, no compute
        sd2 = UNet2DConditionModel(**blocks, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                   use_linear_projection=True, sample_size=96)
        sd1 = UNet2DConditionModel(**blocks, attention_head_dim=8, cross_attention_dim=768, sample_size=64)
        sd_vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=256,
                               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    cfg, in_channels = dc.unet_config_from_diffusers({"_class_name": "UNet2DConditionModel", **sd2.config}, design.unet)
    assert in_channels == 4 and cfg == UNetConfig(**{**design.unet.__dict__, "text_embed_dim": 1024})
    with pytest.raises(dc.DiffusersFormatError, match=r"head widths \[40, 80, 160, 160\].*1.x's can't"):
        dc.unet_config_from_diffusers({"_class_name": "UNet2DConditionModel", **sd1.config}, design.unet)
    vae_cfg = dc.vae_config_from_diffusers({"_class_name": "AutoencoderKL", **sd_vae.config}, design.vae.img_size)
    assert vae_cfg == design.vae and sd_vae.config.scaling_factor == 0.18215
