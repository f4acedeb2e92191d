"""``python -m trainers.lokr report RUN/``: training curves of a run folder as one HTML page.

From ``metrics.jsonl``: the loss (raw and smoothed), the learning rates, the gradient norm,
images/s and skipped steps against the optimizer step, and the latest sample sheets (embedded,
so the page is self-contained). Needs matplotlib; no torch.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import sys
from pathlib import Path

from hakubooru import htmlpage as h
from hakubooru.errors import HakubooruError
from hakubooru.manifest import write_atomic

SMOOTHING = 0.9  # exponential moving average weight, as TensorBoard's default slider
SHEETS_SHOWN = 3


def read_metrics(run: Path) -> list[dict]:
    """The lines of ``RUN/metrics.jsonl`` (one per optimizer step), in order."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise HakubooruError(f"{path} not found: give a run folder written by `python -m trainers.lokr`")
    lines = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            line["step"] = int(line["step"])
        except (ValueError, KeyError, TypeError):
            raise HakubooruError(f"{path}:{n} is not a metrics line (JSON with a step)") from None
        lines.append(line)
    if not lines:
        raise HakubooruError(f"{path} is empty: the run has not finished a step yet")
    return lines


def smooth(values: list, weight: float = SMOOTHING) -> list:
    """Debiased exponential moving average (TensorBoard's smoothing); None (non-finite loss)
    values are skipped and stay None."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _line_chart(steps, series: dict, title: str, ylabel: str, *, log_y: bool = False) -> str:
    from matplotlib.ticker import MaxNLocator

    fig, ax = h.figure(5.6, 3.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = False
    for label, (values, style) in series.items():
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
            drawn = True
    if log_y and drawn:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if drawn and len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return h.img(h.png_data_uri(fig), title)


def render(run: Path, lines: list[dict]) -> str:
    """The curves page of a run."""
    steps = [x["step"] for x in lines]
    loss = [x.get("loss") for x in lines]
    smoothed = smooth(loss)
    finite = [v for v in loss if v is not None]
    tail = finite[-max(1, len(finite) // 10):]
    speeds = [x["images_per_s"] for x in lines if x.get("images_per_s")]
    val = [x["val_loss"] for x in lines if x.get("val_loss") is not None]
    summary = h.table(["", ""], [
        ["steps logged", len(lines)], ["last step", steps[-1]], ["epoch", lines[-1].get("epoch")],
        ["last loss", loss[-1]], ["last smoothed loss", smoothed[-1]],
        ["mean loss, last 10 % of steps", sum(tail) / len(tail) if tail else None],
        ["skipped steps (non-finite loss)", lines[-1].get("skipped", 0)],
        *([["last validation loss", val[-1]]] if val else []),
        ["median images/s", sorted(speeds)[len(speeds) // 2] if speeds else None],
    ], id="summary")
    charts = h.row(
        _line_chart(steps, {"raw": (loss, {"color": "#9db4d8", "linewidth": 0.8}),
                            f"smoothed ({SMOOTHING})": (smoothed, {"color": "#1f4e99", "linewidth": 1.6})},
                    "loss", "loss"),
        *([_line_chart(steps, {"held-out": ([x.get("val_loss") for x in lines], {"marker": "o", "markersize": 3})},
                       "validation loss (fixed noise and timesteps)", "loss")]
          if val else []),
        _line_chart(steps, {"UNet": ([x.get("lr_unet") for x in lines], {}),
                            "text encoders": ([x.get("lr_text") for x in lines], {"linestyle": "--"})},
                    "learning rate", "lr"),
        _line_chart(steps, {"grad norm": ([x.get("grad_norm") for x in lines], {})},
                    "gradient norm (before clipping)", "norm"),
        _line_chart(steps, {"images/s": ([x.get("images_per_s") for x in lines], {})}, "throughput",
                    "images/s"),
        _line_chart(steps, {"skipped": ([x.get("skipped", 0) for x in lines], {"drawstyle": "steps-post"})},
                    "skipped steps (cumulative)", "steps"))
    sheets = [(x["step"], x["sample_sheet"]) for x in lines if x.get("sample_sheet")][-SHEETS_SHOWN:]
    parts = []
    for step, rel in reversed(sheets):
        path = run / rel
        if path.is_file():
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<h3>step {step}</h3>" + h.img(uri, f"samples at step {step}", css="sheet"))
        else:
            parts.append(h.note(f"step {step}: {rel} is missing"))
    samples = h.section("Latest sample sheets", *(parts or [h.note(
        "No samples logged: set sample.every (config [sample]) to render some during training.")]),
        id="section-samples")
    return h.page(f"Training curves: {run}", h.section("Summary", summary, id="section-summary")
                  + h.section("Curves", charts, id="section-curves") + samples)


def main(argv=None) -> int:
    """``python -m trainers.lokr report RUN/ [--html PAGE]``."""
    ap = argparse.ArgumentParser(prog="python -m trainers.lokr report", description=__doc__.splitlines()[0],
                                 epilog="`python -m trainers.lokr report --dataset SHARDS --help`: the dataset "
                                        "report with the training buckets a config fills.")
    ap.add_argument("run", help="a run folder (--output of a training)")
    ap.add_argument("--html", help="output page (default: RUN/report.html)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    lines = read_metrics(run)
    out = Path(args.html) if args.html else run / "report.html"
    write_atomic(out, render(run, lines).encode("utf-8"))
    print(f"wrote {out}: {len(lines)} steps (last {lines[-1]['step']})", file=sys.stderr)
    return 0
