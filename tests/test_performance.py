"""The speed settings change speed only: compiled and eager models agree, channels_last agrees with contiguous,
the norms keep bf16 activations in bf16 within rounding of float32, the trimmed cross-attention text gives the
UNet's output unchanged, and the speed keys are checked.

torch.compile runs with the backend in LDM_TEST_COMPILE_BACKEND (default aot_eager: dynamo's graph capture and
AOTAutograd's joint forward/backward graph, in seconds). With `inductor` the same tests also check inductor's
generated kernels; a cold inductor compile of these tiny models takes minutes on a 2-core machine, so CI keeps
aot_eager (run it with LDM_TEST_COMPILE_BACKEND=inductor after touching model code).
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from src.config import ConfigError, Stage1TrainConfig, Stage2TrainConfig, UNetConfig, VAEConfig, load_config
from src.models.layers import GroupNorm, LayerNorm
from src.models.unet import Condition, build_unet, padding_extent
from src.models.vae import build_autoencoder
from src.training.performance import compile_autoencoder, compile_module, to_memory_format
from tests.helpers import reset_accelerate

BACKEND = os.environ.get("LDM_TEST_COMPILE_BACKEND", "aot_eager")
TEXT_DIM = 8


def tiny_unet_cfg(levels: int = 2) -> UNetConfig:
    """Two levels (a down- and an upsampler), self- and cross-attention at the first; one level for the compiled
    tests (the smallest graph with every kind of block but the resamplers)."""
    return UNetConfig(
        down_block_types=["AttnDown", "Down"][:levels], up_block_types=["Up", "AttnUp"][-levels:],
        mid_block_types="Mid", unet_channels_per_block=[8, 16][:levels], unet_residual_layers_per_block=1,
        attention_head_dim=8, time_embed_start_dim=8, time_embed_proj_dim=16, text_embed_dim=TEXT_DIM,
        groupnorm_groups=4,
    )


TINY_VAE = VAEConfig(img_size=8, vae_channels_per_block=[8], residual_layers_per_block=1, groupnorm_groups=4)


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, h, w)
    t = torch.tensor([3, 700])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # (B, L): padding in both rows
    text = torch.randn(2, 6, TEXT_DIM, generator=g) * mask[..., None]
    return x, t, Condition(text=text, text_mask=mask)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def speed_cfg(**keys) -> Stage2TrainConfig:
    return Stage2TrainConfig(**keys)


# ------------------------------------------------------------------------------------------------ compiled


@pytest.fixture(scope="module")
def unets():
    """(eager, compiled) tiny UNets with the same weights; the compiled one is traced once for every test."""
    torch.manual_seed(0)
    eager = build_unet(tiny_unet_cfg(levels=1), 4, "text")
    twin = copy.deepcopy(eager)
    compiled = compile_module(twin, speed_cfg(compile=True), backend=BACKEND)
    return eager, twin, compiled


def test_compile_key_wraps_the_unet_and_leaves_the_module_alone(unets):
    eager, twin, compiled = unets
    assert compile_module(eager, speed_cfg(compile=False)) is eager
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is twin
    assert list(twin.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys


def test_compiled_unet_matches_eager_outputs_and_gradients(unets):
    eager, twin, compiled = unets
    x, t, cond = unet_inputs()
    out_eager, out_compiled = eager(x, t, cond), compiled(x, t, cond)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    assert_same_grads(grads(eager), grads(twin), rtol=1e-4, atol=1e-6)
    eager.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)


def test_compiled_autoencoder_keeps_the_last_layer_eager_and_matches():
    torch.manual_seed(0)
    eager = build_autoencoder(TINY_VAE)
    compiled = compile_autoencoder(copy.deepcopy(eager), Stage1TrainConfig(compile=True), backend=BACKEND)
    assert compiled.encoder._compiled_call_impl is not None and compiled.decoder.up_blocks[0]._compiled_call_impl is not None
    assert compiled.decoder._compiled_call_impl is None  # its output layer stays outside every graph
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    results = []
    for model in (eager, compiled):
        out = model(x, generator=torch.Generator().manual_seed(2))
        loss = (out.reconstruction - x).abs().mean() + 1e-3 * out.posterior.kl().mean()
        # the adaptive GAN weight's gradient at the last layer, then the full backward
        last = torch.autograd.grad(loss, model.last_layer(), retain_graph=True)[0]
        loss.backward()
        results.append((out.reconstruction.detach(), last, grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    assert_same_grads(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ channels_last


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    unet = build_unet(tiny_unet_cfg(), 4, "text")
    vae = build_autoencoder(TINY_VAE)
    for model, run in ((unet, lambda m: m(*unet_inputs())),
                       (vae, lambda m: m(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                                         sample=False).reconstruction)):
        nhwc = to_memory_format(copy.deepcopy(model), speed_cfg(channels_last=True))
        conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        out_a, out_b = run(model), run(nhwc)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
        out_a.square().mean().backward()
        out_b.square().mean().backward()
        assert_same_grads(grads(model), grads(nhwc), rtol=1e-4, atol=1e-6)
    assert to_memory_format(unet, speed_cfg(channels_last=False)).conv_in.weight.is_contiguous()


# ------------------------------------------------------------------------------------------------ precision


class AutocastAtNorms(TorchFunctionMode):
    """Records whether autocast was on at each call of F.group_norm / F.layer_norm (above the dispatcher, where
    autocast's policy applies)."""

    def __init__(self):
        super().__init__()
        self.states: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.group_norm, F.layer_norm):
            self.states.append(torch.is_autocast_enabled("cpu"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_norms_run_in_the_compute_dtype_and_match_float32(kind):
    """Under autocast a bf16 activation is normalised in bf16 (CUDA autocast would copy it to fp32 and back):
    output and gradients within bf16 rounding of torch.nn's float32 norm, float32 parameter gradients; outside
    autocast exactly torch.nn's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g) * 3 + 1  # (B, C, H, W), not already normalised
    if kind == "group":
        ours, ref = GroupNorm(4, 16, eps=1e-6), torch.nn.GroupNorm(4, 16, eps=1e-6)
    else:
        ours, ref, x = LayerNorm(16), torch.nn.LayerNorm(16), x.permute(0, 2, 3, 1).reshape(2, 16, 16)  # (B, N, C)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=g))
        ours.bias.copy_(torch.randn(16, generator=g))
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), ref(x))  # float32, no autocast: torch.nn's forward
    upstream = torch.randn(x.shape, generator=g)
    low = x.bfloat16().requires_grad_()
    with AutocastAtNorms() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(low)
        ref(x.bfloat16())  # torch.nn's norm
    # ours ran with autocast off, out of reach of CUDA autocast's float32 policy for norms; torch.nn's inside it
    assert seen.states == [False, True]
    assert out.dtype == torch.bfloat16
    (out.float() * upstream).sum().backward()
    high = low.detach().float().requires_grad_()
    expected = ref(high)
    (expected * upstream).sum().backward()
    assert low.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in ours.parameters())
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.03)
    torch.testing.assert_close(low.grad.float(), high.grad, rtol=0.05, atol=0.05)
    for mine, theirs in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0.02, atol=0.1)


def test_unet_under_bf16_autocast_makes_no_float32_activations():
    """A bf16 step of the UNet creates no float32 tensor of an activation's size, forward or backward: no layer
    copies its input up to fp32 and back (the norms did under CUDA autocast: 5.4 % of the design UNet's step and
    13 % of its memory on an H200). CPU autocast never upcasts a norm, so here this catches explicit upcasts (the
    upsampler's, before); the norm test above checks that the norms run outside autocast."""

    class Float32Activations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, tuple]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                # batch-first, at least one feature map of the first level (2 x 8 x 8 x 8 elements or 2 x 64 x 8 tokens)
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 3 and t.shape[0] == 2 \
                        and t.numel() >= 1024:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    torch.manual_seed(0)
    unet = build_unet(tiny_unet_cfg(), 4, "text")
    x, t, cond = unet_inputs()
    with Float32Activations() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, cond)  # (2, 4, 8, 8): 512 elements, the loss's fp32 copy stays under the threshold
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and unet.conv_in.weight.grad is not None
    assert mode.seen == []


# ------------------------------------------------------------------------------------------------ attention


def test_trimmed_text_gives_the_same_output():
    torch.manual_seed(0)
    unet = build_unet(tiny_unet_cfg(), 4, "text").eval()
    x, t, _ = unet_inputs()
    g = torch.Generator().manual_seed(3)
    text = torch.randn(2, 20, TEXT_DIM, generator=g)  # 20 stored positions, as a padded encoder output
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0, :3], mask[1, :5] = 1, 1
    padded = Condition(text=text, text_mask=mask)
    trimmed = padded.trimmed(multiple=8)
    assert trimmed.text.shape == (2, 8, TEXT_DIM) and trimmed.text_mask.tolist() == mask[:, :8].tolist()
    even = Condition(text=text, text_mask=torch.cat([torch.ones(2, 5), torch.zeros(2, 15)], 1).long())
    unmasked = even.trimmed(multiple=8)
    assert unmasked.text.shape == (2, 5, TEXT_DIM) and unmasked.text_mask is None  # nothing padded: no mask
    beyond = Condition(text=text[:, :6], text_mask=mask[:, :6]).trimmed(multiple=8)  # rounding past the end
    assert beyond.text.shape == (2, 8, TEXT_DIM) and beyond.text_mask[:, 6:].sum() == 0 and beyond.text[:, 6:].abs().sum() == 0
    moved = Condition(text=text[:, :6], text_mask=mask[:, :6]).trimmed(multiple=8, device="cpu")  # the data path's
    assert torch.equal(moved.text, beyond.text) and torch.equal(moved.text_mask, beyond.text_mask)
    with torch.no_grad():
        for full, short in ((padded, trimmed), (even, unmasked)):
            torch.testing.assert_close(unet(x, t, short), unet(x, t, full), rtol=1e-5, atol=1e-6)
    assert padding_extent(mask) == (5, True) and padding_extent(mask, 8) == (8, True)
    assert padding_extent(torch.ones(2, 4), 8) == (4, False)
    assert Condition(text=text).trimmed() .text is text  # no mask: nothing to trim


