"""The UNet: shapes per conditioning, a one-to-one mapping onto diffusers' UNet2DConditionModel (keys, shapes and
outputs), the text padding mask, the learned null condition and its dropout rate, checkpointing."""

import pytest
import torch

from src.config import UNetConfig
from src.models.diffusers_compat import ZEROED_CROSS_ATTENTION_DIM, unet_state_to_diffusers
from src.models.unet import Condition, build_unet

TEXT_DIM = 16


def tiny_cfg(**overrides) -> UNetConfig:
    cfg = dict(
        down_block_types=["AttnDown", "Down"], mid_block_types="AttnMid", up_block_types=["Up", "AttnUp"],
        unet_channels_per_block=[32, 64], unet_residual_layers_per_block=1, attention_head_dim=16,
        time_embed_start_dim=32, time_embed_proj_dim=64, text_embed_dim=TEXT_DIM, class_embed_dim=64,
        num_classes=10, groupnorm_groups=8,
    )
    cfg.update(overrides)
    return UNetConfig(**cfg)


def text_cond(batch: int = 2, length: int = 5, seed: int = 0, mask=None) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(text=torch.randn(batch, length, TEXT_DIM, generator=g), text_mask=mask)


def inputs(batch: int = 2, seed: int = 1, size=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
def test_shapes_and_conditioning(conditioning):
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg(), in_channels=4, conditioning=conditioning)
    x, t = inputs(size=(8, 16))
    cond = {"none": None, "class": Condition(labels=torch.tensor([0, 7])), "text": text_cond()}[conditioning]
    out = unet(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if conditioning == "class":  # the label changes the output
        assert not torch.allclose(out, unet(x, t, Condition(labels=torch.tensor([3, 3]))))
    if conditioning == "text":
        assert not torch.allclose(out, unet(x, t, text_cond(seed=5)))
        with pytest.raises(ValueError, match="cond.text"):
            unet(x, t, None)
    # the timestep matters, and a 0-d t broadcasts over the batch
    assert not torch.allclose(out, unet(x, (t + 300) % 1000, cond))
    torch.testing.assert_close(unet(x, torch.tensor(5), cond), unet(x, torch.tensor([5, 5]), cond))
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(2, 4, 7, 8), t, cond)


def test_all_levels_and_default_layout_shapes():
    # the design's 4-level layout (AttnDown x3, Down / Up, AttnUp x3) at tiny widths, 2 resnets per level
    cfg = tiny_cfg(down_block_types=["AttnDown", "AttnDown", "AttnDown", "Down"],
                   up_block_types=["Up", "AttnUp", "AttnUp", "AttnUp"], unet_channels_per_block=[16, 32, 32, 32],
                   unet_residual_layers_per_block=2)
    unet = build_unet(cfg, 4, "text")
    assert len(unet.down_blocks[0].attentions) == 2 and len(unet.down_blocks[3].attentions) == 0
    assert len(unet.up_blocks[0].attentions) == 0 and len(unet.up_blocks[3].resnets) == 3
    x, t = inputs()
    assert unet(x, t, text_cond()).shape == x.shape


