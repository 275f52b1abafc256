"""Latent cache for stage 2 (`--cache_latents DIR`): encode the dataset once, then train from the cache.

The frozen VAE's work is the same on every epoch, so the trainer can store, per image, the posterior's mean and
standard deviation (not one sample: each epoch still draws z = mean + std * eps, exactly as without the cache)
and, for text-conditional runs, the text embeddings of its caption. When random flips are on, the moments of the
mirrored image are stored too (a VAE is not mirror-equivariant), so training from the cache sees exactly the
latents that training from images would.

Layout of DIR (nothing pickled; arrays are .npy read with allow_pickle=False, or raw float32 for text):

    cache.json              identity (VAE weights hash, VAE config, dataset, image size, ...), fingerprint, shards,
                            num_items (the dataset's length, unreadable images included)
    shard_<r>/moments.npy   (n, V, 2, C, h, w) float32: V = 2 with flips (view 1 = mirrored), [.., 0] mean, [.., 1] std
    shard_<r>/index.npy     (n,) int64: dataset index of each row
    shard_<r>/labels.npy    (n,) int64: class labels (class-conditional only)
    shard_<r>/text.f32      (T, D) float32: the real (unpadded) tokens of every caption, back to back
    shard_<r>/text_offsets.npy (n + 1,) int64: row i's tokens are text[offsets[i]:offsets[i + 1]]
    shard_<r>/shard.json    rows written, tokens written

Each process encodes the indices rank::world_size into its own shard; reading merges the shards back into
dataset order, so batches from the cache are the same batches as from the images. An unreadable image has no row,
but the cache still has one item per dataset index, None for that image: the loader draws the same permutation of
num_items, and its collate drops (and counts) the None exactly as it drops the unreadable image.

A cache whose identity differs from the current run's (another VAE, config, dataset or text encoder) is refused
with the differing fields named; it is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.loader import collate

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
TextEncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> (hidden (B,L,D), mask (B,L))


class LatentCacheError(RuntimeError):
    """A --cache_latents folder that cannot be used for this run."""


# ----------------------------------------------------------------------------------------------------- identity


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes), independent of device."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d buffers (VQ num_updates) as 1-d
    return h.hexdigest()


def identity_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _differences(stored: dict, wanted: dict) -> list[str]:
    """The identity fields that differ, as text; a field only one side has (a cache made before the field existed)
    counts as a difference even when the other side's value is null."""
    keys = sorted(set(stored) | set(wanted))
    out = []
    for k in keys:
        if (k in stored) != (k in wanted):
            out.append(f"{k}: {'this run' if k in wanted else 'the cache'} has it, "
                       f"{'the cache' if k in wanted else 'this run'} does not (another version of this code)")
            continue
        a, b = stored[k], wanted[k]
        if a != b:
            a_s, b_s = json.dumps(a), json.dumps(b)
            if len(a_s) > 60 or len(b_s) > 60:  # weights hashes and configs: name the field only
                out.append(f"{k} differs")
            else:
                out.append(f"{k}: cache has {a_s}, this run has {b_s}")
    return out


# ----------------------------------------------------------------------------------------------------- building