def test_dropped_condition_adds_no_padding_mask():
    torch.manual_seed(0)
    unet = build_unet(tiny_unet_cfg(), 4, "text").eval()
    x, t, _ = unet_inputs()
    cond = Condition(text=torch.randn(2, 6, TEXT_DIM))  # no padding
    dropped = unet.drop_condition(cond, 1.0)
    assert dropped.text_mask is None  # the null token fills the row: SDPA keeps its unmasked kernel
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, dropped), unet(x, t, unet.null_condition(2)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("cls", [Stage1TrainConfig, Stage2TrainConfig])
def test_speed_keys_load_and_misspellings_are_rejected(tmp_path, cls):
    path = tmp_path / "t.yaml"
    path.write_text("compile: true\ncompile_mode: reduce-overhead\ncompile_cache: false\nchannels_last: true\n"
                    "allow_tf32: false\n")
    cfg = load_config(path, cls)
    assert (cfg.compile, cfg.compile_mode, cfg.compile_cache, cfg.channels_last, cfg.allow_tf32) == \
        (True, "reduce-overhead", False, True, False)
    path.write_text("channel_last: true\n")
    with pytest.raises(ConfigError, match="'channels_last'"):
        load_config(path, cls)
    path.write_text("compile_mode: fastest\n")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(path, cls)
    path.write_text("compile: 1\n")
    with pytest.raises(ConfigError, match="true/false"):
        load_config(path, cls)
    path.write_text("attention_backend: cudnn\n")
    assert load_config(path, cls).attention_backend == "cudnn"
    path.write_text("attention_backend: cudnn_attention\n")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(path, cls)


def test_cuda_graph_modes_are_left_out_when_gradients_accumulate(caplog, monkeypatch):
    """CUDA-graph trees hand the first micro-batch's gradients out of their pool and the next replay overwrites
    them (pytorch/pytorch#169545): with accumulation, the same mode without CUDA graphs, and a warning."""
    from src.training import performance
    from src.training.performance import compile_kwargs

    monkeypatch.setattr(performance, "_warned", set())  # warned once per process and mode

    def kwargs(mode, accum):
        return compile_kwargs(Stage2TrainConfig(compile=True, compile_mode=mode, gradient_accumulation_steps=accum))

    assert kwargs("reduce-overhead", 1) == {"mode": "reduce-overhead"}
    assert kwargs("max-autotune", 1) == {"mode": "max-autotune"}
    with caplog.at_level("WARNING"):
        assert kwargs("reduce-overhead", 2) == {}
        assert kwargs("max-autotune", 4) == {"mode": "max-autotune-no-cudagraphs"}
    assert "break gradient accumulation" in caplog.text
    assert kwargs("max-autotune-no-cudagraphs", 2) == {"mode": "max-autotune-no-cudagraphs"}
    assert kwargs("default", 2) == {}


# ------------------------------------------------------------------------------------------------ attention kernels


def first_sdpa_kernel() -> int:
    """The kernel SDPA tries first right now (torch's private getter: the public API only sets the order)."""
    return torch._C._get_sdp_priority_order()[0]


def first_kernel_seen_by(module: torch.nn.Module, run) -> list[int]:
    """SDPA's first-choice kernel at each forward call of `module` while run() executes."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(first_sdpa_kernel()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("preferred", ["cudnn", "efficient", "math", "flash"])
def test_attention_kernels_put_the_preferred_kernel_first_and_keep_the_others(preferred):
    from torch.nn.attention import SDPBackend

    from src.training.performance import attention_kernels

    default = torch._C._get_sdp_priority_order()
    names = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "flash": "FLASH_ATTENTION"}
    q = torch.randn(2, 2, 16, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with attention_kernels(preferred):
        assert first_sdpa_kernel() == getattr(SDPBackend, names[preferred]).value
        # every kernel stays enabled, so what SDPA's own choice runs still runs (here on the CPU)
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), expected)
    assert torch._C._get_sdp_priority_order() == default
    with attention_kernels("auto"):
        assert torch._C._get_sdp_priority_order() == default


def test_trainers_run_the_forward_under_the_attention_backend_key(stage2_setup):
    """Both stages' training steps call their network with the configured kernel first, and put SDPA's order back."""
    from torch.nn.attention import SDPBackend

    from src.data.loader import collate
    from src.training.stage2 import train_step
    from tests.stage1_helpers import images, tiny_stage1

    default = first_sdpa_kernel()
    batch = collate([stage2_setup[1][i] for i in range(2)])
    losses = {}
    for key in ("auto", "cudnn"):
        accelerator, ctx, state = build_stage2(stage2_setup, attention_backend=key)
        seen = first_kernel_seen_by(ctx.unet_module, lambda: losses.setdefault(
            key, float(train_step(accelerator, ctx, state, iter([batch]))[0]["loss"])))
        assert seen == [default if key == "auto" else SDPBackend.CUDNN_ATTENTION.value]
    assert losses["auto"] == losses["cudnn"]  # on a CPU the same kernel runs
    assert first_sdpa_kernel() == default

    from src.training.stage1 import train_step as stage1_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=1, attention_backend="efficient")
    seen = first_kernel_seen_by(state.vae, lambda: stage1_step(accelerator, state, loss_fn, iter([images(0)]), cfg))
    assert seen and set(seen) == {SDPBackend.EFFICIENT_ATTENTION.value}
    assert first_sdpa_kernel() == default


# ------------------------------------------------------------------------------------------------ trainers


def build_stage2(setup, **keys):
    """(accelerator, ctx, state) from the shared context: the initial UNet again, training keys `keys`."""
    import dataclasses

    from accelerate import Accelerator

    from src.training.stage2 import build_training_state

    ctx, _, initial = setup
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    ctx.train_cfg = dataclasses.replace(ctx.train_cfg, **{"compile": False, "channels_last": False, **keys})
    ctx.unet_module = copy.deepcopy(initial)
    return accelerator, ctx, build_training_state(accelerator, ctx)


def test_one_stage2_step_under_bf16_matches_fp32(stage2_setup):
    """One stage-2 step from images, the frozen VAE and text encoder under bf16 autocast too: the loss within 2 %
    and the gradient norm within 5 % of fp32, and not equal to them (autocast ran)."""
    from src.data.loader import collate
    from src.training.precision import MixedPrecision
    from src.training.stage2 import latent_moments, train_step

    dataset = stage2_setup[1]
    results = []
    for mode in ("no", "bf16"):
        accelerator, ctx, state = build_stage2(stage2_setup)
        state.precision = MixedPrecision(mode, torch.device("cpu"))
        batch = collate([dataset[i] for i in range(4)])
        logs, skipped = train_step(accelerator, ctx, state, iter([batch]))
        assert not bool(skipped)
        results.append({k: float(logs[k]) for k in ("loss", "grad_norm")})
    fp32, bf16 = results
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02) and bf16["loss"] != fp32["loss"]
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)
    # the frozen VAE itself: bf16 moments within bf16's rounding of fp32's
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mean32, _ = latent_moments(batch, ctx.vae, 0.5, gen(), "cpu")
    mean16, _ = latent_moments(batch, ctx.vae, 0.5, gen(), "cpu", MixedPrecision("bf16", torch.device("cpu")).autocast)
    assert not torch.equal(mean16, mean32)
    torch.testing.assert_close(mean16, mean32, rtol=0.05, atol=0.02)


def test_stage2_trainer_honours_compile_and_channels_last(stage2_setup):
    _, ctx, state = build_stage2(stage2_setup, compile=True, channels_last=True)
    assert isinstance(state.unet, torch._dynamo.eval_frame.OptimizedModule)  # the step calls the compiled UNet
    assert not isinstance(ctx.unet_module, torch._dynamo.eval_frame.OptimizedModule)  # saved / EMA: the module
    assert ctx.unet_module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _, ctx, state = build_stage2(stage2_setup)
    assert state.unet is ctx.unet_module and ctx.unet_module.conv_in.weight.is_contiguous()


def test_stage1_trainer_honours_compile_and_channels_last():
    from accelerate import Accelerator

    from src.config import ModelConfig
    from src.training.stage1 import build_stage1

    cfg = Stage1TrainConfig(use_lpips=False, disc_start_dim=8, disc_depth=2, compile=True, channels_last=True)
    state, _ = build_stage1(Accelerator(cpu=True), ModelConfig(vae=TINY_VAE), cfg)
    assert state.vae.encoder._compiled_call_impl is not None and state.vae.decoder.conv_out._compiled_call_impl is None
    assert state.disc._compiled_call_impl is not None
    assert state.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    state, _ = build_stage1(Accelerator(cpu=True), ModelConfig(vae=TINY_VAE), Stage1TrainConfig(use_lpips=False))
    assert state.vae.encoder._compiled_call_impl is None and state.vae.decoder.conv_out.weight.is_contiguous()


# ------------------------------------------------------------------------------------------- no host waits

class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for a GPU's result (a tensor read back as a Python number, or an
    output whose size depends on values), with the project frames that asked for it."""

    WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}

    def __init__(self, state=None):
        super().__init__()
        self.state = state  # a training state: each read is recorded with its .step
        self.reads: list[str] = []
        self.steps: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITS:
            import traceback

            frames = [f"{os.path.basename(f.filename)}:{f.name}" for f in traceback.extract_stack()
                      if os.sep + "src" + os.sep in f.filename]
            self.reads.append(" <- ".join(reversed(frames)))
            self.steps.append(self.state.step if self.state is not None else -1)
        return func(*args, **(kwargs or {}))


