"""Draw the curves of one or more training runs (their metrics.jsonl) into one PNG.

    python plot_metrics.py work_dir/vae_celeba/metrics.jsonl work_dir/vae_celeba_lr2/metrics.jsonl \
        --output curves.png

One panel per metric family (each loss, the learning rates, grad norm, EMA decay, the discriminator's logits,
...), runs overlaid in one colour each and named by their folder, raw values faint behind a smoothed curve.
A folder stands for the metrics.jsonl inside it. Bad lines (empty, truncated, half-written) are skipped and
counted; the counts are printed.
"""

from __future__ import annotations

import argparse
import sys

from src.training.metric_curves import plot_runs, plotted_points, read_metrics, run_labels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files (or run folders holding one)")
    p.add_argument("--output", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per file (default: the folders)")
    p.add_argument("--smoothing", type=float, default=None,
                   help="EMA weight in [0, 1) for the smoothed curves (default: about 1/30 of each curve's length)")
    p.add_argument("--metrics_filter", nargs="+", default=None, metavar="PATTERN",
                   help="only metrics matching these shell patterns, e.g. 'rec_loss' '*lr'")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                   help="leave out metrics matching these shell patterns, e.g. 'skipped_*'")
    p.add_argument("--title", default=None, help="a title above the panels")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.metrics):
        p.error(f"--labels names {len(args.labels)} run(s) but {len(args.metrics)} file(s) were given")
    if args.smoothing is not None and not 0.0 <= args.smoothing < 1.0:
        p.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    labels = args.labels or run_labels(args.metrics)
    try:
        runs = [read_metrics(path, label) for path, label in zip(args.metrics, labels)]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run in runs:
        note = run.report()
        if note:
            print(note)
    try:
        out = plot_runs(runs, args.output, args.smoothing, args.metrics_filter, args.exclude, args.title)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    points = plotted_points(runs, args.metrics_filter, args.exclude)
    print(f"wrote {out} ({len(runs)} run(s), {points} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
