"""Turn img2dataset's Conceptual Captions parquet shards into the Hugging Face dataset both trainers read.

    python prep_cc.py --path_to_data_root <PATH_TO_RAW_SAVE> \
        --path_to_save <PATH_TO_PROCESSED_SAVE> \
        --hf_clip_model_name openai/clip-vit-large-patch14 \
        --hf_cache_dir <HF_CACHE_DIR> \
        --cpu_batch_size 512 \
        --gpu_batch_size 256 \
        --num_cpu_workers 32 \
        --dtype bfloat16

Rows whose download failed, whose image bytes do not decode or whose caption is empty are dropped and counted;
the counts are printed at the end. The result (a DatasetDict with a `train` split, plus `validation` with
--val_fraction) is written to a staging folder and renamed to --path_to_save only when complete; an existing
--path_to_save is never overwritten unless --overwrite is given. See README.md (Conceptual Captions section).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Optional

from src.data import cc_prep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_data_root", required=True, help="img2dataset's --output_folder (parquet shards)")
    p.add_argument("--path_to_save", required=True, help="folder to create for the prepared DatasetDict")
    p.add_argument(
        "--hf_clip_model_name",
        default="openai/clip-vit-large-patch14",
        help="text encoder whose tokenizer (and, with --pre_encode_text, model) is used: a Hugging Face name "
        "found in the local cache, or a local folder",
    )
    p.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache folder holding --hf_clip_model_name")
    p.add_argument("--cpu_batch_size", type=int, default=512, help="rows per batch for decoding and tokenising")
    p.add_argument("--gpu_batch_size", type=int, default=256, help="captions per batch for --pre_encode_text")
    p.add_argument("--num_cpu_workers", type=int, default=8, help="processes for reading, decoding, tokenising")
    p.add_argument("--dtype", choices=sorted(cc_prep.STORAGE_DTYPE), default="float32",
                   help="precision of the text encoder for --pre_encode_text (bfloat16 results are stored as float32)")
    p.add_argument("--pre_encode_text", action="store_true",
                   help="also store the frozen text encoder's hidden states per caption (column text_embeds)")
    p.add_argument("--img_size", type=int, default=None,
                   help="shrink images whose shorter side is larger to this size (default: store as downloaded)")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="fraction of rows held out as 'validation', chosen by a hash of each row's img2dataset key")
    p.add_argument("--seed", type=int, default=0, help="salt of that hash: another seed holds out other rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --path_to_save")
    args = p.parse_args(argv)
    for name in ("cpu_batch_size", "gpu_batch_size", "num_cpu_workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.img_size is not None and args.img_size < 1:
        p.error("--img_size must be at least 1")
    if not 0.0 <= args.val_fraction < 1.0:  # checked before hours of decoding and encoding, not after them
        p.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    return args


def exit_on_sigterm(main_pid: int):
    """A SIGTERM handler: SystemExit in the process that installed it, so its `finally` blocks run. A process forked
    by os.fork gets SIGTERM's default back (`_fork_hooks`); one forked another way that inherits the handler ends
    at once there, as SIGTERM's default does."""

    def handler(signum, frame):
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    return handler


class _ForkGuard(threading.local):
    active = False  # prep's handler is installed (main process)
    mask: Optional[set] = None  # the forking thread's signal mask, while SIGTERM is blocked around os.fork


_FORK_GUARD = _ForkGuard()


def _block_sigterm_before_fork() -> None:
    if _FORK_GUARD.active:
        _FORK_GUARD.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm_after_fork(child: bool) -> None:
    mask, _FORK_GUARD.mask = _FORK_GUARD.mask, None
    if mask is None:
        return
    if child:  # before the signal can arrive: a pending one takes the default action (the process ends)
        _FORK_GUARD.active = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# datasets' pool workers are forked, and a pool stops them with SIGTERM, possibly before a new worker's interpreter
# is set up. A child that inherited a Python-level handler lost such a signal (CPython clears signals that arrive
# before its after-fork set-up: 34 of 40 children sent SIGTERM right after os.fork lived on), kept the pool's lock
# and its output pipes, and prep (or a test waiting on its output) waited forever. With SIGTERM blocked across the
# fork and its default restored in the child, the signal stays pending until it can end the child.
os.register_at_fork(
    before=_block_sigterm_before_fork,
    after_in_parent=lambda: _unblock_sigterm_after_fork(child=False),
    after_in_child=lambda: _unblock_sigterm_after_fork(child=True),
)


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM (kill, timeout, a scheduler) ends Python without running `finally`: inside this block it raises
    SystemExit instead, so the staging folder with its datasets caches is removed as on Ctrl-C. Forked children
    get SIGTERM's default action."""
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm(os.getpid()))
    _FORK_GUARD.active = True
    try:
        yield
    finally:
        _FORK_GUARD.active = False
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with sigterm_raises():
        return prepare(args)


def prepare(args: argparse.Namespace) -> int:
    try:
        save_path = cc_prep.check_save_path(args.path_to_save, args.overwrite)
        survey = cc_prep.require_rows(cc_prep.inspect_shards(cc_prep.find_shards(args.path_to_data_root)))
        text = cc_prep.load_text_spec(args.hf_clip_model_name, args.hf_cache_dir)
        with cc_prep.staging(save_path) as stage:
            raw = cc_prep.load_shards(survey, stage / "cache", args.num_cpu_workers)
            processed = cc_prep.process_rows(
                raw, text, args.img_size, survey.columns, args.cpu_batch_size, args.num_cpu_workers
            )
            counts = cc_prep.count_rows(processed, survey)
            print(cc_prep.format_report(counts), flush=True)
            if args.pre_encode_text:
                processed = cc_prep.encode_captions(
                    processed, args.hf_clip_model_name, args.hf_cache_dir, text.width, args.gpu_batch_size, args.dtype
                )
            kept = cc_prep.keep_rows(processed, args.num_cpu_workers)
            splits = cc_prep.split_rows(kept, args.val_fraction, args.seed)
            info = {"text_model": args.hf_clip_model_name, "pre_encoded_text": args.pre_encode_text,
                    "dtype": args.dtype, "img_size": args.img_size, "val_fraction": args.val_fraction,
                    "seed": args.seed}
            cc_prep.publish(splits, stage, save_path, info)
    except cc_prep.PrepError as err:
        print(f"prep_cc.py: error: {err}", file=sys.stderr)
        return 2
    print("saved " + ", ".join(f"{name}: {len(ds)} rows" for name, ds in splits.items()) + f" to {save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