class _Indexed(Dataset):
    """Adds the item's dataset index, so rows can be put back in dataset order after unreadable files drop out."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Optional[dict]:
        item = self.dataset[self.indices[i]]
        return None if item is None else {**item, "index": self.indices[i]}


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def check_cache_dir(cache_dir, identity: dict) -> bool:
    """True when `cache_dir` holds a complete cache of this identity; False when one must be built there.

    Raises LatentCacheError for a cache of another identity, or a non-empty folder that is not a cache.
    """
    cache_dir = Path(cache_dir)
    meta = _read_json(cache_dir / "cache.json")
    if meta is None:
        if cache_dir.is_dir() and any(cache_dir.iterdir()):
            raise LatentCacheError(
                f"--cache_latents {cache_dir}: the folder is not empty and holds no cache.json; "
                "pass a new or empty folder (nothing was written)"
            )
        return False
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != identity_fingerprint(identity):
        diffs = _differences(meta.get("identity", {}), identity) or [f"format {meta.get('format')} != {CACHE_FORMAT}"]
        raise LatentCacheError(
            f"--cache_latents {cache_dir} was made with another VAE, config or dataset and cannot be used for "
            f"this run ({'; '.join(diffs)}). Pass another folder, or delete this one to rebuild it."
        )
    return bool(meta.get("complete"))


@torch.no_grad()
def build_latent_cache(
    accelerator,
    cache_dir,
    dataset: Dataset,
    vae: torch.nn.Module,
    identity: dict,
    flip: bool,
    conditioning: str,
    encode_text: Optional[TextEncodeFn],
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> None:
    """Encode `dataset` into `cache_dir` (every process its share), then mark the cache complete.

    vae: has latent_moments(x) -> (mean, std), each (B, C, h, w). encode_text: captions -> (hidden, mask), used
    when the dataset yields captions (each distinct caption is encoded once: only its real tokens are stored);
    datasets with pre-encoded 'text_embeds' are stored as they are.
    """
    cache_dir = Path(cache_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            cache_dir / "cache.json",
            {"format": CACHE_FORMAT, "fingerprint": identity_fingerprint(identity), "identity": identity,
             "complete": False, "world_size": world, "num_items": len(dataset)},
        )
    accelerator.wait_for_everyone()

    shard = cache_dir / f"shard_{rank}"
    shard.mkdir(parents=True, exist_ok=True)
    indices = list(range(rank, len(dataset), world))
    # the iterator's worker seed from its own generator: drawn from the global one, which training's dropout draws
    # from, it made a run that builds the cache train otherwise than one that finds it built, or one from images
    loader = DataLoader(_Indexed(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    device = accelerator.device
    views = 2 if flip else 1
    moments = None
    rows, tokens = 0, 0
    index_out: list[np.ndarray] = []
    label_out: list[np.ndarray] = []
    offsets = [0]
    captions_seen: dict[str, np.ndarray] = {}  # caption -> its real tokens' states: each distinct caption encoded once
    text_file = open(shard / "text.f32", "wb") if conditioning == "text" else None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(loader), desc="caching latents", disable=not (progress and accelerator.is_main_process))
    try:
        for batch in loader:
            bar.update(1)
            if "image" not in batch:  # every image of the batch was unreadable
                continue
            images = batch["image"].to(device)  # (B, 3, H, W)
            per_view = [vae.latent_moments(images)]
            if flip:
                per_view.append(vae.latent_moments(images.flip(-1)))
            # (B, V, 2, C, h, w)
            m = torch.stack([torch.stack([mean, std], 1) for mean, std in per_view], 1).float().cpu().numpy()
            if moments is None:
                moments = np.lib.format.open_memmap(
                    shard / "moments.npy", mode="w+", dtype=np.float32, shape=(len(indices), views, *m.shape[2:])
                )
            b = m.shape[0]
            moments[rows : rows + b] = m
            rows += b
            index_out.append(batch["index"].numpy())
            if conditioning == "class":
                label_out.append(batch["label"].numpy())
            if conditioning == "text":
                for real in _batch_text(batch, encode_text, captions_seen):  # (L_i, D) real tokens only
                    text_file.write(real.tobytes())
                    tokens += real.shape[0]
                    offsets.append(tokens)
                    text_dim = real.shape[-1]
    finally:
        bar.close()
        if text_file is not None:
            text_file.close()
    if moments is not None:
        moments.flush()
        del moments
    np.save(shard / "index.npy", np.concatenate(index_out) if index_out else np.zeros(0, np.int64))
    if conditioning == "class":
        np.save(shard / "labels.npy", np.concatenate(label_out) if label_out else np.zeros(0, np.int64))
    if conditioning == "text":
        np.save(shard / "text_offsets.npy", np.asarray(offsets, dtype=np.int64))
    info = {"rows": rows, "tokens": tokens}
    if conditioning == "text" and rows:
        info["text_dim"] = int(text_dim)
    _write_json(shard / "shard.json", info)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = _read_json(cache_dir / "cache.json")
        meta["complete"] = True
        _write_json(cache_dir / "cache.json", meta)
        logger.info("latent cache written to %s", cache_dir)
    accelerator.wait_for_everyone()


def _real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """(B, L, D) states and (B, L) mask -> B float32 arrays (L_i, D) of the real tokens."""
    return [h[m.bool()].float().cpu().numpy() for h, m in zip(hidden, mask)]


def _batch_text(batch: dict, encode_text: Optional[TextEncodeFn], seen: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The real tokens' states (L_i, D) of each item: pre-encoded 'text_embeds' as they are, else the captions
    encoded, each distinct caption once (`seen` remembers them across batches)."""
    if "text_embeds" in batch:
        hidden = batch["text_embeds"]
        mask = batch.get("text_embeds_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        return _real_tokens(hidden, mask)
    if encode_text is None:
        raise LatentCacheError("the dataset yields captions but no text encoder was given to the cache")
    captions = list(batch["caption"])
    new = list(dict.fromkeys(c for c in captions if c not in seen))
    if new:
        seen.update(zip(new, _real_tokens(*encode_text(new))))
    return [seen[c] for c in captions]


# ----------------------------------------------------------------------------------------------------- reading


def _num_items(meta: dict, cache_dir: Path) -> int:
    """The length of the dataset the cache was built from. Caches written before cache.json recorded it have it
    in their identity (stage 2 has always put num_items there)."""
    num_items = meta.get("num_items", meta.get("identity", {}).get("num_items"))
    if not isinstance(num_items, int):
        raise LatentCacheError(f"{cache_dir}/cache.json does not say how many items the dataset has; "
                               f"delete {cache_dir} to rebuild the cache")
    return num_items


class LatentCacheDataset(Dataset):
    """A complete cache as a dataset, in dataset order: items {'moments': (V, 2, C, h, w)} plus 'label' or
    'text_embeds' (L_i, D), which `collate` pads to the batch and masks as 'text_embeds_mask'.

    It is as long as the dataset it was built from; the item of an unreadable image (never encoded) is None,
    as the image dataset's own item is, so both give the loader the same permutation and the same batches.
    """

    def __init__(self, cache_dir, conditioning: str):
        cache_dir = Path(cache_dir)
        meta = _read_json(cache_dir / "cache.json")
        if meta is None or not meta.get("complete"):
            raise LatentCacheError(f"{cache_dir} holds no complete latent cache")
        self.conditioning = conditioning
        self.shards = []
        self.keys: list[Optional[tuple[int, int]]] = [None] * _num_items(meta, cache_dir)  # (shard, row) per index
        for s in range(meta["world_size"]):
            d = cache_dir / f"shard_{s}"
            info = _read_json(d / "shard.json")
            if info is None:
                raise LatentCacheError(f"{d} is missing: the cache is incomplete; delete {cache_dir} to rebuild it")
            shard = {"rows": info["rows"]}
            if info["rows"]:
                shard["moments"] = np.load(d / "moments.npy", mmap_mode="r", allow_pickle=False)
            if conditioning == "class":
                shard["labels"] = np.load(d / "labels.npy", allow_pickle=False)
            if conditioning == "text" and info["rows"]:
                shard["offsets"] = np.load(d / "text_offsets.npy", allow_pickle=False)
                shard["text"] = np.memmap(d / "text.f32", dtype=np.float32, mode="r", shape=(info["tokens"], info["text_dim"]))
            index = np.load(d / "index.npy", allow_pickle=False)
            if index.size and not 0 <= index.min() <= index.max() < len(self.keys):
                raise LatentCacheError(f"{d} has rows outside the dataset's {len(self.keys)} items; "
                                       f"delete {cache_dir} to rebuild the cache")
            for r, i in enumerate(index.tolist()):
                self.keys[i] = (s, r)
            self.shards.append(shard)
        self.dataset_indices = [i for i, key in enumerate(self.keys) if key is not None]  # the readable images
        if not self.dataset_indices:
            raise LatentCacheError(f"{cache_dir} holds no images")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> Optional[dict]:
        if self.keys[k] is None:  # an unreadable image: the loader drops and counts it, as it does the image
            return None
        s, r = self.keys[k]
        shard = self.shards[s]
        item = {"moments": torch.from_numpy(np.array(shard["moments"][r]))}  # (V, 2, C, h, w)
        if self.conditioning == "class":
            item["label"] = int(shard["labels"][r])
        if self.conditioning == "text":
            a, b = shard["offsets"][r], shard["offsets"][r + 1]
            item["text_embeds"] = torch.from_numpy(np.array(shard["text"][a:b]))  # (L_i, D)
        return item


def open_or_build_latent_cache(
    accelerator,
    cache_dir,
    dataset: Dataset,
    vae: torch.nn.Module,
    identity: dict,
    flip: bool,
    conditioning: str,
    encode_text: Optional[TextEncodeFn],
    batch_size: int,
    num_workers: int = 0,
) -> LatentCacheDataset:
    """Use the cache in `cache_dir` if it matches `identity`, build it when absent or unfinished; refuse others."""
    complete = check_cache_dir(cache_dir, identity)
    accelerator.wait_for_everyone()
    if not complete:
        build_latent_cache(
            accelerator, cache_dir, dataset, vae, identity, flip, conditioning, encode_text, batch_size, num_workers
        )
    else:
        logger.info("training from the latent cache in %s", cache_dir)
    cache = LatentCacheDataset(cache_dir, conditioning)
    if len(cache.dataset_indices) < len(cache):
        logger.info("the latent cache holds %d of %d images; the unreadable ones are skipped, as from the images",
                    len(cache.dataset_indices), len(cache))
    return cache