def _diffusers_twin(cfg: UNetConfig, conditioning: str):
    """UNet2DConditionModel built by hand (not through diffusers_compat), so the config mapping is checked too."""
    from diffusers import UNet2DConditionModel

    names = {"AttnDown": "CrossAttnDownBlock2D", "Down": "DownBlock2D", "AttnUp": "CrossAttnUpBlock2D", "Up": "UpBlock2D"}
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.unet_channels_per_block)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=tuple(names[b] for b in cfg.down_block_types),
        up_block_types=tuple(names[b] for b in cfg.up_block_types),
        block_out_channels=tuple(cfg.unet_channels_per_block), layers_per_block=cfg.unet_residual_layers_per_block,
        # without text, the export's cross-attention is all zeros over a 1-wide context
        cross_attention_dim=cfg.text_embed_dim if conditioning == "text" else ZEROED_CROSS_ATTENTION_DIM,
        attention_head_dim=heads,  # diffusers' historical name: this is the number of heads
        norm_num_groups=cfg.groupnorm_groups, norm_eps=cfg.norm_eps, use_linear_projection=True,
        time_embedding_dim=cfg.time_embed_proj_dim,
        num_class_embeds=cfg.num_classes + 1 if conditioning == "class" else None,
    )


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_state_dict_maps_onto_diffusers(conditioning):
    cfg = tiny_cfg()
    ours = build_unet(cfg, 4, conditioning)
    ref = _diffusers_twin(cfg, conditioning)
    mine = {k: tuple(v.shape) for k, v in unet_state_to_diffusers(ours).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert mine == theirs
    cross = [n for n in theirs if ".attn2." in n or ".transformer_blocks.0.norm2." in n]
    n_ours = sum(p.numel() for n, p in ours.named_parameters() if n != "null_text_embedding")
    n_theirs = sum(p.numel() for n, p in ref.named_parameters() if conditioning == "text" or n not in cross)
    assert n_ours == n_theirs


def test_renamed_weights_give_diffusers_the_same_output():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ours = build_unet(cfg, 4, "text").eval()
    ref = _diffusers_twin(cfg, "text").eval()
    ref.load_state_dict(unet_state_to_diffusers(ours), strict=True)
    x, t = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cond = text_cond(mask=mask)
    with torch.no_grad():
        mine = ours(x, t, cond)
        theirs = ref(x, t, encoder_hidden_states=cond.text, encoder_attention_mask=mask).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_dropout_is_where_diffusers_and_ldm_put_it():
    """unet.dropout acts in the ResNet blocks only: the transformer blocks' feed-forward had it too, which neither
    diffusers' UNet2DConditionModel nor LDM's openaimodel does, so a fine-tune of the export trained differently."""
    from diffusers import UNet2DConditionModel

    cfg = tiny_cfg(dropout=0.1)
    ours = build_unet(cfg, 4, "text")
    theirs = UNet2DConditionModel(**{**_diffusers_twin(cfg, "text").config, "dropout": 0.1})
    dropped = [{n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
               for model in (ours, theirs)]
    assert dropped[0] == dropped[1] and len(dropped[0]) == 8


def test_padding_mask_in_cross_attention():
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg(), 4, "text").eval()
    x, t = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    a = text_cond(mask=mask, seed=0)
    b = Condition(text=a.text.clone(), text_mask=mask)
    b.text[mask == 0] = torch.randn(int((mask == 0).sum()), TEXT_DIM) * 5  # change only the padded tokens
    with torch.no_grad():
        out_a, out_b = unet(x, t, a), unet(x, t, b)
        # masked padding has no effect ...
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
        # ... the same tokens unmasked do
        unmasked_a = unet(x, t, Condition(text=a.text))
        unmasked_b = unet(x, t, Condition(text=b.text))
        assert (unmasked_a - unmasked_b).abs().max() > 1e-3
        # and dropping the masked positions altogether gives the same output as masking them
        short = Condition(text=a.text[:1, :3], text_mask=torch.ones(1, 3, dtype=torch.long))
        torch.testing.assert_close(unet(x[:1], t[:1], short), out_a[:1], rtol=1e-5, atol=1e-6)


def test_condition_cat_pads_text_and_masks():
    a = Condition(text=torch.randn(2, 3, TEXT_DIM))  # no mask: all real
    b = Condition(text=torch.randn(1, 5, TEXT_DIM), text_mask=torch.tensor([[1, 1, 1, 1, 0]]))
    c = Condition.cat(a, b)
    assert c.text.shape == (3, 5, TEXT_DIM) and c.text_mask.tolist() == [[1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 0]]
    torch.testing.assert_close(c.text[:2, :3], a.text)
    assert c.text[:2, 3:].abs().sum() == 0
    labels = Condition.cat(Condition(labels=torch.tensor([1])), Condition(labels=torch.tensor([2, 3])))
    assert labels.labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        Condition.cat(a, Condition(labels=torch.tensor([1])))


def test_cfg_batch_equals_separate_forwards():
    # guidance runs [null; cond] as one batch of unequal text lengths: each half must equal its own forward
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg(), 4, "text").eval()
    x, t = inputs()
    cond = text_cond(mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    null = unet.null_condition(2)
    with torch.no_grad():
        both = unet(torch.cat([x, x]), torch.cat([t, t]), Condition.cat(null, cond))
        torch.testing.assert_close(both[:2], unet(x, t, null), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[2:], unet(x, t, cond), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_null_condition_used_at_configured_rate(conditioning):
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg(), 4, conditioning)
    n = 20000
    if conditioning == "class":
        cond = Condition(labels=torch.randint(0, 10, (n,)))
    else:
        cond = Condition(text=torch.randn(n, 4, TEXT_DIM), text_mask=torch.ones(n, 4, dtype=torch.long))
    for prob in (0.0, 0.1, 0.5, 1.0):
        dropped = unet.drop_condition(cond, prob, generator=torch.Generator().manual_seed(1))
        if conditioning == "class":
            is_null = dropped.labels == 10
            assert torch.equal(dropped.labels[~is_null], cond.labels[~is_null])
        else:
            is_null = (dropped.text == unet.null_text_embedding.detach()).all(-1).all(-1)  # every position the null token
            assert torch.equal(dropped.text[~is_null], cond.text[~is_null])
            assert dropped.text_mask.all()  # all real: the repeated null token needs no mask
        rate = is_null.float().mean().item()
        assert rate == pytest.approx(prob, abs=0.01)  # binomial std at 20000 samples <= 0.0035
    assert unet.drop_condition(None, 0.5) is None
    assert build_unet(tiny_cfg(), 4, "none").null_condition(3) is None


def test_dropped_text_equals_null_condition_and_trains_the_null_token():
    torch.manual_seed(0)
    unet = build_unet(tiny_cfg(), 4, "text")
    x, t = inputs()
    cond = text_cond(mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    dropped = unet.drop_condition(cond, 1.0)
    out = unet(x, t, dropped)
    torch.testing.assert_close(out, unet(x, t, unet.null_condition(2)), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert unet.null_text_embedding.grad is not None and unet.null_text_embedding.grad.abs().sum() > 0


def test_class_null_index_and_projection():
    unet = build_unet(tiny_cfg(class_embed_dim=24), 4, "class")
    assert unet.class_embedding.weight.shape == (11, 24)  # 10 classes + the null class
    assert unet.class_embedding_proj.in_features == 24 and unet.class_embedding_proj.out_features == 64
    assert unet.null_condition(3).labels.tolist() == [10, 10, 10]
    x, t = inputs()
    assert unet(x, t, unet.null_condition(2)).shape == x.shape
    assert build_unet(tiny_cfg(), 4, "class").class_embedding_proj is None


def test_learnable_time_frequencies():
    fixed = build_unet(tiny_cfg(), 4, "none")
    assert "time_proj.freqs" not in fixed.state_dict()
    assert all(not n.startswith("time_proj") for n, _ in fixed.named_parameters())
    learn = build_unet(tiny_cfg(time_embed_requires_grad=True), 4, "none")
    x, t = inputs()
    learn(x, t, None).square().mean().backward()
    assert learn.time_proj.freqs.grad is not None and learn.time_proj.freqs.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_unet(tiny_cfg(), 4, "text")
    ckpt = build_unet(tiny_cfg(gradient_checkpointing=True), 4, "text")
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.gradient_checkpointing and all(b.gradient_checkpointing for b in ckpt.down_blocks)
    x, t = inputs()
    cond = text_cond(mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    for model in (plain, ckpt):
        model(x, t, cond).square().mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rejects_bad_layouts():
    with pytest.raises(ValueError, match="one entry per"):
        build_unet(tiny_cfg(down_block_types=["AttnDown"]), 4, "none")
    with pytest.raises(ValueError, match="CrossAttnDown"):
        build_unet(tiny_cfg(down_block_types=["CrossAttnDown", "Down"]), 4, "none")
    with pytest.raises(ValueError, match="conditioning"):
        build_unet(tiny_cfg(), 4, "image")
