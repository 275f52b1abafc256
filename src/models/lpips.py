"""LPIPS: a learned perceptual distance on VGG16 features (Zhang et al. 2018, "The Unreasonable Effectiveness
of Deep Features as a Perceptual Metric", Eq. 1).

    d(x, y) = sum_l  1/(H_l W_l) sum_{h,w} || w_l * (f^l_x[h,w] - f^l_y[h,w]) ||^2

where f^l is the VGG16 activation at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (64/128/256/512/512
channels), unit-normalised over channels at every position, and w_l >= 0 is a 1x1 conv without bias to one
channel (the "linear layers"). Inputs are RGB in [-1, 1]; they are first shifted and scaled as the official
v0.1 release does.

    model = load_lpips_checkpoint("work_dir/lpips_64x64_vgg.pt")   # what lpips_trainer.py writes
    d = model(x, y)                                                   # (B,) distances

Where the weights come from:
  * `load_lpips_checkpoint`: a file written by lpips_trainer.py; it holds the trunk too, so it needs no
    ImageNet file.
  * `lpips_with_official_weights`: the v0.1 linear weights shipped inside the `lpips` package, with
    torchvision's ImageNet VGG16 trunk read from $TORCH_HOME/hub/checkpoints/ (never downloaded).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn as nn

from .serialization import load_models, save_models

VGG16_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAP_INDICES = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG16_IMAGENET_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_IMAGENET_URL = "https://download.pytorch.org/models/" + VGG16_IMAGENET_FILE
CHECKPOINT_FORMAT = "lpips-vgg/1"
NORM_EPS = 1e-10


def vgg16_trunk() -> nn.Sequential:
    """torchvision's vgg16().features[:30] (conv/ReLU/max-pool, same indices), with torchvision's init."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG16_CHANNELS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


def normalize_channels(f: torch.Tensor) -> torch.Tensor:
    """Unit-normalise a (B, C, H, W) feature map over C at every position (eps as in the official code)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class LPIPS(nn.Module):
    """VGG16 trunk + five non-negative 1x1 linear layers. forward(x, y) -> (B,) distances, x/y in [-1, 1]."""

    def __init__(self, use_dropout: bool = True):
        super().__init__()
        self.use_dropout = use_dropout
        # official v0.1 input scaling, applied to [-1, 1] input
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.trunk = vgg16_trunk()
        self.dropout = nn.Dropout(0.5) if use_dropout else nn.Identity()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the five tapped activations, each (B, C_l, H_l, W_l)."""
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.trunk):
            h = layer(h)
            if i in TAP_INDICES:
                taps.append(h)
        return taps

    def distance_from_features(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 1 from precomputed features -> (B,). Runs in fp32 even under autocast."""
        total = 0.0
        with torch.autocast(device_type=fx[0].device.type, enabled=False):
            for lin, a, b in zip(self.lins, fx, fy):
                diff = (normalize_channels(a.float()) - normalize_channels(b.float())).pow(2)  # (B, C, h, w)
                total = total + lin(self.dropout(diff)).mean(dim=(1, 2, 3))  # (B,)
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats = self.features(torch.cat([x, y], dim=0))  # one trunk pass over (2B, 3, H, W)
        fx, fy = zip(*(f.chunk(2, dim=0) for f in feats))
        return self.distance_from_features(list(fx), list(fy))

    @torch.no_grad()
    def clamp_weights(self) -> None:
        """Keep the linear layers non-negative (a distance must not reward feature differences)."""
        for lin in self.lins:
            lin.weight.clamp_(min=0)

    def set_trunk_trainable(self, trainable: bool) -> None:
        self.trunk.requires_grad_(trainable)

    def load_trunk_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a VGG16 trunk from torchvision keys ('features.N.weight'; classifier ignored) or bare 'N.weight'."""
        self.trunk.load_state_dict(trunk_tensors(state, len(self.trunk)), strict=True)


def trunk_tensors(state: dict[str, torch.Tensor], num_layers: int = 30) -> dict[str, torch.Tensor]:
    """The conv tensors of a torchvision VGG16 state dict, keyed 'N.weight' / 'N.bias' for N < num_layers."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("features.")
        index = name.split(".")[0]
        if index.isdigit() and int(index) < num_layers:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Weights from elsewhere: torchvision's ImageNet trunk, the `lpips` package's linear layers
# --------------------------------------------------------------------------------------------------------------


def torch_hub_checkpoints_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints (torch.hub's cache, default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_vgg16_path() -> Path:
    """Path of torchvision's ImageNet VGG16 file; FileNotFoundError naming the file and folder when absent."""
    folder = torch_hub_checkpoints_dir()
    path = folder / VGG16_IMAGENET_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet VGG16 weights not found: '{VGG16_IMAGENET_FILE}' is not in {folder}. This toolkit never "
            f"downloads; fetch {VGG16_IMAGENET_URL} on a machine with network access and copy it into that folder "
            "(or set $TORCH_HOME to where it is)."
        )
    return path


