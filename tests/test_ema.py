"""The EMA of the UNet's weights: moving every step, or every k steps by the k steps' decays together."""

import torch

from src.training.ema import EMA


def pair(k: int, decay: float = 0.95):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    return model, EMA(model, decay), EMA(model, decay, update_every=k)


def test_every_k_steps_matches_k_single_updates_while_the_weights_hold_still():
    """Over blocks of k steps with the weights fixed inside each (one step skipped), the k-step EMA lands where
    k per-step updates land, at every block's end; between them its shadow stays put and its count goes on."""
    k = 4
    model, each, every_k = pair(k)
    step = 0
    for block in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (block + 1))
            model[1].running_mean.fill_(float(block))
        start = every_k.shadow[0].weight.clone()
        for i in range(k):
            step += 1
            skipped = torch.tensor(block == 1 and i == 2)
            each.update(model, skipped, step=step)
            every_k.update(model, skipped, step=step)
            if i < k - 1:
                assert torch.equal(every_k.shadow[0].weight, start)
            assert int(every_k.num_updates) == int(each.num_updates)
        for a, b in zip(each.shadow.state_dict().values(), every_k.shadow.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(every_k.shadow[0].weight, start) and float(every_k.pending_weight) == 0.0
    assert int(every_k.num_updates) == 3 * k - 1


def test_one_step_ema_is_the_plain_formula_and_flush_moves_only_pending_steps():
    model, each, every_k = pair(k=5, decay=0.5)
    shadow = each.shadow[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    each.update(model)  # no step given: moves at once
    d = min(0.5, 1 / 10)  # warmup decay at update 0
    torch.testing.assert_close(each.shadow[0].weight, d * shadow + (1 - d) * model[0].weight)
    every_k.update(model, torch.tensor(False), step=1)
    every_k.update(model, torch.tensor(False), step=2)
    assert torch.equal(every_k.shadow[0].weight, shadow)
    every_k.flush(model)  # what the trainer does before a checkpoint, a validation grid or the end
    d1 = min(0.5, 2 / 11)
    torch.testing.assert_close(every_k.shadow[0].weight, d * d1 * shadow + (1 - d * d1) * model[0].weight)
    moved = every_k.shadow[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    every_k.flush(model)  # nothing pending: the shadow stays
    assert torch.equal(every_k.shadow[0].weight, moved)


def test_checkpoints_from_before_update_every_load_with_nothing_pending():
    model, each, every_k = pair(k=3)
    old_format = {k: v for k, v in each.state_dict().items() if k != "pending_weight"}
    every_k.pending_weight.fill_(0.5)
    every_k.load_state_dict(old_format)
    assert float(every_k.pending_weight) == 0.0
    assert torch.equal(every_k.shadow[0].weight, each.shadow[0].weight)