def latent_cache_batch(ctx, dataset) -> dict:
    """A batch of 4 as the latent cache gives it: both views' posterior moments and padded text embeddings."""
    pictures = torch.stack([dataset[i]["image"] for i in range(4)])  # (4, 3, H, W)
    with torch.no_grad():
        moments = [torch.stack(ctx.vae.latent_moments(x), 1) for x in (pictures, pictures.flip(-1))]  # (4, 2, C, h, w)
    lengths = torch.tensor([3, 5, 2, 7])
    return {"moments": torch.stack(moments, 1),  # (4, 2 views, 2, C, h, w), the latent cache's layout
            "text_embeds": torch.randn(4, 12, ctx.unet_module.config.text_embed_dim),
            "text_embeds_mask": (torch.arange(12)[None] < lengths[:, None]).long()}  # (4, 12): padded captions


def test_training_steps_never_wait_for_the_device(stage2_setup, tmp_path):
    """Between log steps, neither trainer reads a device value on the host: stage 1's step (autoencoder and
    PatchGAN, GAN on) and stage 2's step from the latent cache (posterior sample, text, condition dropout, UNet,
    guarded update, EMA), then stage 2's whole loop up to its one log step. Stage 2's only host reads are
    padding_extent's, on the loader's CPU mask before the copy (Condition.trimmed). On this CPU a read costs
    nothing, but on a GPU each one stalls the host until the queue drains."""
    from src.training.stage1 import train_step as stage1_step
    from src.training.stage2 import train_step as stage2_step
    from tests.stage1_helpers import images, tiny_stage1

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=2)
    batches = (images(seed) for seed in range(100))
    stage1_step(accelerator, state, loss_fn, batches, cfg)  # first step: lazy state is built
    with HostReads() as host:
        for _ in range(2):
            state.step += 1
            stage1_step(accelerator, state, loss_fn, batches, cfg)
    assert host.reads == []

    accelerator, ctx, state = build_stage2(stage2_setup, cfg_dropout_prob=0.5, ema_update_every=2)
    batch = latent_cache_batch(ctx, stage2_setup[1])
    stage2_step(accelerator, ctx, state, iter([batch]))
    with HostReads() as host:
        for _ in range(2):
            stage2_step(accelerator, ctx, state, iter([batch]))
    trimming = "unet.py:padding_extent <- unet.py:trimmed"
    assert host.reads and all(read.startswith(trimming) for read in host.reads)

    # the whole loop (metric window, step events, progress bar, the EMA moving every other step): reads only at
    # its one log step, the last
    import dataclasses
    import itertools

    import stage2_diffusion_trainer
    from src.training.stage2 import train_loop

    work = tmp_path / "run"
    work.mkdir()
    args = stage2_diffusion_trainer.parse_args([
        "--working_directory", str(work), "--training_config", "unused.yaml", "--dataset", "shapes",
        "--path_to_vae_backbone", "unused.safetensors", "--report_to", "none"])
    ctx.train_cfg = dataclasses.replace(ctx.train_cfg, total_training_iterations=state.step + 4, log_every=1000,
                                        checkpoint_iterations=0, val_generation_freq=0)
    with HostReads(state) as host:
        assert train_loop(args, accelerator, ctx, state, itertools.repeat(batch))
    last = ctx.train_cfg.total_training_iterations
    before_last = [read for read, step in zip(host.reads, host.steps) if step < last]
    assert len(before_last) >= 8 and all(read.startswith(trimming) for read in before_last)
    assert any(step == last and not read.startswith(trimming) for read, step in zip(host.reads, host.steps))
    assert (work / "metrics.jsonl").is_file()


