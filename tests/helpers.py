"""Test fixtures that build small real models offline (no hub access)."""

from __future__ import annotations

from pathlib import Path

from src.data.shapes import CAPTION_TEMPLATES, COLORS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next Accelerator() in this process starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _corpus() -> list[str]:
    words = list(COLORS) + SHAPES
    lines = [t.replace("{", "").replace("}", "") for t in CAPTION_TEMPLATES]
    lines += [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in COLORS]
    lines += ["a beautiful sunset at the beach", "a foggy magical forest", "a photo of a cat", " ".join(words)]
    return lines


def make_tiny_clip(folder, hidden_size: int = 32, layers: int = 2, vocab_size: int = 300) -> Path:
    """Save a tiny random `CLIPTextModel` and a word-piece tokenizer with BOS/EOS to `folder`.

    The tokenizer is trained here on shape captions (BPE, lower-case), pads with EOS and stops at 77 tokens,
    as CLIP's does; `AutoTokenizer.from_pretrained(folder)` and `CLIPTextModel.from_pretrained(folder)` load it.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, "<|unk|>"])
    tok.train_from_iterator(_corpus(), trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<|unk|>", model_max_length=77
    )
    fast.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder
