"""The guarded update: a step with a non-finite loss or gradient (any micro-batch, generator or discriminator)
changes no weight, no optimizer state, no schedule, no EMA and no BatchNorm statistic, and training goes on;
too many in a row stop the run naming the step and the term. Also: the device-side LR schedule, the no-decay
parameter groups, and the adaptive GAN weight under fp16."""

import pytest
import torch

from src.config import VAEConfig
from src.training.guard import NonFiniteLossError
from src.training.optim import LRSchedule, build_adamw, param_groups, schedule_factors
from tests.stage1_helpers import images, tiny_stage1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def snapshot(state) -> dict[str, torch.Tensor]:
    """Every number a skipped step must leave alone."""
    out = {f"vae.{k}": v.clone() for k, v in state.vae.state_dict().items()}
    out.update({f"disc.{k}": v.clone() for k, v in state.disc.state_dict().items()})  # BatchNorm stats included
    for unit in (state.vae_opt, state.disc_opt):
        for i, (p, s) in enumerate(unit.optimizer.state.items()):
            out.update({f"{unit.name}.{i}.{k}": v.clone() for k, v in s.items()})
        out[f"{unit.name}.updates"] = unit.schedule.updates.clone()
        out[f"{unit.name}.lr"] = unit.schedule.lr.clone()
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


def test_a_nan_micro_batch_skips_the_whole_accumulated_step_and_training_goes_on():
    from src.training.stage1 import train_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=2)
    train_step(accelerator, state, loss_fn, iter([images(0), images(1)]), cfg)  # optimizer state exists now
    state.step += 1
    before = snapshot(state)
    bad = {"image": images(3)["image"].clone()}
    bad["image"][0, 0, 0, 0] = float("nan")
    # the first micro-batch is good: its gradients must not be applied alone (nor divided by the wrong count)
    _, skipped = train_step(accelerator, state, loss_fn, iter([images(2), bad]), cfg)
    assert bool(skipped)
    assert_same(before, snapshot(state))
    assert all(p.grad is None for p in state.vae.parameters())
    state.step += 1
    logs, skipped = train_step(accelerator, state, loss_fn, iter([images(4), images(5)]), cfg)
    assert not bool(skipped) and torch.isfinite(logs["loss"])
    after = snapshot(state)
    assert not torch.equal(before["vae.decoder.conv_out.weight"], after["vae.decoder.conv_out.weight"])
    assert int(state.vae_opt.schedule.updates) == 2 and int(state.guard.skipped) == 1 and int(state.guard.in_row) == 0


def test_a_nan_in_the_discriminator_skips_both_updates_then_stops_the_run_naming_it():
    from src.training.stage1 import train_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=1)
    train_step(accelerator, state, loss_fn, iter([images(0)]), cfg)
    state.step += 1
    before = snapshot(state)

    def nan_on_the_discriminator_step(module, inputs, output):  # D trains only in its own step's passes
        return output * float("nan") if module.main[0].weight.requires_grad else output

    hook = state.disc.register_forward_hook(nan_on_the_discriminator_step)
    for i in range(2):
        logs, skipped = train_step(accelerator, state, loss_fn, iter([images(10 + i)]), cfg)
        state.step += 1
        assert bool(skipped) and torch.isfinite(logs["rec_loss"]) and not torch.isfinite(logs["disc_loss"])
    assert_same(before, snapshot(state))  # autoencoder too: the step is skipped as a whole
    state.guard.check()  # two in a row: below max_nonfinite_steps (3)
    train_step(accelerator, state, loss_fn, iter([images(12)]), cfg)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row, the last at step 4 \(non-finite: "
                                                 r"disc_loss, grad_norm/discriminator\)"):
        state.guard.check()
    hook.remove()


def test_fp16_overflow_is_skipped_by_the_scaler_without_counting_and_the_scale_is_checkpointed():
    from src.training.stage1 import train_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=1)
    from src.training.precision import MixedPrecision

    state.precision = MixedPrecision("fp16", torch.device("cpu"))
    state.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # scaled gradients overflow fp16
    train_step(accelerator, state, loss_fn, iter([images(0)]), cfg)
    state.step += 1
    assert int(state.vae_opt.schedule.updates) == 0 and not state.vae_opt.optimizer.state.get("step")
    assert int(state.guard.skipped) == 1 and int(state.guard.in_row) == 0  # an overflow is not a NaN
    scale = state.precision.state_dict()["scale"]
    assert scale == 2.0**23  # backed off once
    for i in range(20):  # the scaler backs off until the step fits, then training proceeds
        _, skipped = train_step(accelerator, state, loss_fn, iter([images(1 + i)]), cfg)
        state.step += 1
        if not bool(skipped):
            break
    assert int(state.vae_opt.schedule.updates) == 1 and state.precision.state_dict()["scale"] <= 2.0**16
    state.guard.check()