def test_vq_stage1_steps_never_wait_for_the_device():
    """A VQ-VAE's step re-seeds dead codes without a host read: which codes are dead (a nonzero() over the usage
    counts) and the seed (int() of the pass count) made every micro-batch wait for the GPU. Codes die after one
    unused pass here, so codes are re-seeded in the steps watched, and the codebook still changes."""
    from src.training.stage1 import train_step as stage1_step
    from tests.stage1_helpers import images, tiny_stage1

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=2, quantize=True)
    batches = (images(seed) for seed in range(100))
    stage1_step(accelerator, state, loss_fn, batches, cfg)  # first step: lazy state is built
    codebook = state.vae_module.quantize.embedding.weight.detach().clone()
    with HostReads() as host:
        for _ in range(2):
            state.step += 1
            stage1_step(accelerator, state, loss_fn, batches, cfg)
    assert host.reads == []
    assert not torch.equal(state.vae_module.quantize.embedding.weight, codebook)


def test_ema_every_k_steps_is_flushed_before_the_end_of_training(stage2_setup, tmp_path):
    """ema_update_every above the run's length: the shadow moves once, at the last step, by all the steps'
    decays together, so the saved EMA is lerp(initial, final weights, 1 - prod decay_n) and not the initial UNet."""
    import dataclasses
    import itertools

    import stage2_diffusion_trainer
    from src.training.stage2 import train_loop
    accelerator, ctx, state = build_stage2(stage2_setup, ema_update_every=1000, ema_decay=0.999)
    initial = copy.deepcopy(state.ema.shadow)
    steps = 5
    ctx.train_cfg = dataclasses.replace(ctx.train_cfg, total_training_iterations=steps, log_every=1000,
                                        checkpoint_iterations=0, val_generation_freq=0)
    args = stage2_diffusion_trainer.parse_args([
        "--working_directory", str(tmp_path), "--training_config", "unused.yaml", "--dataset", "shapes",
        "--path_to_vae_backbone", "unused.safetensors", "--report_to", "none"])
    assert train_loop(args, accelerator, ctx, state, itertools.repeat(latent_cache_batch(ctx, stage2_setup[1])))
    decays = torch.tensor([(1 + n) / (10 + n) for n in range(steps)])  # the warm-up's, all below 0.999
    weight = 1 - decays.prod()
    for (name, p0), p, p_ema in zip(initial.named_parameters(), ctx.unet_module.parameters(),
                                    state.ema.shadow.parameters()):
        torch.testing.assert_close(p_ema, torch.lerp(p0, p.detach(), weight), msg=name)
    assert not all(torch.equal(a, b) for a, b in zip(initial.parameters(), state.ema.shadow.parameters()))


