"""Conceptual Captions preparation: img2dataset parquet shards -> a Hugging Face `DatasetDict` on disk.

The steps, each a function below, in the order `prep_cc.py` runs them:

    check_save_path     refuse an existing --path_to_save unless --overwrite (before any work)
    find_shards         every *.parquet below --path_to_data_root (img2dataset's output folder)
    inspect_shards      open each shard's footer: empty (0-row) and unreadable files are set aside and reported,
                        since `datasets` fails on a 0-row parquet file
    load_shards         read the usable shards with `datasets` (caption read as bytes, so invalid UTF-8 never
                        stops the run), over --num_cpu_workers processes
    process_rows        per row, in batches of --cpu_batch_size over --num_cpu_workers processes: keep
                        status == "success", fully decode the image bytes (optionally shrink to --img_size),
                        clean the caption, tokenise it (max 77 tokens, truncation); every dropped row gets a reason
    count_rows          rows in, rows kept, rows per drop reason
    encode_captions     (--pre_encode_text) the frozen text encoder's hidden states per kept caption, without
                        padding, in batches of --gpu_batch_size on every visible GPU (one process each) or on
                        the CPU, in --dtype
    keep_rows           the kept rows, without the bookkeeping columns
    split_rows          a `train` split, and a `validation` split of about --val_fraction of the rows when asked
                        (chosen by a hash of each row's key, so a row keeps its split when others come or go)
    staging / publish   everything is written into a hidden staging folder next to --path_to_save and renamed
                        into place only when complete; the staging folder (with the `datasets` caches) is removed,
                        and one left by a killed run is removed by the next run (check_save_path)

Output columns (train and validation):

    image        datasets.Image, the validated image bytes (img2dataset's JPEG, re-encoded only when resized)
    caption      str, cleaned
    input_ids    list[int32], the tokenised caption without padding (BOS ... EOS, at most 77 tokens)
    url, key     str, img2dataset's source URL and sample key (when the shards have them)
    text_embeds  (L_i, D) float32 (float16 with --dtype float16), only with --pre_encode_text: the text encoder's
                 last hidden states for the caption's L_i real tokens; padded per batch by the loader
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import unicodedata
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from .conceptual_captions import PREP_INFO
from .transforms import IMAGE_ERRORS, to_rgb

logger = logging.getLogger(__name__)

# img2dataset's parquet columns that prep reads (others, e.g. exif and sha256, are left behind)
REQUIRED_COLUMNS = ("status", "caption")
IMAGE_COLUMNS = ("jpg", "webp", "png")  # the image bytes: img2dataset names the column after its --encode_format
OPTIONAL_COLUMNS = ("url", "key")
SUCCESS = "success"

# drop reasons (a row that was not downloaded is dropped as "status:<img2dataset status>")
MISSING_IMAGE = "no image bytes"
UNDECODABLE_IMAGE = "image bytes do not decode"
EMPTY_CAPTION = "empty caption"
# kept rows whose caption needed repair
CAPTION_NOT_UTF8 = "caption not valid UTF-8 (undecodable bytes removed)"

# columns that only carry bookkeeping from process_rows to count_rows
_REASON, _NOTE = "_drop_reason", "_note"


class PrepError(RuntimeError):
    """prep_cc.py cannot continue (output exists, no usable shards, no rows left, model missing)."""


# ------------------------------------------------------------------------------------------------------------
# Output folder
# ------------------------------------------------------------------------------------------------------------


def check_save_path(path, overwrite: bool) -> Path:
    """Refuse to write over an existing --path_to_save unless `overwrite` (checked before any work starts), once
    the staging folders of earlier, killed runs into it are cleared (clear_stale_staging)."""
    path = Path(path)
    clear_stale_staging(path)
    if path.exists() and not overwrite:
        raise PrepError(
            f"{path} already exists; prep_cc.py never overwrites a prepared dataset. "
            "Choose another --path_to_save, or pass --overwrite to replace it (it is replaced only once the new "
            "dataset is complete)."
        )
    if path.exists() and not path.is_dir():
        raise PrepError(f"{path} exists and is not a folder; remove it or choose another --path_to_save")
    return path


STAGING_OWNER = "owner.json"  # {"pid", "host"} of the run that made a staging folder
_PREVIOUS = "previous"  # publish moves the dataset it replaces here, just before renaming the new one into place


def _staging_folders(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.staging-*"))


def _owner_running(stage: Path) -> Optional[dict]:
    """The owner of a staging folder while its process may still run (always, for another host); else None."""
    try:
        owner = json.loads((stage / STAGING_OWNER).read_text())
    except (OSError, ValueError):
        return None
    if owner.get("host") != socket.gethostname():
        return owner
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's live process
        pass
    return owner


def _restore_previous(stage: Path, path: Path) -> None:
    """Put back the dataset publish had set aside when the run stopped before the new one took its place."""
    previous = stage / _PREVIOUS
    if previous.is_dir() and not path.exists():
        previous.rename(path)
        logger.warning("restored %s, which an interrupted --overwrite run had set aside", path)


def clear_stale_staging(path: Path) -> None:
    """Remove the staging folders (and `datasets` caches, as large as the data) that runs into `path` killed by
    SIGKILL, the OOM killer or a power cut could not remove; stop if one's run is still going."""
    for stage in _staging_folders(path):
        owner = _owner_running(stage)
        if owner is not None:
            raise PrepError(
                f"{stage} belongs to a prep_cc.py run into {path} that may still be going (pid {owner.get('pid')} "
                f"on {owner.get('host')}); wait for it, or remove that folder if the run is gone"
            )
        _restore_previous(stage, path)
        logger.warning("removing %s, left by an interrupted prep_cc.py run", stage)
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A hidden folder next to `path` (same file system, so the final rename is atomic), removed on exit. It names
    its owner, so a later run can tell a folder left by a killed run from one still in use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        (stage / STAGING_OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield stage
    finally:
        _restore_previous(stage, path)
        shutil.rmtree(stage, ignore_errors=True)


def publish(dataset: datasets.DatasetDict, stage: Path, path: Path, info: Optional[dict] = None) -> None:
    """`save_to_disk` into the staging folder, with `info` (the run's settings) as prep_info.json beside it, then
    rename into `path` (an existing `path` is replaced last).

    Saving is one sequential write per split (disk-bound; worker processes only add start-up time here).
    """
    built = stage / "dataset"
    dataset.save_to_disk(str(built))
    (built / PREP_INFO).write_text(json.dumps(info or {}, indent=2))
    if path.exists():  # only reachable with --overwrite (check_save_path)
        old = stage / _PREVIOUS
        path.rename(old)
        built.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(path)


# ------------------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ShardSurvey:
    usable: list[Path] = field(default_factory=list)
    rows: int = 0  # rows in the usable shards
    empty: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (shard, why)
    columns: tuple[str, ...] = ()  # the optional columns present in every usable shard
    image_column: Optional[str] = None  # one of IMAGE_COLUMNS, the same in every usable shard


def find_shards(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise PrepError(f"--path_to_data_root {root} is not a folder (expected img2dataset's --output_folder)")
    shards = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not shards:
        raise PrepError(
            f"no .parquet shards in {root}: run img2dataset with --output_format parquet into this folder first"
        )
    return shards


def inspect_shards(shards: list[Path]) -> ShardSurvey:
    """Read each shard's footer. 0-row shards and files that are not readable img2dataset parquet are set aside."""
    survey = ShardSurvey()
    optional = set(OPTIONAL_COLUMNS)
    for shard in shards:
        try:
            meta = pq.ParquetFile(shard)
            names = set(meta.schema_arrow.names)
            num_rows = meta.metadata.num_rows
        except Exception as err:  # pyarrow raises several types for a truncated or non-parquet file
            survey.unreadable.append((shard, f"{type(err).__name__}: {err}"))
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
        if missing or image_column is None:
            missing += [] if image_column else ["/".join(IMAGE_COLUMNS)]
            survey.unreadable.append((shard, f"missing column(s) {missing}; is this img2dataset parquet output?"))
        elif num_rows == 0:
            survey.empty.append(shard)
        elif survey.image_column not in (None, image_column):
            survey.unreadable.append((shard, f"its images are in column '{image_column}', the other shards' in "
                                             f"'{survey.image_column}' (img2dataset runs with other --encode_format "
                                             "in one folder): prepare each run's folder on its own"))
        else:
            survey.image_column = image_column
            survey.usable.append(shard)
            survey.rows += num_rows
            optional &= names
    survey.columns = tuple(c for c in OPTIONAL_COLUMNS if c in optional)
    return survey


def require_rows(survey: ShardSurvey) -> ShardSurvey:
    if not survey.usable:
        raise PrepError(
            f"none of the shards has rows: nothing to prepare ({len(survey.empty)} empty, "
            f"{len(survey.unreadable)} unreadable: " + "; ".join(f"{p}: {why}" for p, why in survey.unreadable) + ")"
        )
    return survey


def load_shards(survey: ShardSurvey, cache_dir: Path, num_proc: Optional[int]) -> datasets.Dataset:
    """The usable shards as one `datasets.Dataset` (only the columns prep needs; caption as raw bytes; the image
    bytes in column "jpg" whatever their format)."""
    require_rows(survey)
    features = datasets.Features(
        {
            "caption": datasets.Value("binary"),  # decoded by clean_caption, so bad UTF-8 is repaired, not fatal
            survey.image_column: datasets.Value("binary"),
            "status": datasets.Value("string"),
            **{name: datasets.Value("string") for name in survey.columns},
        }
    )
    loaded = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in survey.usable],
        split="train",
        columns=list(features),
        features=features,
        cache_dir=str(cache_dir),
        num_proc=_num_proc(num_proc, len(survey.usable)),
    )
    return loaded if survey.image_column == "jpg" else loaded.rename_column(survey.image_column, "jpg")