def load_imagenet_trunk(model: LPIPS) -> LPIPS:
    model.load_trunk_state_dict(torch.load(imagenet_vgg16_path(), map_location="cpu", weights_only=True))
    return model


def official_linear_weights_path(version: str = "0.1") -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `lpips` package is not installed: pip install lpips==0.1.4")
    path = Path(spec.origin).parent / "weights" / f"v{version}" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"'vgg.pth' not found in {path.parent} (expected inside the lpips package)")
    return path


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `lpips.LPIPS(net='vgg')` state dict (or its vgg.pth) to this module's keys.

    'linK.model.{0,1}.weight' -> 'lins.K.weight'; 'net.sliceK.N.*' -> 'trunk.N.*'; scaling buffers are ours.
    """
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
            out[f"lins.{parts[0][3:]}.weight"] = value
        elif parts[0] == "net" and parts[1].startswith("slice"):
            out["trunk." + ".".join(parts[2:])] = value
    return out


def lpips_with_official_weights(pretrained_trunk: bool = True) -> LPIPS:
    """Our network with the official v0.1 linear layers; ImageNet trunk (or random with pretrained_trunk=False)."""
    model = LPIPS(use_dropout=True)
    lins = official_to_ours(torch.load(official_linear_weights_path(), map_location="cpu", weights_only=True))
    model.lins.load_state_dict({k.removeprefix("lins."): v for k, v in lins.items()}, strict=True)
    if pretrained_trunk:
        load_imagenet_trunk(model)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints written by lpips_trainer.py
# --------------------------------------------------------------------------------------------------------------


def save_lpips_checkpoint(path, model: LPIPS, ranking_head: nn.Module, info: dict) -> Path:
    """Write a self-contained checkpoint: trunk + linear layers (+ ranking head) and `info` (JSON-able).

    '.safetensors' -> safetensors with JSON metadata; anything else -> a torch.save dict of tensors and plain
    values that `torch.load(weights_only=True)` reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"format": CHECKPOINT_FORMAT, "use_dropout": model.use_dropout, **info}
    if path.suffix == ".safetensors":
        return save_models(path, {"lpips": model, "ranking_head": ranking_head}, {"lpips_config": config})
    state = {
        "config": json.loads(json.dumps(config)),  # plain types only
        "lpips": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "ranking_head": {k: v.detach().cpu().contiguous() for k, v in ranking_head.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def read_lpips_checkpoint(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({'lpips': state, 'ranking_head': state}, config) of a file written by `save_lpips_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS checkpoint not found: '{path.name}' is not in {path.parent.resolve()} "
            "(train one with lpips_trainer.py; it writes work_dir/checkpoint_name)"
        )
    if path.suffix == ".safetensors":
        tensors, meta = load_models(path)
        if "lpips_config" not in meta:
            raise ValueError(f"{path} holds no LPIPS network (no 'lpips_config' metadata)")
        return tensors, meta["lpips_config"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "lpips" not in state:
        keys = list(state)[:3] if isinstance(state, dict) else type(state).__name__
        hint = ""
        if isinstance(state, dict) and any(str(k).startswith("lin0.") for k in state):
            hint = " It looks like the lpips package's linear-layer file: use lpips_with_official_weights()."
        raise ValueError(f"{path} is not an lpips_trainer.py checkpoint (found {keys}).{hint}")
    return {"lpips": state["lpips"], "ranking_head": state.get("ranking_head", {})}, state.get("config", {})


def load_lpips_checkpoint(path) -> LPIPS:
    """The frozen, eval-mode LPIPS of a checkpoint written by lpips_trainer.py (.pt or .safetensors)."""
    tensors, config = read_lpips_checkpoint(path)
    model = LPIPS(use_dropout=bool(config.get("use_dropout", True)))
    model.load_state_dict(tensors["lpips"], strict=True)
    return freeze(model)
