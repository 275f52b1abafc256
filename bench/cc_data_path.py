"""Disk and time of the Conceptual Captions data path on a small local run, extrapolated to a million images.

    python bench/cc_data_path.py [--num_urls 1000] [--dead_fraction 0.25] [--workdir /tmp/cc_bench]

What it does, all on this machine (no network): serves --num_urls JPEGs on 127.0.0.1 (random crops, 300-640 px
wide, of the two real photos that scikit-learn ships; a quarter of the URLs are dead, as in Conceptual
Captions), downloads them with download_cc.sh (the design's img2dataset command, 256 px, keep_ratio), runs
prep_cc.py without and with --pre_encode_text (the packaged all-MiniLM-L6-v2 encoder, 384-d, float32), and times
a CLIP ViT-L/14 text tower (random weights, same architecture and cost) on realistic caption lengths.
It runs twice (--base_urls, then --num_urls) and prints the larger run's measurements, then per-million
extrapolations from the difference between the runs (so fixed start-up costs are not multiplied; labelled as such).

Loopback downloads measure img2dataset's CPU cost (decode, resize, encode, write), not the internet: real
downloads are bounded by bandwidth and remote servers. Figures depend on load; the machine's load average is
printed with them. README.md (Conceptual Captions section) quotes a run of this script.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "actor attends the premiere of film a view of the beach at sunset person walks with dog in park "
    "city skyline at night old house in the countryside football player celebrates after scoring goal "
    "portrait of a young woman smiling bowl of fresh fruit on wooden table snow covered mountain village "
    "vintage car parked on street illustration of cartoon character flowers in garden during spring"
).split()


def photo_crops(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEG files, random crops / flips / scales of scikit-learn's sample photos (real photo statistics)."""
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640 x 427 each
    names = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = rng.randint(200, 640), rng.randint(200, 427)
        x, y = rng.randint(0, 640 - w), rng.randint(0, 427 - h)
        crop = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        scale = rng.uniform(1.0, 1.6)
        crop = crop.resize((max(1, int(w * scale)), max(1, int(h * scale))))
        name = f"{i:06d}.jpg"
        crop.save(folder / name, "JPEG", quality=90)
        names.append(name)
    return names


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 15)))  # Conceptual Captions: ~10 words


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


