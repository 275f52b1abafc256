"""Fixtures for the evaluation tests: a random FID Inception in the standard weights format."""

from __future__ import annotations

from pathlib import Path

import torch


def make_random_inception_file(path, seed: int = 0) -> Path:
    """torchvision's InceptionV3 (pytorch-fid's layout: 1008 classes, no aux head), randomly initialised, saved
    as a plain state dict like pt_inception-2015-12-05-6726825d.pth. Batch-norm statistics are set from one small
    random batch so features stay O(1) instead of growing by orders of magnitude layer after layer."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running stats = the calibration batch's stats
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 107, 107) * 2 - 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
