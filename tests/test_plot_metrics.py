"""plot_metrics.py: two runs into one PNG, bad lines skipped and counted, a resumed run drawn continuous."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import plot_metrics
from src.training.metric_curves import families, metric_family, read_metrics, run_labels, smooth


def write_run(folder: Path, steps, scale: float, resumed_from: int | None = None) -> Path:
    """A metrics.jsonl like the trainers write: a decaying loss, a learning rate and the discriminator's logits.
    With `resumed_from`, the steps after it are logged a second time (a run resumed from that checkpoint)."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "loss": scale * math.exp(-s / 20) * (1 + 0.2 * math.sin(s)), "lr": 1e-3 * min(1, s / 10),
             "logits_real": 0.5, "logits_fake": -0.5, "note": "text is not a curve"} for s in steps]
    if resumed_from is not None:
        rows += [{**r, "loss": r["loss"] * 0.9} for r in rows if r["step"] > resumed_from]
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_pixels(png: Path, hex_colour: str) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=1) < 30).sum())


def test_two_runs_one_png_with_a_truncated_last_line(tmp_path, capsys):
    a = write_run(tmp_path / "lr_1e-3", range(1, 41), 1.0)
    b = write_run(tmp_path / "lr_3e-4", range(1, 41), 2.0)
    text = b.read_text().splitlines(keepends=True)
    text.insert(5, "\n")  # an empty line
    b.write_text("".join(text) + '{"step": 41, "loss": 0.3, "l')  # a half-written last line, no newline
    out = tmp_path / "curves.png"

    assert plot_metrics.main([str(a), str(b.parent), "--output", str(out)]) == 0  # a folder stands for its file
    printed = capsys.readouterr().out
    assert f"{b}: skipped 2 bad line(s)" in printed and "line 6, 42" in printed
    assert str(a) not in printed.split("wrote")[0]  # nothing to report for the clean file
    assert f"wrote {out} (2 run(s)" in printed

    image = Image.open(out)
    assert image.format == "PNG" and image.width > 800
    assert colour_pixels(out, "#1f77b4") > 200 and colour_pixels(out, "#ff7f0e") > 200  # both runs drawn (C0, C1)
    runs = [read_metrics(a), read_metrics(b)]
    assert families(runs) == {"loss": ["loss"], "lr": ["lr"], "logits": ["logits_real", "logits_fake"]}
    assert families(runs, ["l*"], exclude=["logits_fake"]) == {"loss": ["loss"], "lr": ["lr"], "logits": ["logits_real"]}
    assert runs[1].series["loss"][0] == list(range(1, 41))  # the good lines all read


def test_an_output_name_without_a_suffix_is_reported_as_the_png_written(tmp_path, capsys):
    run = write_run(tmp_path / "run", range(1, 11), 1.0)
    assert plot_metrics.main([str(run), "--output", str(tmp_path / "curves")]) == 0
    assert (tmp_path / "curves.png").is_file() and str(tmp_path / "curves.png") in capsys.readouterr().out


def test_the_printed_point_count_is_of_the_metrics_drawn(tmp_path, capsys):
    """It counted every metric in the files, those --metrics_filter / --exclude leave out too (40 for 10 drawn)."""
    run = write_run(tmp_path / "run", range(1, 11), 1.0)  # 4 numeric metrics, 10 steps
    out = str(tmp_path / "c.png")
    assert plot_metrics.main([str(run), "--output", out, "--metrics_filter", "loss"]) == 0
    assert "(1 run(s), 10 points)" in capsys.readouterr().out
    assert plot_metrics.main([str(run), str(run), "--output", out, "--exclude", "logits_*"]) == 0
    assert "(2 run(s), 40 points)" in capsys.readouterr().out


def test_resumed_run_is_one_continuous_curve_with_the_later_values(tmp_path):
    path = write_run(tmp_path / "run", range(1, 31), 1.0, resumed_from=20)
    run = read_metrics(path)
    steps, values = run.series["loss"]
    assert steps == list(range(1, 31))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in rows[30:]}  # the lines written after the resume
    assert values[20:] == [resumed[s] for s in range(21, 31)] and values[24] != rows[24]["loss"]
    assert run.repeated_steps == 10 * 4 and "resumed run" in run.report()


def test_a_resumed_run_that_stopped_earlier_leaves_out_the_abandoned_attempts_later_steps(tmp_path, capsys):
    """Attempt 1 logged steps 1-10 (checkpoint at 4), the resumed attempt 5-7 and stopped: the curve was 5-7 of the
    resumed attempt then 8-10 of the abandoned one; it now ends at 7, as TensorBoard's does."""
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    rows = [{"step": s, "loss": 1.0, "fid": 9.0} for s in range(1, 11)] + [{"step": s, "loss": 2.0} for s in (5, 6, 7)]
    rows.insert(10, {"step": 10, "epoch_loss": 1.5})  # a second line at the same step is no resume
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = read_metrics(path)
    assert run.series["loss"] == ([1, 2, 3, 4, 5, 6, 7], [1.0] * 4 + [2.0] * 3)
    assert run.series["fid"] == ([1, 2, 3, 4], [9.0] * 4) and "epoch_loss" not in run.series
    assert run.repeated_steps == 6 + 6 + 1  # loss and fid at 5-10, epoch_loss at 10
    assert plot_metrics.main([str(path), "--output", str(tmp_path / "c.png")]) == 0
    assert "left out 13 value(s) of an earlier attempt" in capsys.readouterr().out


def test_nothing_usable_is_an_error_not_a_crash(tmp_path, capsys):
    bad = tmp_path / "bad" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('\n{"loss": 1.0}\n[1, 2]\n{"step": "3", "loss": 1}\n{"step": 4, "loss": NaN}\n{"ste')
    assert plot_metrics.main([str(bad), "--output", str(tmp_path / "x.png")]) == 1
    captured = capsys.readouterr()
    assert "skipped 5 bad line(s)" in captured.out and "1 non-finite value(s)" in captured.out
    assert "no metric to plot" in captured.err and not (tmp_path / "x.png").exists()
    assert plot_metrics.main([str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "metrics file not found" in capsys.readouterr().err


def test_labels_families_and_smoothing():
    assert run_labels([Path("/x/a/work/metrics.jsonl"), Path("/x/b/work/metrics.jsonl")]) == ["a/work", "b/work"]
    assert run_labels([Path("/x/vae/metrics.jsonl"), Path("/x/diffusion/metrics.jsonl")]) == ["vae", "diffusion"]
    assert [metric_family(n) for n in ("val_2afc/cnn", "disc_lr", "lr", "logits_fake", "rec_loss")] == [
        "val_2afc", "lr", "lr", "logits", "rec_loss"]
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # debiased: no pull towards zero
    noisy = [1.0, 3.0] * 20
    assert np.std(smooth(noisy, 0.9)[10:]) < 0.2 * np.std(noisy) and smooth(noisy, 0.0) == noisy
