"""`conceptual_captions`: the Hugging Face dataset folder written by prep_cc.py (its `train` split).

Items, with the same image transform as every other dataset (resize shorter side, centre crop, [-1, 1]):

    stage 1, or stage 2 encoding captions on the fly    {"image": (3, S, S), "caption": str}
    stage 2 with pre_encoded_text: True                 {"image": (3, S, S), "text_embeds": (L_i, D) float32}

`text_embeds` are stored without padding (prep_cc.py --pre_encode_text); the loader's `collate` pads them per
batch and adds `text_embeds_mask` (B, L). An image whose stored bytes do not decode gives None: `collate` drops
and counts it, so one damaged row never stops training.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Optional

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import Stage2TrainConfig, TrainConfig
from .image_folder import DatasetError
from .transforms import IMAGE_ERRORS, ImageTransform, to_rgb

logger = logging.getLogger(__name__)

SPLIT = "train"
PREP_INFO = "prep_info.json"  # prep_cc.py's settings, beside the DatasetDict's own files


def read_prep_info(path) -> dict:
    """What prep_cc.py recorded of its run ({'text_model', 'pre_encoded_text', 'dtype', 'img_size'}); {} for a
    folder prepared before it did."""
    info = Path(path) / PREP_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def load_prepared(path, split: str = SPLIT) -> datasets.Dataset:
    """One split of prep_cc.py's output folder, with clear errors for a missing or foreign folder."""
    if path is None:
        raise DatasetError("conceptual_captions needs --path_to_dataset (the --path_to_save of prep_cc.py)")
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder not found: {path} (make it with prep_cc.py; see README.md (Conceptual Captions section))")
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is not a dataset saved by prep_cc.py ({err})") from err
    if not isinstance(data, datasets.DatasetDict) or split not in data:
        raise DatasetError(f"{path} has no '{split}' split; prep_cc.py writes a DatasetDict with one")
    return data[split]


def wants_text_embeds(cfg: TrainConfig) -> bool:
    """Stage 2 asks for stored embeddings with `pre_encoded_text: True`; stage 1 configs never do."""
    return isinstance(cfg, Stage2TrainConfig) and cfg.pre_encoded_text is True


class ConceptualCaptionsDataset(Dataset):
    def __init__(self, path, img_size: int, interpolation: str = "bicubic", text_embeds: bool = False):
        data = load_prepared(path)
        text_column = "text_embeds" if text_embeds else "caption"
        for column in ("image", text_column):
            if column not in data.column_names:
                how = "run prep_cc.py with --pre_encode_text" if column == "text_embeds" else "run prep_cc.py again"
                raise DatasetError(f"{path} has no '{column}' column ({how}); columns: {data.column_names}")
        data = data.select_columns(["image", text_column]).cast_column("image", datasets.Image(decode=False))
        if text_embeds:
            data = data.with_format("numpy", columns=["text_embeds"], output_all_columns=True)
        self.data = data
        self.path = path
        self.prep_info = read_prep_info(path)  # stage 2 checks the text model of pre-encoded embeddings against it
        self.text_column = text_column
        self.transform = ImageTransform(img_size, interpolation)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.data)

    def _image(self, index: int, stored: dict) -> Optional[torch.Tensor]:
        try:
            with Image.open(io.BytesIO(stored["bytes"])) as img:
                img.load()
                return self.transform(to_rgb(img))  # (3, S, S)
        except IMAGE_ERRORS + (TypeError,) as err:  # TypeError: no bytes stored
            if index not in self._warned:
                self._warned.add(index)
                logger.warning("skipping undecodable image at row %d of %s: %s", index, self.path, err)
            return None

    def __getitem__(self, index: int) -> Optional[dict]:
        row = self.data[index]
        image = self._image(index, row["image"])
        if image is None:
            return None
        if self.text_column == "text_embeds":
            return {"image": image, "text_embeds": torch.from_numpy(row["text_embeds"]).float()}  # (L_i, D)
        return {"image": image, "caption": row["caption"]}


def build_conceptual_captions(path, img_size: int, cfg: TrainConfig) -> Dataset:
    return ConceptualCaptionsDataset(path, img_size, cfg.interpolation, text_embeds=wants_text_embeds(cfg))