# ------------------------------------------------------------------------------------------------------------
# Rows: status, image, caption, tokens
# ------------------------------------------------------------------------------------------------------------


_CAPTION_CHAR = {"Cc": " ", "Zl": " ", "Zp": " ", "Cf": ""}  # Unicode category -> replacement


def clean_caption(raw) -> tuple[str, bool]:
    """Caption bytes (or str, or None) -> (clean text, whether undecodable bytes were removed).

    Invalid UTF-8 bytes are dropped (the valid characters around them are kept); text is NFC-normalised,
    control characters and line/paragraph separators become spaces, invisible format characters (zero-width
    space, soft hyphen, BOM) are removed, runs of whitespace collapse to one space, and the ends are stripped.
    """
    repaired = False
    if raw is None:
        text = ""
    elif isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            text = bytes(raw).decode("utf-8", errors="replace").replace("\ufffd", " ")
            repaired = True
    else:
        text = str(raw)
    text = unicodedata.normalize("NFC", text)
    text = "".join(_CAPTION_CHAR.get(unicodedata.category(ch), ch) for ch in text)
    return " ".join(text.split()), repaired


def validate_image(data: Optional[bytes], img_size: Optional[int]) -> tuple[Optional[bytes], str]:
    """Fully decode image bytes. Returns (bytes to store, "") or (None, drop reason).

    With `img_size`, an image whose shorter side is larger is shrunk (aspect kept, bicubic) so that side equals
    `img_size` and re-encoded as JPEG (quality 95); otherwise the original bytes are stored unchanged.
    """
    if not data:
        return None, MISSING_IMAGE
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: truncated or corrupt data raises here
            width, height = img.size
            if width < 1 or height < 1:
                return None, UNDECODABLE_IMAGE
            if img_size is None or min(width, height) <= img_size:
                return bytes(data), ""
            upright = to_rgb(img)  # turned by its EXIF orientation: width and height may swap
            width, height = upright.size
            scale = img_size / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = upright.resize(size, Image.Resampling.BICUBIC)
    except IMAGE_ERRORS:
        return None, UNDECODABLE_IMAGE
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=95)
    return out.getvalue(), ""


