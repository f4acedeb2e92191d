"""The page of ``python -m trainers.lokr eval``: ``eval/index.html``, self-contained (charts and
image thumbnails embedded as data URIs).

Sections: the per-model table (as the model card's), the distribution of per-character CCIP per
model, the characters whose CCIP rose and fell most from the model before the last one to the
last one (a grid each: the references, then that character's images from both models), and
every character's scores.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from hakubooru import htmlpage as h

THUMB = 128   # px, longest side of an image on the page
EXTREMES = 3  # characters shown for the largest gain and the largest loss


def thumbnail_uri(path: Path) -> str:
    """A PNG thumbnail of an image file as a data URI."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(label: str, paths: list[Path]) -> str:
    cells = "".join(h.img(thumbnail_uri(p), f"{label} {k}", "thumb") for k, p in enumerate(paths))
    return f"<div class='grid'><span class='lab'>{h.esc(label)}</span>{cells}</div>"


def _histogram(values, title: str) -> str:
    fig, ax = h.figure(5.4, 3.0)
    ax.hist(values, bins=20, range=(0.0, 1.0), color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("CCIP per character")
    ax.set_ylabel("characters")
    return h.img(h.png_data_uri(fig), title)


def render(summary: dict, out: Path, images: dict, references: dict) -> str:
    """The page. ``images[(model, character)]``: the generated image paths; ``references[character]``:
    the reference image paths."""
    models = summary["models"]
    names = [m["name"] for m in models]
    parts = []
    if summary.get("stand_in"):
        parts.append(h.note("STAND-IN CCIP model (random weights, made by trainers.lokr.observe.ccip_standin): "
                            "these numbers test the plumbing and say nothing about character identity."))
    parts.append(h.note(f"{len(summary['characters'])} characters × {summary['images_per_character']} images "
                        f"per model, each scored against {summary['references']} reference images of the "
                        f"character from the shards. CCIP = 1 − mean CCIP difference (higher is better); "
                        f"same = share of (image, reference) pairs with difference ≤ {summary['threshold']:.4g}; "
                        "both averaged per character, then over characters (docs/eval.md)."))
    rows = [(m["name"], m["lokr"] or "—", m["characters"], m["images"], m["ccip"], m["same"],
             m["ccip_vs_base"]) for m in models]
    parts.append(h.table(("model", "LoKr", "characters", "images", "CCIP", "same character", "Δ CCIP vs base"),
                         rows, id="models"))
    charts = [_histogram([c["scores"][n]["ccip"] for c in summary["characters"]], n) for n in names]
    body = [h.section("Models", *parts, id="summary"), h.section("Distribution", h.row(*charts), id="distribution")]
    if len(names) >= 2:
        a, b = names[-2], names[-1]
        def change(c):
            return c["scores"][b]["ccip"] - c["scores"][a]["ccip"]

        gains = sorted((c for c in summary["characters"] if change(c) > 0), key=lambda c: (-change(c), c["rank"]))
        losses = sorted((c for c in summary["characters"] if change(c) < 0), key=lambda c: (change(c), c["rank"]))
        picks = [("gain", c) for c in gains[:EXTREMES]] + [("loss", c) for c in losses[:EXTREMES]]
        blocks = [h.note(f"{len(gains)} characters gained CCIP, {len(losses)} lost; the {EXTREMES} largest "
                         "of each (thumbnails of the references and of both models' images).")]
        for kind, c in picks:
            d = c["scores"][b]["ccip"] - c["scores"][a]["ccip"]
            blocks.append(f"<h3>{h.esc(kind)}: {h.esc(c['character'])} ({h.esc(c['series'] or 'no series')}), "
                          f"Δ CCIP {d:+.4f}</h3>"
                          + _grid("references", references[c["character"]])
                          + _grid(a, images[(a, c["character"])]) + _grid(b, images[(b, c["character"])]))
        body.append(h.section(f"Largest gain and loss: {b} against {a}", *blocks, id="extremes"))
    table_rows = [(c["rank"] + 1, c["character"], c["series"], c["samples"],
                   *[v for n in names for v in (c["scores"][n]["ccip"], c["scores"][n]["same"])])
                  for c in summary["characters"]]
    headers = ("#", "character", "series", "single-character samples",
               *[f"{n} {k}" for n in names for k in ("CCIP", "same")])
    body.append(h.section("Characters", h.table(headers, table_rows, id="characters"), id="characters-section"))
    style = ("<style>img.thumb { width: 96px; height: 96px; object-fit: contain; margin: 1px; "
             "image-rendering: pixelated; } .grid { display: flex; align-items: center; flex-wrap: wrap; } "
             ".lab { width: 9em; font-size: .85em; color: #555; }</style>")
    return h.page("CCIP benchmark", style + "".join(body))