# ------------------------------------------------------------------------------------------------ compile cache

CACHE_PROBE = """
import json, sys, torch
from src.config import Stage2TrainConfig
from src.training.performance import use_compile_cache
path = use_compile_cache(Stage2TrainConfig(compile=True), sys.argv[1])
with torch.no_grad():
    torch.compile(torch.nn.Linear(4, 4))(torch.randn(2, 4))
from torch._dynamo.utils import counters
print(json.dumps({"dir": str(path), "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_compile_cache_goes_to_the_working_directory_unless_chosen_before_the_run(tmp_path, monkeypatch):
    import tempfile

    import stage2_diffusion_trainer
    from src.training.performance import COMPILE_CACHE_ENV, use_compile_cache
    from src.training.setup import make_accelerator

    torch_default = os.path.join(tempfile.gettempdir(), "torchinductor_someone")  # what importing dynamo writes
    monkeypatch.setenv(COMPILE_CACHE_ENV, torch_default)
    assert use_compile_cache(Stage2TrainConfig(compile=False), tmp_path) is None
    assert use_compile_cache(Stage2TrainConfig(compile=True, compile_cache=False), tmp_path) is None
    assert os.environ[COMPILE_CACHE_ENV] == torch_default
    args = stage2_diffusion_trainer.parse_args([
        "--working_directory", str(tmp_path / "work"), "--training_config", "t.yaml", "--dataset", "shapes",
        "--path_to_vae_backbone", "v.safetensors", "--report_to", "none",
    ])
    reset_accelerate()
    make_accelerator(args, Stage1TrainConfig(compile=True))  # what both trainers call before building models
    reset_accelerate()
    assert os.environ[COMPILE_CACHE_ENV] == str((tmp_path / "work" / "compile_cache").resolve())
    blocked = tmp_path / "a_file"  # a working directory that cannot hold the cache: torch's default stays
    blocked.write_text("")
    monkeypatch.setenv(COMPILE_CACHE_ENV, torch_default)
    assert use_compile_cache(Stage2TrainConfig(compile=True), blocked) is None
    assert os.environ[COMPILE_CACHE_ENV] == torch_default
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))  # the user's own choice wins
    assert use_compile_cache(Stage2TrainConfig(compile=True), tmp_path / "other") == tmp_path / "mine"
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "mine")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor's CPU kernels need a C++ compiler")
def test_a_second_process_loads_the_compiled_graphs_from_the_working_directory(tmp_path):
    """Through the real inductor: the first process compiles into working_dir/compile_cache, a second one (a
    resumed run) loads every graph from there."""
    import json
    import subprocess
    import sys

    from src.training.performance import COMPILE_CACHE_ENV

    env = {k: v for k, v in os.environ.items() if k != COMPILE_CACHE_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["dir"] == str(tmp_path.resolve() / "compile_cache")
    assert runs[0]["miss"] >= 1 and runs[0]["hit"] == 0  # compiled
    assert runs[1]["hit"] == runs[0]["miss"] and runs[1]["miss"] == 0  # loaded
    assert (tmp_path / "compile_cache" / "fxgraph").is_dir()
