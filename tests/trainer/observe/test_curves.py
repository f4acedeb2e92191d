"""`python -m trainers.lokr report RUN/`: the training-curves page from a hand-written metrics.jsonl."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import REPO as ROOT
from tests.helpers.html_tables import Tables
from trainers.lokr.observe.report import smooth


def run_report(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainers.lokr", "report", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_smoothing_by_hand():
    # weight 0.9, debiased: 1 -> 0.1/0.1 = 1; None skipped; 3 -> (0.09 + 0.3) / (0.09 + 0.1) = 2.0526…
    assert smooth([1.0, None, 3.0]) == pytest.approx([1.0, None, 0.39 / 0.19])
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_curves_page_from_metrics(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(run / "samples" / "00000002-sheet.png")
    lines = [
        {"step": 1, "epoch": 0, "loss": 1.0, "lr_unet": 5e-4, "lr_text": 5e-4, "grad_norm": 2.0,
         "images_per_s": 4.0, "skipped": 0},
        {"step": 2, "epoch": 0, "loss": None, "lr_unet": 1e-3, "lr_text": 1e-3, "grad_norm": None,
         "images_per_s": 5.0, "skipped": 1, "samples": ["samples/00000002-0.png"],
         "sample_sheet": "samples/00000002-sheet.png"},
        {"step": 3, "epoch": 1, "loss": 3.0, "lr_unet": 1e-3, "lr_text": 1e-3, "grad_norm": 1.0,
         "images_per_s": 6.0, "skipped": 1},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_report(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"wrote {run / 'report.html'}: 3 steps (last 3)"
    text = (run / "report.html").read_text()
    page = Tables(text)
    summary = {r[0]: r[1] for r in page.tables["summary"]}
    assert summary == {"steps logged": "3", "last step": "3", "epoch": "1", "last loss": "3",
                       "last smoothed loss": "2.053", "mean loss, last 10 % of steps": "3",
                       "skipped steps (non-finite loss)": "1", "median images/s": "5"}
    assert page.images == 5 + 1  # five charts and the one sheet
    assert "<h3>step 2</h3>" in text


def test_missing_or_bad_metrics_are_one_line(tmp_path):
    proc = run_report(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'metrics.jsonl'} not found: give a run folder "
                                   "written by `python -m trainers.lokr`")
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1}\n')
    proc = run_report(tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("metrics.jsonl:1 is not a metrics line (JSON with a step)")


def _charts(html):
    """alt text -> RGB pixels (int array) of each chart <img> of a page."""
    import base64
    import io
    import re

    import numpy as np

    return {alt: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
            for alt, data in re.findall(r"<img class='chart' alt='([^']*)' src='data:image/png;base64,([^']*)'>",
                                        html)}


def test_curves_are_drawn_and_one_series_has_no_legend(tmp_path):
    """The loss chart draws its two series (raw #9db4d8, smoothed #1f4e99) with a legend; a
    chart of one series has no legend, so a gradient norm logged at one step only (one point:
    a line with no length, no marker) leaves its chart without a single blue pixel. Black text,
    grey grid and white have blue = red; the blues have blue - red = 59 and 122."""
    from trainers.lokr.observe.report import render

    lines = [{"step": 1, "epoch": 0, "loss": 1.0, "grad_norm": 2.0, "images_per_s": 4.0, "skipped": 0},
             {"step": 2, "epoch": 0, "loss": 3.0, "grad_norm": None, "images_per_s": 5.0, "skipped": 0}]
    charts = _charts(render(tmp_path, lines))
    assert len(charts) == 5

    def blue(pixels):
        return int(((pixels[..., 2] - pixels[..., 0]) > 40).sum())
    assert blue(charts["loss"]) > 100
    assert blue(charts["gradient norm (before clipping)"]) == 0


def test_median_speed_is_the_middle_of_five(tmp_path):
    """Summary "median images/s": of 5, 1, 4, 2, 3 images/s (sorted 1..5) the middle one, 3."""
    from trainers.lokr.observe.report import render

    lines = [{"step": i + 1, "epoch": 0, "loss": 1.0, "images_per_s": v, "skipped": 0}
             for i, v in enumerate([5.0, 1.0, 4.0, 2.0, 3.0])]
    summary = {r[0]: r[1] for r in Tables(render(tmp_path, lines)).tables["summary"]}
    assert summary["median images/s"] == "3"


def test_mean_loss_of_the_last_tenth(tmp_path):
    """Summary "mean loss, last 10 % of steps": of 18 finite losses 1..18, ⌊18/10⌋ = 1 step,
    so the mean is the last loss, 18."""
    from trainers.lokr.observe.report import render

    lines = [{"step": i, "epoch": 0, "loss": float(i), "skipped": 0} for i in range(1, 19)]
    summary = {r[0]: r[1] for r in Tables(render(tmp_path, lines)).tables["summary"]}
    assert summary["mean loss, last 10 % of steps"] == "18"