@dataclass
class TextSpec:
    """What prep needs from the text encoder: its tokenizer, token limit and hidden width."""

    tokenizer: object
    max_length: int
    width: int


def load_text_spec(name_or_path: str, cache_dir: Optional[str]) -> TextSpec:
    """Load the text encoder once, offline (src/models/text_encoder.py), so prep tokenises exactly as training does."""
    from ..models.text_encoder import TextEncoder

    try:
        encoder = TextEncoder(name_or_path, cache_dir=cache_dir)
    except FileNotFoundError as err:
        raise PrepError(str(err)) from err
    return TextSpec(encoder.tokenizer, encoder.max_length, encoder.hidden_size)


class RowProcessor:
    """`datasets.map` function (batched): one output row per input row, with a drop reason ("" when kept)."""

    def __init__(self, text: TextSpec, img_size: Optional[int], columns: tuple[str, ...]):
        self.tokenizer = text.tokenizer
        self.max_length = text.max_length
        self.img_size = img_size
        self.columns = columns

    def __call__(self, batch: dict) -> dict:
        n = len(batch["status"])
        out = {"image": [None] * n, "caption": [""] * n, "input_ids": [[] for _ in range(n)]}
        reasons, notes = [""] * n, [""] * n
        for i in range(n):
            status = batch["status"][i]
            if status != SUCCESS:
                reasons[i] = f"status:{status}"
                continue
            caption, repaired = clean_caption(batch["caption"][i])
            if not caption:
                reasons[i] = EMPTY_CAPTION
                continue
            image, reason = validate_image(batch["jpg"][i], self.img_size)
            if image is None:
                reasons[i] = reason
                continue
            out["image"][i] = {"bytes": image, "path": None}
            out["caption"][i] = caption
            notes[i] = CAPTION_NOT_UTF8 if repaired else ""
        kept = [i for i in range(n) if not reasons[i]]
        if kept:
            ids = self.tokenizer(
                [out["caption"][i] for i in kept], truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, row_ids in zip(kept, ids):
                out["input_ids"][i] = row_ids
        for name in self.columns:
            out[name] = batch[name]
        out[_REASON] = reasons
        out[_NOTE] = notes
        return out


def output_features(columns: tuple[str, ...]) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            **{name: datasets.Value("string") for name in columns},
            _REASON: datasets.Value("string"),
            _NOTE: datasets.Value("string"),
        }
    )


def process_rows(
    raw: datasets.Dataset,
    text: TextSpec,
    img_size: Optional[int],
    columns: tuple[str, ...],
    batch_size: int,
    num_proc: Optional[int],
) -> datasets.Dataset:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the map forks worker processes
    return raw.map(
        RowProcessor(text, img_size, columns),
        batched=True,
        batch_size=batch_size,
        num_proc=_num_proc(num_proc, len(raw)),
        remove_columns=raw.column_names,
        features=output_features(columns),
        new_fingerprint=f"cc-prep-rows-{uuid.uuid4().hex}",  # caches live in a fresh staging folder anyway
        desc="decoding images, cleaning and tokenising captions",
    )


@dataclass
class RowCounts:
    rows_in: int
    rows_kept: int
    dropped: Counter  # reason -> rows
    notes: Counter  # note -> kept rows
    empty_shards: list[Path] = field(default_factory=list)
    unreadable_shards: list[tuple[Path, str]] = field(default_factory=list)


def count_rows(processed: datasets.Dataset, survey: ShardSurvey) -> RowCounts:
    reasons = Counter(processed[_REASON])
    notes = Counter(n for n in processed[_NOTE] if n)
    kept = reasons.pop("", 0)
    return RowCounts(
        rows_in=len(processed),
        rows_kept=kept,
        dropped=reasons,
        notes=notes,
        empty_shards=list(survey.empty),
        unreadable_shards=list(survey.unreadable),
    )


