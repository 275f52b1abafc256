"""Conceptual Captions, end to end: TSV -> real img2dataset (loopback HTTP) -> prep_cc.py -> dataset -> trainers.

The HTTP server listens on 127.0.0.1 only, serves files the test generates (JPEGs, PNGs, a non-image body and a
truncated JPEG; some URLs are dead) and is shut down when the module's tests end.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from src.config import Stage1TrainConfig, Stage2TrainConfig
from src.data import build_dataset
from src.data.cc_prep import clean_caption, split_rows, validation_share
from src.data.loader import collate
from src.models.text_encoder import TextEncoder
from tests.helpers import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
IMG2DATASET = str(Path(sys.executable).with_name("img2dataset"))

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 230), "yellow": (245, 225, 40)}
SHAPES = ["circle", "square"]

# rows of the TSV whose download must fail or whose caption must be dropped (name -> why)
DEAD = ["gone1.jpg", "gone2.png", "gone3.jpg"]
NOT_AN_IMAGE = "page.jpg"  # an HTML body served as image/jpeg
TRUNCATED = "truncated.jpg"  # the first half of a JPEG
INVALID_UTF8 = b"a green square \xff\xfe on a red background"
INVALID_UTF8_CLEAN = "a green square on a red background"
STAGE_TIMEOUT = 300


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: generated images, loopback server, TSV, img2dataset, prep_cc.py
# ----------------------------------------------------------------------------------------------------------------


def _draw(colour: str, shape: str, background: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    img = Image.new("RGB", size, COLOURS[background])
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img.convert(mode)


def _write_site(www: Path) -> list[tuple[str, bytes]]:
    """Write the served files; return the TSV rows (file name, caption bytes) in order."""
    rows: list[tuple[str, bytes]] = []
    i = 0
    for colour in COLOURS:
        for shape in SHAPES:
            background = [c for c in COLOURS if c != colour][i % 3]
            size = (40 + 4 * i, 36 + 2 * (i % 3))
            if i % 2 == 0:
                name = f"img{i:02d}.jpg"
                _draw(colour, shape, background, size).save(www / name, "JPEG", quality=90)
            else:
                name = f"img{i:02d}.png"
                mode = "RGBA" if i % 4 == 1 else "L" if i == 3 else "RGB"
                _draw(colour, shape, background, size, mode).save(www / name, "PNG")
            caption = f"a {colour} {shape} on a {background} background"
            if i % 3 == 1:  # captions of different token lengths
                caption = f"a picture of a {colour} {shape} over a {background} background"
            elif i % 3 == 2:
                caption = f"{colour} {shape}, {background} background"
            rows.append((name, caption.encode()))
            i += 1
    # captions that need cleaning but are kept
    rows.append(("img00.jpg", INVALID_UTF8))
    rows.append(("img01.png", b"  a  blue   circle on a yellow background  "))
    # captions that are dropped: empty and whitespace-only
    rows.append(("img02.jpg", b""))
    rows.append(("img03.png", b"   "))
    # downloads that fail
    for name in DEAD:
        rows.append((name, b"a dead link"))
    (www / NOT_AN_IMAGE).write_bytes(b"<html><body>not an image</body></html>")
    rows.append((NOT_AN_IMAGE, b"a red circle on a web page"))
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, "JPEG", quality=95)
    (www / TRUNCATED).write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    rows.append((TRUNCATED, b"a truncated picture"))
    return rows


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    """img2dataset's parquet output for the test TSV, plus an empty, an unreadable and a corrupt-bytes shard.

    Returns (folder, {img2dataset key: (file name, caption bytes)}); keys number the TSV rows from 000000000.
    """
    base = tmp_path_factory.mktemp("cc_raw")
    www = base / "www"
    www.mkdir()
    rows = _write_site(www)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        prefix = f"http://127.0.0.1:{server.server_address[1]}/"
        # Google's file layout: no header, caption first. download_cc.sh adds the header img2dataset needs and
        # runs the design's command (img2dataset --input_format tsv --url_col url --caption_col caption
        # --output_format parquet --resize_mode keep_ratio ...), here with a 32 px image size, 1 process, 2 threads
        tsv = base / "Train_GCC-training.tsv"
        with open(tsv, "wb") as f:
            for name, caption in rows:
                f.write(caption + b"\t" + prefix.encode() + name.encode() + b"\n")
        out = base / "raw"
        cmd = ["bash", str(ROOT / "download_cc.sh"), str(tsv), str(out)]
        env = {**os.environ, "IMG2DATASET": IMG2DATASET, "PROCESSES": "1", "THREADS": "2", "IMAGE_SIZE": "32"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=STAGE_TIMEOUT, cwd=base, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (base / "raw.with_header.tsv").read_bytes().startswith(b"caption\turl\n")
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == 1
    table = pq.read_table(shards[0])
    # an empty shard (img2dataset's schema, 0 rows), a truncated file, and a shard whose one "success" row
    # carries bytes that do not decode (img2dataset itself re-encodes, so only a damaged file can hold those)
    pq.write_table(table.slice(0, 0), out / "00001.parquet")
    (out / "00002.parquet").write_bytes(shards[0].read_bytes()[:100])
    good = table.filter(pa.compute.equal(table["status"], "success")).slice(0, 1).to_pylist()[0]
    good.update(key="999999999", url=prefix + "damaged.jpg", caption=b"a damaged picture", jpg=good["jpg"][:60])
    pq.write_table(pa.Table.from_pylist([good], schema=table.schema), out / "00003.parquet")
    return out, {f"{i:09d}": row for i, row in enumerate(rows)}


def run_prep(data_root, save, clip, *extra) -> subprocess.CompletedProcess:
    # the design's prep_cc.py command, with small batches and two workers
    cmd = [
        PY, "prep_cc.py",
        "--path_to_data_root", str(data_root),
        "--path_to_save", str(save),
        "--hf_clip_model_name", str(clip),
        "--hf_cache_dir", str(Path(save).parent / "hf_cache"),
        "--cpu_batch_size", "8",
        "--gpu_batch_size", "4",
        "--num_cpu_workers", "2",
        "--dtype", "float32",
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=STAGE_TIMEOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def prepared(raw_shards, clip_folder, tmp_path_factory):
    out, _ = raw_shards
    save = tmp_path_factory.mktemp("cc_prepared") / "cc"
    result = run_prep(out, save, clip_folder, "--pre_encode_text", "--val_fraction", "0.2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return save, result.stdout


def _report_count(stdout: str, label: str) -> int:
    for line in stdout.splitlines():
        if line.strip().endswith(label) and line.strip().split()[0].isdigit():
            return int(line.split()[0])
        if line.strip().startswith(label):
            return int(line.split(":")[1].split()[0])
    raise AssertionError(f"'{label}' not in prep report:\n{stdout}")


# ----------------------------------------------------------------------------------------------------------------
# prep_cc.py
# ----------------------------------------------------------------------------------------------------------------


def _expected(rows: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """key -> cleaned caption for every TSV row that must survive."""
    broken = set(DEAD) | {NOT_AN_IMAGE, TRUNCATED}
    keep = {}
    for key, (name, caption) in rows.items():
        text = " ".join(caption.decode("utf-8", errors="replace").replace("\ufffd", " ").split())
        if name not in broken and text:
            keep[key] = text
    return keep


def test_prep_keeps_good_rows_with_their_captions(prepared, raw_shards):
    save, stdout = prepared
    _, tsv_rows = raw_shards
    dd = datasets.load_from_disk(str(save))
    assert set(dd) == {"train", "validation"}
    kept = {}
    for split in dd.values():
        for key, url, caption in zip(split["key"], split["url"], split["caption"]):
            assert key not in kept, f"row {key} appears twice"
            assert url.endswith("/" + tsv_rows[key][0])
            kept[key] = caption
    expected = _expected(tsv_rows)
    assert kept == expected
    assert INVALID_UTF8_CLEAN in kept.values()
    assert set(dd["validation"]["key"]) == {k for k in expected if validation_share(k, 0) < 0.2}  # --seed 0
    # the report: rows in (all rows of the readable shards), kept, and why the rest were dropped
    assert _report_count(stdout, "rows in") == len(tsv_rows) + 1  # + the damaged row of the hand-made shard
    assert _report_count(stdout, "rows kept") == len(expected)
    assert _report_count(stdout, "status:failed_to_download") == len(DEAD)
    assert _report_count(stdout, "status:failed_to_resize") == 2  # the HTML body and the truncated JPEG
    assert _report_count(stdout, "empty caption") == 2
    assert _report_count(stdout, "image bytes do not decode") == 1
    assert "kept with repair: 1 x caption not valid UTF-8" in stdout
    assert "empty shards skipped: 1" in stdout and "00001.parquet" in stdout
    assert "unreadable shards skipped" in stdout and "00002.parquet" in stdout
    # nothing is left behind next to the result
    assert sorted(p.name for p in save.parent.iterdir()) == ["cc"]


def test_prep_stores_decodable_images_and_tokens(prepared, clip_folder):
    save, _ = prepared
    train = datasets.load_from_disk(str(save))["train"]
    tokenizer = TextEncoder(str(clip_folder)).tokenizer
    for row in train:
        img = row["image"]  # decoded by datasets.Image
        assert min(img.size) == 32  # img2dataset's keep_ratio: shorter side = --image_size
        img.load()
        ids = tokenizer(row["caption"], truncation=True, max_length=77)["input_ids"]
        assert row["input_ids"] == ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_pre_encoded_embeddings_equal_on_the_fly_encoding(prepared, clip_folder):
    save, _ = prepared
    train = datasets.load_from_disk(str(save))["train"].with_format("numpy", columns=["text_embeds"])
    captions = datasets.load_from_disk(str(save))["train"]["caption"]
    encoder = TextEncoder(str(clip_folder))
    hidden, mask = encoder.encode(list(captions))  # (B, 77, D), (B, 77): what stage 2 computes on the fly
    for i, caption in enumerate(captions):
        stored = torch.from_numpy(train[i]["text_embeds"])  # (L_i, D)
        length = int(mask[i].sum())
        assert stored.shape == (length, encoder.hidden_size)
        torch.testing.assert_close(stored, hidden[i, :length], rtol=0, atol=1e-6)


def test_pre_encoding_stores_the_real_tokens_of_a_left_padding_tokenizer(tmp_path):
    """A tokenizer whose config says padding_side: left puts the padding first: prep must store the states at the
    real tokens (the mask's ones, what stage 2 attends to on the fly), not the first L_i positions."""
    from src.data.cc_prep import CaptionEncoder

    folder = make_tiny_clip(tmp_path / "clip_left")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    captions = ["a red circle", "a small blue square on a green background"]
    encoder = TextEncoder(str(folder))
    assert encoder.tokenizer.padding_side == "left"
    hidden, mask = encoder.encode(captions)  # (2, 77, D), (2, 77): padding first
    stored = CaptionEncoder(str(folder), None, "float32", encoder.hidden_size)(captions, ["", ""])["text_embeds"]
    for i in range(len(captions)):
        torch.testing.assert_close(torch.from_numpy(stored[i]), hidden[i][mask[i].bool()], rtol=0, atol=1e-6)


def test_pre_encoded_text_of_another_text_model_is_refused(prepared, clip_folder):
    """Embeddings pre-encoded with one text model and a UNet whose prompts will be encoded by another (at sampling)
    train a model no prompt can drive: prep_info.json names the prep's model and stage 2 compares, beyond the width."""
    from src.data.conceptual_captions import ConceptualCaptionsDataset
    from src.training.stage2 import Stage2SetupError, check_text_source
    from tests.stage2_helpers import tiny_unet

    save, _ = prepared
    info = json.loads((save / "prep_info.json").read_text())
    assert info["text_model"] == str(clip_folder) and info["pre_encoded_text"] is True
    dataset = ConceptualCaptionsDataset(save, 16, text_embeds=True)
    check_text_source(dataset, True, tiny_unet(str(clip_folder)))  # the prep's own model
    other = tiny_unet("openai/clip-vit-large-patch14")  # the same width as the tiny CLIP, another model
    with pytest.raises(Stage2SetupError, match=f"pre-encoded with '{clip_folder}'.*'openai/clip-vit-large-patch14'"):
        check_text_source(dataset, True, other)


def _prep_argv(data_root, save, clip, *extra) -> list[str]:
    return [
        "--path_to_data_root", str(data_root), "--path_to_save", str(save), "--hf_clip_model_name", str(clip),
        "--cpu_batch_size", "8", "--num_cpu_workers", "2", *extra,
    ]  # fmt: skip


def test_prep_refuses_to_overwrite_unless_asked(prepared, raw_shards, clip_folder, tmp_path, capsys):
    import prep_cc  # in this process: the script's own main(), without another interpreter start-up

    out, _ = raw_shards
    save = tmp_path / "cc"
    shutil.copytree(prepared[0], save)
    before = {p.relative_to(save): p.read_bytes() for p in save.rglob("*") if p.is_file()}

    assert prep_cc.main(_prep_argv(out, save, clip_folder)) != 0
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    after = {p.relative_to(save): p.read_bytes() for p in save.rglob("*") if p.is_file()}
    assert after == before

    assert prep_cc.main(_prep_argv(out, save, clip_folder, "--overwrite")) == 0
    dd = datasets.load_from_disk(str(save))
    assert set(dd) == {"train"}  # the new run asked for no validation split and no embeddings
    assert "text_embeds" not in dd["train"].column_names
    assert len(dd["train"]) == _report_count(prepared[1], "rows kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cc"]  # no staging folder or old copy left


def test_prep_with_only_empty_shards_fails_clearly_and_writes_nothing(raw_shards, clip_folder, tmp_path, capsys):
    import prep_cc

    out, _ = raw_shards
    only_empty = tmp_path / "raw"
    only_empty.mkdir()
    shutil.copy(out / "00001.parquet", only_empty / "00000.parquet")
    assert prep_cc.main(_prep_argv(only_empty, tmp_path / "cc", clip_folder)) != 0
    assert "none of the shards has rows" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_prep_reads_webp_or_png_shards_and_sets_aside_a_shard_of_another_format(raw_shards, clip_folder, tmp_path,
                                                                                  capsys):
    """img2dataset names the image column after --encode_format (jpg, webp, png); prep took only "jpg". Shards of
    two formats in one folder cannot be loaded as one table: the odd one is set aside, named."""
    import prep_cc

    out, _ = raw_shards
    table = pq.read_table(out / "00000.parquet")
    webp = tmp_path / "raw"
    webp.mkdir()
    def as_webp(data):
        try:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, "WEBP")
            return buf.getvalue()
        except Exception:  # the rows without bytes and the broken ones stay as they were
            return data

    images = pa.array([as_webp(b) if b else b for b in table["jpg"].to_pylist()], pa.binary())
    pq.write_table(table.set_column(table.column_names.index("jpg"), "webp", images), webp / "00000.parquet")
    pq.write_table(table, webp / "00001.parquet")  # jpg: another img2dataset run
    assert prep_cc.main(_prep_argv(webp, tmp_path / "cc", clip_folder, "--num_cpu_workers", "1")) == 0
    report = capsys.readouterr().out
    assert "00001.parquet: its images are in column 'jpg', the other shards' in 'webp'" in report
    cc = datasets.load_from_disk(str(tmp_path / "cc" / "train"))
    assert len(cc) == int(table.filter(pa.compute.equal(table["status"], "success")).num_rows) - 2  # 2 undecodable
    assert cc[0]["image"].format == "WEBP"


def test_prep_stopped_by_sigterm_removes_its_staging_folder(raw_shards, clip_folder, tmp_path):
    """kill, timeout and schedulers send SIGTERM, which ends Python without running `finally`: prep turns it into
    an exit, so the staging folder (with the datasets caches) goes as on Ctrl-C, and the signal's handler is put
    back afterwards. The signal arrives while rows are processed, inside the staging folder."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import prep_cc
from src.data import cc_prep
def killed_while_processing(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
cc_prep.process_rows = killed_while_processing
before = signal.getsignal(signal.SIGTERM)
try:
    prep_cc.main({_prep_argv(raw_shards[0], tmp_path / "cc", clip_folder)!r})
finally:
    print("handler restored:", signal.getsignal(signal.SIGTERM) is before)
"""
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=STAGE_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-2000:])  # -15: killed mid-prep
    assert "handler restored: True" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # neither a staging folder nor a half-written dataset


def test_staging_folder_of_a_killed_prep_is_cleared_by_the_next_run(raw_shards, clip_folder, tmp_path):
    """SIGKILL (the OOM killer, a scheduler past its grace period) runs no `finally`: the staging folder, with
    `datasets` caches as large as the data, stayed next to --path_to_save and every rerun added another. The next
    run removes it, refuses while its owner still runs, and puts back a dataset an --overwrite run had set aside."""
    from src.data import cc_prep

    save = tmp_path / "out" / "cc"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import prep_cc