def test_fp16_gradient_skips_count_once_the_scale_is_below_one():
    """A NaN gradient of a finite loss is no overflow: backing off cannot cure it. Its skips are the scaler's
    while the scale is >= 1, then they count, and the run stops instead of skipping every step forever."""
    from src.training.precision import MixedPrecision
    from src.training.stage1 import train_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=1, use_patchgan=False)  # max_nonfinite_steps 3
    state.precision = MixedPrecision("fp16", torch.device("cpu"))
    state.precision.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    state.vae_module.decoder.conv_out.weight.register_hook(lambda g: g * float("nan"))
    in_row = []
    for i in range(5):
        _, skipped = train_step(accelerator, state, loss_fn, iter([images(i)]), cfg)
        state.step += 1
        assert bool(skipped)
        in_row.append(int(state.guard.in_row))
    assert in_row == [0, 0, 1, 2, 3]  # scale 4 -> 2 -> 1: the scaler's; -> 0.5, 0.25, 0.125: counted
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row, the last at step 5"):
        state.guard.check()


def test_adaptive_weight_under_fp16_uses_the_loss_scale():
    """Unscaled, the small adversarial loss's fp16 gradients (1e-8 per output element) underflow to 0 at the
    last layer, and d is inflated; with the loss scale they survive and d matches fp32."""
    from src.losses.autoencoder import adaptive_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 3, 3, padding=1)
    h = 4 * torch.rand(2, 8, 64, 64)

    def losses():
        x_hat = conv(h)  # (2, 3, 64, 64): 24576 elements
        return x_hat.float().abs().mean(), 2.5e-4 * x_hat.float().mean()

    rec, gen = losses()
    reference = adaptive_weight(rec, gen, conv.weight)
    with torch.autocast("cpu", dtype=torch.float16):
        rec, gen = losses()
        unscaled = adaptive_weight(rec, gen, conv.weight)
        rec, gen = losses()
        scaled = adaptive_weight(rec, gen, conv.weight, torch.tensor(2.0**12))
    assert unscaled.item() > 3 * reference.item()
    assert scaled.item() == pytest.approx(reference.item(), rel=0.02)