def keep_rows(processed: datasets.Dataset, num_proc: Optional[int]) -> datasets.Dataset:
    kept = processed.filter(
        lambda reasons: [not r for r in reasons],
        input_columns=[_REASON],
        batched=True,
        batch_size=10_000,
        num_proc=_num_proc(num_proc, len(processed)),
        desc="keeping rows",
    )
    if len(kept) == 0:
        raise PrepError("no row survived (every row was dropped; see the reasons above)")
    return kept.remove_columns([_REASON, _NOTE])


# ------------------------------------------------------------------------------------------------------------
# Optional: frozen text-encoder hidden states per caption
# ------------------------------------------------------------------------------------------------------------

STORAGE_DTYPE = {"float32": "float32", "bfloat16": "float32", "float16": "float16"}  # arrow has no bfloat16


class CaptionEncoder:
    """`datasets.map` function (batched, with_rank): loads the text encoder once per process, on GPU `rank`
    when GPUs are visible, else the CPU, and returns each kept caption's hidden states for its real tokens only
    (a dropped row gets an empty (0, D) array; it is filtered out afterwards)."""

    def __init__(self, name_or_path: str, cache_dir: Optional[str], dtype: str, width: int):
        self.name_or_path = name_or_path
        self.cache_dir = cache_dir
        self.dtype = dtype
        self.width = width
        self.encoder = None
        self.device = None

    def _load(self, rank: Optional[int]) -> None:
        import torch

        from ..models.text_encoder import TextEncoder

        self.device = torch.device(f"cuda:{rank or 0}") if torch.cuda.is_available() else torch.device("cpu")
        encoder = TextEncoder(self.name_or_path, cache_dir=self.cache_dir)
        self.encoder = encoder.to(device=self.device, dtype=getattr(torch, self.dtype)).eval()

    def __call__(self, captions: list[str], reasons: list[str], rank: Optional[int] = None) -> dict:
        import torch

        storage = STORAGE_DTYPE[self.dtype]
        out = [np.zeros((0, self.width), dtype=storage) for _ in captions]
        kept = [i for i, reason in enumerate(reasons) if not reason]
        if not kept:
            return {"text_embeds": out}
        if self.encoder is None:
            self._load(rank)
        tokens = self.encoder.tokenize([captions[i] for i in kept])
        with torch.inference_mode():
            hidden, mask = self.encoder.encode_tokens(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )  # (B, L, D), (B, L)
        if hidden.shape[-1] != self.width:
            raise PrepError(f"text encoder returned width {hidden.shape[-1]}, its config says {self.width}")
        hidden = hidden.float().cpu().numpy().astype(storage)
        real = mask.bool().cpu().numpy()  # (B, L): wherever the tokenizer pads (its padding_side), as stage 2 masks
        for row, i in enumerate(kept):
            out[i] = hidden[row, real[row]]  # (L_i, D)
        return {"text_embeds": out}


def count_gpus() -> int:
    """Visible GPUs, counted through NVML: torch.cuda.is_available() initialises the CUDA driver (cudaGetDeviceCount),
    after which the caption encoders that datasets.map forks, one per GPU, could not use CUDA."""
    import torch

    return torch.cuda.device_count()  # NVML while CUDA is uninitialised; 0 on a CPU-only build


