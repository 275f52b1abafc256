"""Loss curves from metrics.jsonl files: tolerant reading, smoothing, metric families, and one PNG.

A metrics.jsonl line is {"step": N, "<metric>": value, ...} (src/training/setup.MetricsLog). Reading never
stops at a bad line: empty, truncated or half-written lines (a run killed mid-write), lines that are not a JSON
object or have no integer step are skipped and counted. A line whose step goes back (a run resumed from an
earlier checkpoint) replaces every value earlier lines logged from that step on, as TensorBoard does, so a resumed
run's curve is one continuous line and holds nothing of the attempt it abandoned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Optional, Sequence

PANEL_COLUMNS = 4
SCHEDULE_FAMILIES = ("lr", "ema_decay")  # set by a schedule, not measured: drawn as they are, never smoothed
MARKERS = "osD^vPX*"  # single points of the metrics of one family
LOG_SCALE_RATIO = 50.0  # a panel whose positive values span more than this factor gets a log y-axis


@dataclass
class RunMetrics:
    """One metrics.jsonl: per metric, steps and values in step order (one value per step)."""

    path: Path
    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of skipped lines
    non_finite: int = 0  # NaN / inf values left out of the curves
    repeated_steps: int = 0  # values replaced by a later line (a resumed run logging those steps again)

    def report(self) -> Optional[str]:
        """One line on what was left out, or None when nothing was."""
        parts = []
        if self.bad_lines:
            shown = ", ".join(map(str, self.bad_lines[:10])) + (", ..." if len(self.bad_lines) > 10 else "")
            parts.append(f"skipped {len(self.bad_lines)} bad line(s) (empty, truncated or not a JSON object "
                         f"with an integer step): line {shown}")
        if self.non_finite:
            parts.append(f"left out {self.non_finite} non-finite value(s)")
        if self.repeated_steps:
            parts.append(f"left out {self.repeated_steps} value(s) of an earlier attempt, from the step a resumed run "
                         "went back to on (the resumed run's are drawn)")
        return f"{self.path}: " + "; ".join(parts) if parts else None


def parse_line(line: str) -> Optional[dict]:
    """The JSON object of one line, or None when the line is empty, cut short or has no integer 'step'."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return row


def read_metrics(path, label: Optional[str] = None) -> RunMetrics:
    """Read a metrics.jsonl (or a folder holding one), skipping and counting what cannot be used."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    run = RunMetrics(path=path, label=label or path.parent.name)
    values: dict[str, dict[int, float]] = {}
    last_step = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            row = parse_line(line)
            if row is None:
                run.bad_lines.append(number)
                continue
            step = row.pop("step")
            if last_step is not None and step < last_step:  # a resumed attempt: it replaces steps >= `step`
                run.repeated_steps += drop_from(values, step)
            last_step = step
            for name, value in row.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # text and flags are not curves
                if not math.isfinite(value):
                    run.non_finite += 1
                    continue
                per_step = values.setdefault(name, {})
                run.repeated_steps += step in per_step
                per_step[step] = float(value)
    for name, per_step in values.items():
        if not per_step:  # logged only by an attempt a resumed run abandoned
            continue
        steps = sorted(per_step)
        run.series[name] = (steps, [per_step[s] for s in steps])
    return run


def drop_from(values: dict[str, dict[int, float]], step: int) -> int:
    """Remove the values at `step` and later from {metric: {step: value}}; returns how many went."""
    dropped = 0
    for per_step in values.values():
        later = [s for s in per_step if s >= step]
        for s in later:
            del per_step[s]
        dropped += len(later)
    return dropped


def run_labels(paths: Sequence[Path]) -> list[str]:
    """A legend name per run: its folder, with as many parent folders as it takes to tell runs apart."""
    folders = [(p if p.is_dir() else p.parent).resolve() for p in map(Path, paths)]
    for depth in range(1, max(len(f.parts) for f in folders) + 1):
        labels = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]


def metric_family(name: str) -> str:
    """The panel a metric is drawn in: the part before '/', 'lr' for learning rates, 'logits' for the
    discriminator's logits, otherwise the metric itself."""
    if "/" in name:
        return name.split("/", 1)[0]
    if name == "lr" or name.endswith("_lr"):
        return "lr"
    if name.startswith("logits"):
        return "logits"
    return name