from src.data import cc_prep
def killed_while_processing(raw, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
cc_prep.process_rows = killed_while_processing
prep_cc.main({_prep_argv(raw_shards[0], save, clip_folder, "--num_cpu_workers", "1")!r})
"""
    log = tmp_path / "prep.log"  # a file, not a pipe: nothing that outlives the killed process can hold it open
    with open(log, "w") as out:
        proc = subprocess.run([PY, "-c", script], stdout=out, stderr=out, timeout=STAGE_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    (left,) = save.parent.iterdir()
    assert left.name.startswith(".cc.staging-") and (left / "cache").is_dir()
    assert cc_prep.check_save_path(save, overwrite=False) == save  # what prep_cc.py does first
    assert list(save.parent.iterdir()) == []

    with cc_prep.staging(save) as stage:  # a run still going: refused, its folder untouched
        with pytest.raises(cc_prep.PrepError, match="may still be going"):
            cc_prep.check_save_path(save, overwrite=True)
        assert stage.is_dir()
        # killed between publish's two renames: the old dataset was set aside, the new one not yet in place
        (stage / "previous").mkdir()
        (stage / "previous" / "dataset_dict.json").write_text("{}")
        (stage / cc_prep.STAGING_OWNER).unlink()  # as if its process were gone
        with pytest.raises(cc_prep.PrepError, match="already exists"):
            cc_prep.check_save_path(save, overwrite=False)
    assert (save / "dataset_dict.json").is_file() and not stage.exists()


def test_the_sigterm_handler_raises_in_prep_and_a_forked_worker_dies_of_a_sigterm_sent_at_once():
    """datasets' pool workers are forked from prep, and a pool stops its workers with SIGTERM, possibly right after
    forking them. A child that inherited prep's Python-level handler lost a signal that came before CPython's
    after-fork set-up (34 of 40 here lived on): it kept the pool's lock and the output pipes, and a full-suite run
    of the SIGTERM test above hung for 300 s. Forked children now get SIGTERM's default action, with the signal
    held pending across the fork; prep itself still raises SystemExit, and the old handler comes back after."""
    import prep_cc

    handler = prep_cc.exit_on_sigterm(os.getpid())
    with pytest.raises(SystemExit) as stop:  # the prep itself: its finally blocks remove the staging folder
        handler(signal.SIGTERM, None)
    assert stop.value.code == 128 + signal.SIGTERM
    before = signal.getsignal(signal.SIGTERM)
    survivors = []
    with prep_cc.sigterm_raises():
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # a pool worker that the pool stops at once
                time.sleep(0.5)
                os._exit(7)  # only if the SIGTERM was lost
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            survivors += [] if os.waitstatus_to_exitcode(status) == -signal.SIGTERM else [status]
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # unblocked in prep again
    assert survivors == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_download_reuses_its_header_copy_only_for_the_same_tsv(tmp_path):
    """The header copy sits next to the output folder and outlives it: a copy made from another TSV (a small trial
    file) must be rewritten, or img2dataset would download the trial's rows instead. img2dataset itself is `true`."""
    small, full = tmp_path / "small.tsv", tmp_path / "full.tsv"
    small.write_text("a cat\thttp://x/1\n")
    full.write_text("a cat\thttp://x/1\na dog\thttp://x/2\n")
    env = {**os.environ, "IMG2DATASET": "true"}

    def download(tsv):
        cmd = ["bash", str(ROOT / "download_cc.sh"), str(tsv), str(tmp_path / "raw")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=True).stdout

    copy = tmp_path / "raw.with_header.tsv"
    assert "writing" in download(small) and copy.read_text() == "caption\turl\n" + small.read_text()
    assert "writing" in download(full) and copy.read_text() == "caption\turl\n" + full.read_text()
    assert "writing" not in download(full)  # the same input: the copy is reused


def test_download_into_a_folder_whose_parent_does_not_exist_yet(tmp_path):
    """README's `bash download_cc.sh Train_GCC-training.tsv data/cc_raw` in a fresh checkout: there is no data/
    yet, and the header copy data/cc_raw.with_header.tsv is written before img2dataset (here `true`) runs."""
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a cat\thttp://x/1\n")
    env = {**os.environ, "IMG2DATASET": "true"}
    cmd = ["bash", str(ROOT / "download_cc.sh"), str(tsv), "data/cc_raw"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data/cc_raw.with_header.tsv").read_text() == "caption\turl\n" + tsv.read_text()
    cmd[-1] = "/"  # no output folder name at all: refused, nothing written at the root
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "output folder" in result.stderr


def test_validation_split_keeps_every_row_in_its_split_when_rows_come_and_go():
    """Re-preparing after a re-download (more rows succeed, some die) must not move rows between splits, or a
    model trained on one preparation is evaluated on rows it trained on (a seeded shuffle moved 10 of 40
    validation rows to train when one row was added to 200). Rows sharing a URL share a split."""
    def rows(ids):
        return datasets.Dataset.from_dict({"url": [f"http://x/{i}.jpg" for i in ids], "key": [f"{i:09d}" for i in ids]})

    def held(ids, seed=0):
        return set(split_rows(rows(ids), 0.2, seed)["validation"]["key"])

    before = held(range(200))
    after = held([*range(1, 200), 200, 201])  # row 0 gone, rows 200 and 201 new
    assert 20 <= len(before) <= 60  # about 20 %
    assert before - {f"{0:09d}"} == after - {f"{200:09d}", f"{201:09d}"}
    assert held(range(200), seed=1) != before  # --seed picks another held-out set
    twice = split_rows(rows([*range(50), *range(50)]), 0.2)
    assert not set(twice["train"]["key"]) & set(twice["validation"]["key"])
    assert len(split_rows(rows(range(3)), 0.01)["validation"]) == 1  # a tiny set still gets a validation row
    import prep_cc

    with pytest.raises(SystemExit):  # refused at once, not after the whole preparation
        prep_cc.parse_args(["--path_to_data_root", "r", "--path_to_save", "s", "--val_fraction", "1"])


def test_clean_caption():
    assert clean_caption(INVALID_UTF8) == (INVALID_UTF8_CLEAN, True)
    assert clean_caption("caf\u0065\u0301  au\tlait\n".encode()) == ("caf\u00e9 au lait", False)
    assert clean_caption(b"a\x00b\x1fc") == ("a b c", False)
    assert clean_caption("zero\u200bwidth soft\u00adhyphen\u2028line".encode()) == ("zerowidth softhyphen line", False)
    assert clean_caption(None) == ("", False)
    assert clean_caption(b" \t ") == ("", False)
    assert clean_caption("already text") == ("already text", False)


# ----------------------------------------------------------------------------------------------------------------
# The conceptual_captions dataset
# ----------------------------------------------------------------------------------------------------------------


def test_dataset_items_for_both_stages(prepared):
    save, _ = prepared
    train_len = len(datasets.load_from_disk(str(save))["train"])

    images = build_dataset("conceptual_captions", str(save), 32, Stage1TrainConfig())
    assert len(images) == train_len
    item = images[0]
    assert item["image"].shape == (3, 32, 32)
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert isinstance(item["caption"], str) and item["caption"]

    on_the_fly = build_dataset("conceptual_captions", str(save), 32, Stage2TrainConfig(pre_encoded_text=False))
    assert set(on_the_fly[0]) == {"image", "caption"}

    embedded = build_dataset("conceptual_captions", str(save), 32, Stage2TrainConfig(pre_encoded_text=True))
    items = [embedded[i] for i in range(len(embedded))]
    assert all(set(it) == {"image", "text_embeds"} for it in items)
    lengths = [it["text_embeds"].shape[0] for it in items]
    assert len(set(lengths)) > 1  # captions of different lengths, so the loader must pad
    batch = collate(items)
    assert batch["text_embeds"].shape == (len(items), max(lengths), items[0]["text_embeds"].shape[1])
    assert batch["text_embeds_mask"].sum(dim=1).tolist() == lengths
    torch.testing.assert_close(batch["text_embeds"][0, : lengths[0]], items[0]["text_embeds"])


def test_dataset_skips_an_undecodable_stored_image(prepared, tmp_path):
    save, _ = prepared
    train = datasets.load_from_disk(str(save))["train"].cast_column("image", datasets.Image(decode=False))
    rows = train.select(range(3)).to_list()
    rows[1]["image"] = {"bytes": rows[1]["image"]["bytes"][:40], "path": None}
    damaged = datasets.Dataset.from_list(rows, features=train.features)
    datasets.DatasetDict({"train": damaged}).save_to_disk(str(tmp_path / "damaged"))
    ds = build_dataset("conceptual_captions", str(tmp_path / "damaged"), 32, Stage1TrainConfig())
    items = [ds[i] for i in range(3)]
    assert items[1] is None and items[0] is not None and items[2] is not None
    batch = collate(items)
    assert batch["num_skipped"] == 1 and batch["image"].shape[0] == 2


def test_dataset_without_embeddings_explains_how_to_make_them(prepared, raw_shards, tmp_path):
    save, _ = prepared
    dd = datasets.load_from_disk(str(save))
    datasets.DatasetDict({"train": dd["train"].remove_columns(["text_embeds"])}).save_to_disk(str(tmp_path / "cc"))
    with pytest.raises(ValueError, match="--pre_encode_text"):
        build_dataset("conceptual_captions", str(tmp_path / "cc"), 32, Stage2TrainConfig(pre_encoded_text=True))
    with pytest.raises(ValueError, match="prep_cc.py"):
        build_dataset("conceptual_captions", str(tmp_path / "missing"), 32, Stage1TrainConfig())


# ----------------------------------------------------------------------------------------------------------------
# Both training stages with --dataset conceptual_captions
# ----------------------------------------------------------------------------------------------------------------


def _run_in_process(module_name: str, argv: list[str]) -> None:
    """Run a trainer's main(argv) in this process, with accelerate's process-wide state reset first."""
    import importlib

    from tests.helpers import reset_accelerate

    reset_accelerate()
    importlib.import_module(module_name).main(argv)


def _metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1_on_cc(prepared, tmp_path_factory):
    """A few steps of stage1_vae_trainer.py --dataset conceptual_captions (16 px, channels [8, 16])."""
    import yaml

    save, _ = prepared
    root = tmp_path_factory.mktemp("cc_stage1")
    train = yaml.safe_load((ROOT / "configs/quickstart/stage1_vae_train.yaml").read_text())
    train.update(per_gpu_batch_size=4, lr_warmup_steps=0, learning_rate=2e-3, total_training_iterations=20,
                 checkpoint_iterations=20, val_generation_freq=20, num_val_random_samples=2, disc_start=1000,
                 disc_start_dim=8)
    model = yaml.safe_load((ROOT / "configs/quickstart/ldm.yaml").read_text())
    model["vae"].update(img_size=16, vae_channels_per_block=[8, 16], groupnorm_groups=4)
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    (root / "ldm.yaml").write_text(yaml.safe_dump(model))
    work = root / "work"
    _run_in_process("stage1_vae_trainer", [
        "--experiment_name", "VAETrainer", "--wandb_run_name", "vae_cc",
        "--working_directory", str(work), "--training_config", str(root / "train.yaml"),
        "--model_config", str(root / "ldm.yaml"),
        "--dataset", "conceptual_captions", "--path_to_dataset", str(save),
        "--path_to_save_gens", str(root / "gens"),
    ])  # fmt: skip
    return work, root / "ldm.yaml"


def test_stage1_trains_on_conceptual_captions(stage1_on_cc):
    work, _ = stage1_on_cc
    logged = _metrics(work)
    assert logged[-1]["step"] == 20
    assert logged[-1]["rec_loss"] < logged[0]["rec_loss"]
    assert (work / "model.safetensors").is_file()


def _stage2_run(stage1_on_cc, prepared, clip_folder, root: Path, pre_encoded: bool, steps: int) -> Path:
    from src.config import load_model_config
    from tests.stage2_helpers import tiny_unet, write_model_config, write_train_config

    vae_work, stage1_model = stage1_on_cc
    root.mkdir(parents=True, exist_ok=True)
    model = write_model_config(
        root / "ldm.yaml", tiny_unet(str(clip_folder)), {"conceptual_captions": 1.0},
        vae_cfg=load_model_config(stage1_model).vae,
    )
    train = write_train_config(
        root / "train.yaml", total_training_iterations=steps, checkpoint_iterations=steps,
        per_gpu_batch_size=4, learning_rate=2e-3, pre_encoded_text=pre_encoded, val_generation_freq=steps,
    )
    work = root / "work"
    _run_in_process("stage2_diffusion_trainer", [
        "--experiment_name", "DiffusionTrainer", "--wandb_run_name", "diffusion_cc",
        "--working_directory", str(work), "--training_config", str(train), "--model_config", str(model),
        "--path_to_vae_backbone", str(vae_work / "model.safetensors"),
        "--dataset", "conceptual_captions", "--path_to_dataset", str(prepared[0]),
        "--path_to_save_gens", str(root / "gens"),
    ])  # fmt: skip
    return work


def test_stage2_trains_on_pre_encoded_and_on_the_fly_text_alike(stage1_on_cc, prepared, clip_folder, tmp_path):
    steps = 6
    stored = _stage2_run(stage1_on_cc, prepared, clip_folder, tmp_path / "pre", pre_encoded=True, steps=steps)
    fly = _stage2_run(stage1_on_cc, prepared, clip_folder, tmp_path / "fly", pre_encoded=False, steps=steps)
    a = {m["step"]: m["loss"] for m in _metrics(stored)}
    b = {m["step"]: m["loss"] for m in _metrics(fly)}
    assert sorted(a) == list(range(1, steps + 1))
    # same seed, same batches: stored embeddings and captions encoded on the fly give the same training run
    assert sorted(b) == sorted(a)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-6), step
    first = sum(a[s] for s in range(1, 4)) / 3
    last = sum(a[s] for s in range(steps - 2, steps + 1)) / 3
    assert last < first, (first, last)
    for work in (stored, fly):
        assert (work / "model.safetensors").is_file()
        assert (work.parent / "gens" / f"step_{steps:07d}.png").is_file()  # the validation grid of the last step