def encode_captions(
    processed: datasets.Dataset,
    name_or_path: str,
    cache_dir: Optional[str],
    width: int,
    batch_size: int,
    dtype: str,
) -> datasets.Dataset:
    """Add `text_embeds` (L_i, D) to every kept row: batches of `batch_size`, one process per visible GPU.

    Runs before `keep_rows`, on the caption column alone, so the image bytes are not copied again.
    """
    gpus = count_gpus()
    where = f"{gpus} GPU(s)" if gpus else "CPU"
    logger.info("encoding captions on %s in %s", where, dtype)
    embeds = processed.select_columns(["caption", _REASON]).map(
        CaptionEncoder(name_or_path, cache_dir, dtype, width),
        batched=True,
        batch_size=batch_size,
        with_rank=True,
        input_columns=["caption", _REASON],
        num_proc=gpus if gpus > 1 else None,
        remove_columns=["caption", _REASON],
        features=datasets.Features({"text_embeds": datasets.Array2D(shape=(None, width), dtype=STORAGE_DTYPE[dtype])}),
        new_fingerprint=f"cc-prep-text-{uuid.uuid4().hex}",
        desc=f"encoding captions ({where}, {dtype})",
    )
    return datasets.concatenate_datasets([processed, embeds], axis=1)


# ------------------------------------------------------------------------------------------------------------
# Splits and report
# ------------------------------------------------------------------------------------------------------------


SPLIT_ID_COLUMNS = ("key", "url")  # a row's split follows a hash of the first of these the shards have


def validation_share(row_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the row's id and the seed: the row is held out when it is below --val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_rows(kept: datasets.Dataset, val_fraction: float, seed: int = 0) -> datasets.DatasetDict:
    """{'train'} or, with 0 < val_fraction < 1, {'train', 'validation'}: a row is held out when the hash of its
    img2dataset key (its TSV row number; the URL without keys), salted with `seed`, falls below `val_fraction`. A
    row's split thus depends on that row alone, so rows kept or dropped differently (a re-download, an unreadable
    shard) move no other row between splits. Each split keeps at least one row."""
    if not 0.0 <= val_fraction < 1.0:
        raise PrepError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return datasets.DatasetDict({"train": kept})
    if len(kept) < 2:
        logger.warning("only %d row kept: no validation split", len(kept))
        return datasets.DatasetDict({"train": kept})
    column = next((c for c in SPLIT_ID_COLUMNS if c in kept.column_names), None)
    if column is None:
        raise PrepError("--val_fraction needs a 'url' or 'key' column in the shards (img2dataset writes both)")
    shares = np.array([validation_share(str(row_id), seed) for row_id in kept[column]])  # (N,)
    held = shares < val_fraction
    if not held.any():  # a small dataset: hold out the row a larger fraction would take first
        held[shares.argmin()] = True
    if held.all():
        held[shares.argmax()] = False
    return datasets.DatasetDict(
        {"train": kept.select(np.flatnonzero(~held)), "validation": kept.select(np.flatnonzero(held))}
    )


def format_report(counts: RowCounts) -> str:
    lines = [
        "Conceptual Captions preparation",
        f"  rows in:   {counts.rows_in}",
        f"  rows kept: {counts.rows_kept}" + (f"  ({counts.rows_kept / counts.rows_in:.1%})" if counts.rows_in else ""),
        f"  rows dropped: {sum(counts.dropped.values())}",
    ]
    for reason, n in sorted(counts.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {n:>10}  {reason}")
    for note, n in sorted(counts.notes.items()):
        lines.append(f"  kept with repair: {n} x {note}")
    if counts.empty_shards:
        lines.append(f"  empty shards skipped: {len(counts.empty_shards)}")
        lines += [f"    {p}" for p in counts.empty_shards]
    if counts.unreadable_shards:
        lines.append(f"  unreadable shards skipped (their rows are not counted above): {len(counts.unreadable_shards)}")
        lines += [f"    {p}: {why}" for p, why in counts.unreadable_shards]
    return "\n".join(lines)


def _num_proc(num_proc: Optional[int], num_items: int) -> Optional[int]:
    """datasets wants None (not 1) for in-process work and no more processes than items."""
    if not num_proc or num_proc <= 1 or num_items <= 1:
        return None
    return min(num_proc, num_items)