def auto_smoothing(num_points: int) -> float:
    """An EMA weight averaging over about num_points / 30 points (none for short curves)."""
    window = num_points / 30.0
    return 0.0 if window <= 1.0 else 1.0 - 1.0 / window


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): s_t = w s_{t-1} + (1 - w) x_t,
    divided by 1 - w^t so the first points are not pulled towards zero."""
    out, acc = [], 0.0
    for t, x in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * x
        out.append(acc / (1.0 - weight**t) if weight > 0 else x)
    return out


def families(
    runs: Sequence[RunMetrics], patterns: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> dict[str, list[str]]:
    """{family: [metric names]} in the order metrics first appear. Shell patterns: `patterns` keeps only the
    metrics matching one of them, `exclude` drops those matching one."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for name in run.series:
            if patterns and not any(fnmatch(name, p) for p in patterns):
                continue
            if exclude and any(fnmatch(name, p) for p in exclude):
                continue
            members = out.setdefault(metric_family(name), [])
            if name not in members:
                members.append(name)
    return out


def plotted_points(
    runs: Sequence[RunMetrics], patterns: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> int:
    """How many (step, value) points plot_runs draws with these patterns: the metrics they leave out do not count."""
    names = [name for members in families(runs, patterns, exclude).values() for name in members]
    return sum(len(run.series[name][0]) for run in runs for name in names if name in run.series)


def plot_runs(
    runs: Sequence[RunMetrics], out_path, smoothing: Optional[float] = None, patterns: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None, title: Optional[str] = None,
) -> Path:
    """One PNG: a panel per metric family, each run in its own colour (raw faint, smoothed solid), metrics of
    one family told apart by line style (single points by marker). `smoothing` None picks a weight per curve
    (auto_smoothing); learning rates and the EMA decay are schedules and are drawn unsmoothed."""
    from matplotlib.figure import Figure

    panels = families(runs, patterns, exclude)
    if not panels:
        filtered = " left by --metrics_filter / --exclude" if patterns or exclude else ""
        raise ValueError(f"no metric to plot: the files hold no numeric values{filtered}")
    cols = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    for ax, (family, names) in zip(axes, panels.items()):
        lows, highs = [], []
        weight = 0.0 if family in SCHEDULE_FAMILIES else smoothing
        for run, colour in zip(runs, colours):
            for i, name in enumerate(names):
                if name not in run.series:
                    continue
                steps, values = run.series[name]
                label = run.label if len(names) == 1 else f"{run.label}: {name}"
                line = (styles[i % len(styles)], MARKERS[i % len(MARKERS)])
                draw_curve(ax, steps, values, colour, line, label, weight)
                lows.append(min(values))
                highs.append(max(values))
        ax.set_title(family, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if min(lows) > 0 and max(highs) / min(lows) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    out_path = Path(out_path)
    if not out_path.suffix:  # matplotlib would add .png itself, and the path reported would not exist
        out_path = out_path.with_name(out_path.name + ".png")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path


def draw_curve(ax, steps, values, colour, line: tuple[str, str], label, smoothing: Optional[float]) -> None:
    """Raw values (faint) and their smoothed curve (labelled) in line style line[0]; a lone point as marker line[1]."""
    style, marker = line
    if len(values) == 1:
        ax.plot(steps, values, marker=marker, color=colour, linestyle="none", label=label)
        return
    weight = auto_smoothing(len(values)) if smoothing is None else smoothing
    if weight > 0:
        ax.plot(steps, values, color=colour, linestyle=style, alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values, weight), color=colour, linestyle=style, linewidth=1.5, label=label)