def test_stage2_skipped_step_leaves_the_ema_and_its_count():
    from src.training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    shadow = ema.shadow.weight.clone()
    ema.update(model, skipped=torch.tensor(True))
    assert torch.equal(ema.shadow.weight, shadow) and int(ema.num_updates) == 0
    ema.update(model, skipped=torch.tensor(False))
    d = min(0.9, 1 / 10)  # warmup decay at update 0
    torch.testing.assert_close(ema.shadow.weight, d * shadow + (1 - d) * model.weight)
    assert int(ema.num_updates) == 1


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear", "polynomial"])
def test_device_schedule_follows_transformers_and_advances_only_on_updates(name):
    """polynomial decays to an absolute lr_end (1e-7): its factors depend on the base rate, which the table used
    to take as 1 (ending at 1e-7 x base_lr)."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    ref_opt = torch.optim.SGD([p], lr=0.1)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=3, num_training_steps=10)
    module = torch.nn.Linear(2, 2)
    opt = build_adamw(module, 0.1, (0.9, 0.999), 1e-8, 0.0, "cpu")
    sched = LRSchedule(opt, name, 0.1, 3, 10)
    for k in range(11):
        assert opt.param_groups[0]["lr"].item() == pytest.approx(ref.get_last_lr()[0], rel=1e-6), k
        sched.advance(torch.tensor(0.0))  # a skipped step: the rate stays
        assert opt.param_groups[0]["lr"].item() == pytest.approx(ref.get_last_lr()[0], rel=1e-6), k
        sched.advance(torch.tensor(1.0))
        ref_opt.step()
        ref.step()
    with pytest.raises(ValueError, match="cannot be used"):
        schedule_factors("no_such_schedule", 0, 10)


def test_weight_decay_spares_biases_norms_and_embeddings():
    from src.models.vae import build_autoencoder

    vae = build_autoencoder(VAEConfig(img_size=16, vae_channels_per_block=[8, 16], groupnorm_groups=4, quantize=True,
                                      codebook_size=16))
    decay, no_decay = param_groups(vae, 0.01)
    names = {id(p): n for n, p in vae.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "quantize.embedding.weight" in no_decay_names
    assert {"decoder.conv_out.bias", "decoder.conv_norm_out.weight"} <= no_decay_names
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0
    # decay is AdamW's decoupled kind: with zero gradients a decayed weight shrinks by lr * wd, a bias stays
    opt = build_adamw(vae, 0.1, (0.9, 0.999), 1e-8, 0.01, "cpu")
    w, b = vae.decoder.conv_out.weight.detach().clone(), vae.decoder.conv_out.bias.detach().clone()
    for p in vae.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(vae.decoder.conv_out.weight, w * (1 - 0.1 * 0.01))
    assert torch.equal(vae.decoder.conv_out.bias, b)


def test_discriminator_optimizer_keys_are_honoured():
    _, state, _, _ = tiny_stage1(accum=1, disc_adam_beta1=0.3, disc_adam_beta2=0.8, disc_weight_decay=0.02,
                                 adam_beta1=0.6, weight_decay=0.01)
    disc, vae = state.disc_opt.optimizer, state.vae_opt.optimizer
    assert disc.defaults["betas"] == (0.3, 0.8) and vae.defaults["betas"] == (0.6, 0.999)
    assert [g["weight_decay"] for g in disc.param_groups] == [0.02, 0.0]  # convs; BatchNorm and biases
    assert [g["weight_decay"] for g in vae.param_groups] == [0.01, 0.0]
    assert disc.defaults["fused"] and vae.defaults["fused"]


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """issue 10's hot loop: between log steps no loss, norm or non-finite flag is read on the host (counted at the
    Python level: Tensor.item / tolist / bool / int / float), the guard included."""
    from src.training.stage1 import train_step

    accelerator, state, loss_fn, cfg = tiny_stage1(accum=2)
    train_step(accelerator, state, loss_fn, iter([images(0), images(1)]), cfg)  # lazy optimizer state
    state.step += 1
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, _n=name: (reads.append(_n), _f(self, *a))[1])
    bad = images(3)
    bad["image"][0] = float("nan")
    for batch in ([images(2), images(3)], [images(4), bad]):
        train_step(accelerator, state, loss_fn, iter(batch), cfg)
        state.step += 1
    monkeypatch.undo()
    assert reads == []
    assert int(state.guard.skipped) == 1  # the NaN step was seen, on the device


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_matches_clip_grad_norm_and_a_fused_step_does_it_in_the_kernel(fused, monkeypatch):
    """guarded_update clips as torch.nn.utils.clip_grad_norm_ does and returns the norm before clipping; with a
    fused AdamW it never scales the gradients itself (the kernel divides them by the clip divisor)."""
    from src.training.optim import Trainable, guarded_update
    from src.training.precision import MixedPrecision

    def model():
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))

    torch.manual_seed(0)
    ours, ref = model(), model()
    ref.load_state_dict(ours.state_dict())
    if fused:
        opt = build_adamw(ours, 0.05, (0.9, 0.999), 1e-8, 0.01, "cpu")
    else:
        opt = torch.optim.AdamW(param_groups(ours, 0.01), lr=0.05, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    assert all(bool(group["fused"]) == fused for group in opt.param_groups)
    unit = Trainable("m", list(ours.parameters()), opt, LRSchedule(opt, "constant", 0.05, 0, 10), max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=0.05, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    clip = torch.nn.utils.clip_grad_norm_
    if fused:  # the update must not clip by scaling the gradients itself
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", None)
    x = torch.randn(4, 6)
    for scale in (100.0, 0.01, 30.0):  # gradient norms above, below, above max_grad_norm
        for m in (ours, ref):
            (m(x).pow(2).sum() * scale).backward()
        norm_before = clip(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        skipped, _, norms = guarded_update([unit], MixedPrecision("no", "cpu"), torch.tensor(False))
        assert not skipped
        torch.testing.assert_close(norms[0], norm_before)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
