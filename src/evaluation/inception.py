"""The FID Inception network: torch-fidelity's InceptionV3 (through torchmetrics) with the standard weights file.

    weights = resolve_inception_weights(None)        # --inception_weights, or $TORCH_HOME/hub/checkpoints/<file>
    inception = load_inception(weights, device)      # images (B, 3, H, W) in [-1, 1] -> pool3 features (B, 2048)

The weights are the TensorFlow FID Inception (2015-12-05) converted to a PyTorch state dict by pytorch-fid:
pt_inception-2015-12-05-6726825d.pth. torch-fidelity publishes the same file (same sha256 prefix) as
weights-inception-2015-12-05-6726825d.pth; either name is found. Nothing is ever downloaded.

Images are quantised to uint8 exactly as they are saved to PNG, then torch-fidelity resizes them to 299 x 299 with
its TensorFlow-1.x-compatible bilinear interpolation (the resize the LDM paper's torch-fidelity numbers used).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..models.lpips import torch_hub_checkpoints_dir

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_FILE_NAMES = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")  # pytorch-fid's, torch-fidelity's
FEATURE_DIM = 2048
EXTRACTOR_NAME = "torch-fidelity InceptionV3 pool3 2048, uint8 input, tf1 bilinear resize to 299"


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights file is missing or is not a plain state dict."""


def missing_weights_message(looked_at: list[Path]) -> str:
    folder = torch_hub_checkpoints_dir()
    where = ", ".join(str(p) for p in looked_at)
    return (
        f"FID Inception weights not found (looked for {where}). This toolkit never downloads: fetch "
        f"{INCEPTION_FILE} once from {INCEPTION_URL} and put it in {folder} ($TORCH_HOME/hub/checkpoints; "
        f"TORCH_HOME defaults to ~/.cache/torch), or pass its path with --inception_weights."
    )


def resolve_inception_weights(path: Optional[str | Path] = None) -> Path:
    """The weights file: `path` when given, else the first of INCEPTION_FILE_NAMES in $TORCH_HOME/hub/checkpoints."""
    candidates = [Path(path)] if path else [torch_hub_checkpoints_dir() / name for name in INCEPTION_FILE_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InceptionWeightsError(missing_weights_message(candidates))


@contextlib.contextmanager
def weights_only_loading():
    """Make every torch.load inside the block weights-only. torch-fidelity calls torch.load(weights_only=False);
    torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over the call's argument, so no arbitrary object is unpickled."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), rounded as src.data.transforms.to_pil_images saves PNGs."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> 2048-d pool3 features of the FID Inception. `identity` keys feature caches."""

    def __init__(self, network: nn.Module, weights_path: Path, weights_sha256: str):
        super().__init__()
        self.network = network
        self.weights_path = weights_path
        self.identity = {"extractor": EXTRACTOR_NAME, "weights_sha256": weights_sha256}

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images).to(self.device)  # (B, 3, H, W) uint8
        return self.network(x).float()  # (B, 2048)


def load_inception(weights: Optional[str | Path] = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's network) from a local state-dict file, weights-only.

    The network is frozen, so one copy per (file, device) is kept: periodic FID during training reloads nothing."""
    path = resolve_inception_weights(weights).resolve()
    st = path.stat()
    return _load_inception(str(path), st.st_size, st.st_mtime_ns, str(torch.device(device)))


@functools.lru_cache(maxsize=2)
def _load_inception(path: str, size: int, mtime_ns: int, device: str) -> InceptionFeatures:
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        with weights_only_loading():
            network = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                feature_extractor_weights_path=path, antialias=False,
            )
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, KeyError) as err:  # pickled objects, TorchScript, wrong keys
        why = "it holds pickled objects besides tensors" if isinstance(err, pickle.UnpicklingError) else str(err)[:300]
        raise InceptionWeightsError(
            f"{path} is not the FID Inception state dict ({why}). Use {INCEPTION_FILE} from {INCEPTION_URL}; "
            "a TorchScript archive or a pickled model is refused."
        ) from err
    return InceptionFeatures(network.to(device).eval(), Path(path), file_sha256(Path(path)))