class PeakDisk:
    """Polls the size of a folder in a thread; .peak is the largest size seen (MB)."""

    def __init__(self, path: Path, interval: float = 0.2):
        self.path, self.interval, self.peak = Path(path), interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, folder_mb(self.path))
            except FileNotFoundError:  # files vanish while datasets renames them
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its child processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def clip_l_seconds_per_caption(token_lengths: list[int], batch: int = 64, repeats: int = 2) -> float:
    """CPU seconds per caption of CLIP ViT-L/14's text tower (random weights: same cost), padded to 77 tokens."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408)
    model = CLIPTextModel(cfg).eval()
    ids = torch.randint(0, 49407, (batch, 77))
    mask = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        mask[i, : token_lengths[i % len(token_lengths)]] = 1
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, attention_mask=mask)
    return (time.perf_counter() - start) / (repeats * batch)


def measure(n_urls: int, dead_fraction: float, args, work: Path) -> dict:
    """One pass of the data path on n_urls URLs; sizes in MB, times in seconds."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "www").mkdir(parents=True)
    rng = random.Random(n_urls)
    num_live = round(n_urls * (1 - dead_fraction))
    names = photo_crops(work / "www", num_live, seed=n_urls)
    names += [f"dead_{i:06d}.jpg" for i in range(n_urls - num_live)]
    rng.shuffle(names)
    m = {"urls": n_urls, "served_mb": folder_mb(work / "www"), "live": num_live}

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(work / "www"))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        prefix = f"http://127.0.0.1:{server.server_address[1]}/"
        tsv = work / "Train_GCC-training.tsv"  # Google's layout: caption<TAB>url, no header
        tsv.write_text("".join(f"{caption(rng)}\t{prefix}{name}\n" for name in names))
        dl_env = {**env, "PROCESSES": str(args.processes), "THREADS": str(args.threads), "IMAGE_SIZE": "256",
                  "IMG2DATASET": str(Path(sys.executable).with_name("img2dataset"))}
        m["dl_wall"], m["dl_cpu"] = timed(["bash", "download_cc.sh", str(tsv), str(work / "raw")], dl_env)
    finally:
        server.shutdown()
        server.server_close()
    m["dl_mb"] = folder_mb(work / "raw")
    m["downloaded"] = sum(json.loads(p.read_text())["successes"] for p in (work / "raw").glob("*_stats.json"))

    prep = [sys.executable, "prep_cc.py", "--path_to_data_root", str(work / "raw"),
            "--hf_clip_model_name", "all-MiniLM-L6-v2", "--cpu_batch_size", "512", "--gpu_batch_size", "256",
            "--num_cpu_workers", str(args.workers), "--dtype", "float32"]
    for tag, extra in (("plain", []), ("text", ["--pre_encode_text"])):
        (work / f"out_{tag}").mkdir()
        with PeakDisk(work / f"out_{tag}") as peak:
            m[f"{tag}_wall"], m[f"{tag}_cpu"] = timed(prep + ["--path_to_save", str(work / f"out_{tag}" / "cc")] + extra, env)
        m[f"{tag}_mb"], m[f"{tag}_peak_mb"] = folder_mb(work / f"out_{tag}" / "cc"), peak.peak

    import datasets

    kept = datasets.load_from_disk(str(work / "out_plain" / "cc"))["train"]
    m["rows"] = len(kept)
    m["lengths"] = [len(ids) for ids in kept["input_ids"]]
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_urls", type=int, default=1000, help="URLs of the larger run")
    p.add_argument("--base_urls", type=int, default=250,
                   help="URLs of the smaller run; per-image costs are the differences between the two runs, so "
                   "start-up time (imports, model loading) is not counted per image")
    p.add_argument("--dead_fraction", type=float, default=0.25)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="prep_cc.py --num_cpu_workers")
    p.add_argument("--workdir", default="/tmp/cc_bench")
    args = p.parse_args()

    small = measure(args.base_urls, args.dead_fraction, args, Path(args.workdir) / "small")
    big = measure(args.num_urls, args.dead_fraction, args, Path(args.workdir) / "big")
    tokens = sum(big["lengths"]) / len(big["lengths"])
    clip_s = clip_l_seconds_per_caption(big["lengths"][:64])
    load = os.getloadavg()[0]

    def per_million(key: str, count: str) -> float:
        """Marginal cost per million: the slope between the two runs (linear extrapolation)."""
        return (big[key] - small[key]) / (big[count] - small[count]) * 1e6

    def row(name: str, tag: str, count: str, what: str) -> str:
        return "\n".join(
            f"{name:30s} {m[tag + '_mb']:8.1f} MB  {m[tag + '_wall']:6.1f} s wall  {m[tag + '_cpu']:6.1f} s CPU"
            f"   ({m[count]} {what})"
            for m in (small, big)
        )

    emb_mb = tokens * 768 * 4 * 1e6 / 2**20  # CLIP-L hidden states without padding, float32
    lines = [
        f"machine: {os.cpu_count()} CPU core(s), load average {load:.1f} at the end",
        f"runs: {args.base_urls} and {args.num_urls} URLs, {args.dead_fraction:.0%} dead; larger run: "
        f"{big['downloaded']} downloaded, {big['rows']} rows kept; served JPEGs {big['served_mb'] * 1024 / big['live']:.1f} KB each",
        row("download_cc.sh (img2dataset)", "dl", "downloaded", "images, loopback"),
        row("prep_cc.py", "plain", "rows", "rows"),
        row("prep_cc.py --pre_encode_text", "text", "rows", "rows, MiniLM 384-d float32 on CPU"),
        f"peak disk next to --path_to_save while prep runs: {big['plain_peak_mb']:.1f} MB "
        f"({big['plain_peak_mb'] / big['plain_mb']:.1f}x the result)",
        f"tokens per caption {tokens:.1f}; CLIP ViT-L/14 text tower on CPU, 77-token batches of 64: "
        f"{clip_s * 1000:.1f} ms/caption",
        "",
        "extrapolated to one million (slope between the two runs; estimates, not measurements):",
        f"  img2dataset parquet, 256 px     {per_million('dl_mb', 'downloaded') / 1024:6.1f} GB per million downloaded images",
        f"  prep_cc.py result               {per_million('plain_mb', 'rows') / 1024:6.1f} GB per million kept rows",
        f"  prep_cc.py peak while running   {per_million('plain_peak_mb', 'rows') / 1024:6.1f} GB per million kept rows",
        f"  img2dataset, loopback           {per_million('dl_wall', 'urls') / 3600:6.1f} hours per million URLs "
        f"with {args.processes} processes on this machine (no network: a floor for the CPU side)",
        f"  prep_cc.py                      {per_million('plain_wall', 'urls') / 3600:6.1f} hours per million URLs "
        f"with {args.workers} workers ({per_million('plain_cpu', 'urls') / 3600:.1f} core-hours)",
        f"  + MiniLM pre-encoding on CPU    {(per_million('text_wall', 'urls') - per_million('plain_wall', 'urls')) / 3600:6.1f}"
        f" hours per million URLs",
        f"  CLIP-L text embeddings          {emb_mb / 1024:6.1f} GB float32 ({emb_mb / 2048:.1f} GB float16) per million "
        f"captions of {tokens:.1f} tokens",
        f"  CLIP-L encoding on this CPU     {clip_s * 1e6 / 3600:6.1f} hours per million captions",
    ]
    print("\n".join(lines))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    main()
