"""The dataset report's HTML page, drawn from the numbers of :func:`hakubooru.report.collect`.

Each table has an ``id`` (``rating``, ``year``, ``quality``, ``tags-<category>``,
``tag-thresholds``, ``aspect``, ``buckets``, ``caption-examples``, ``tokens``, ``cut-tags``, ``skipped``,
``provenance``) so that tests and scripts can read the numbers back from the page.
"""
from __future__ import annotations

import json

import numpy as np

from . import htmlpage as h
from .report import THRESHOLDS, WINDOW


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "—"


def _counts(stats: dict, key: str, title: str) -> str:
    rows = stats[key]
    n = stats["samples"]
    return h.row(h.table([title, "samples", "share"], [[k, v, _pct(v, n)] for k, v in rows], id=key),
                 h.bar_chart([k for k, _ in rows], [v for _, v in rows], f"samples per {title}"))


def _tags(stats: dict) -> str:
    parts = []
    first, second = THRESHOLDS
    rows = [[cat, t["distinct"], t["occurrences"], t[f"at_least_{first}"], t[f"at_least_{second}"]]
            for cat, t in stats["tags"].items() if t["distinct"]]
    all_ = stats["tags_all"]
    rows.append(["all", all_["distinct"], None, all_[f"at_least_{first}"], all_[f"at_least_{second}"]])
    parts.append(h.table(["category", "distinct tags", "occurrences", f"tags on ≥ {first:,} samples "
                          "(should work)", f"tags on ≥ {second:,} samples (may work with emphasis)"],
                         rows, id="tag-thresholds"))
    if stats["tag_categories"] == "record":
        parts.append(h.note("The records keep character, copyright and artist tags in one list "
                            "(keep); pass --db to split them by the tag table."))
    for cat, t in stats["tags"].items():
        if not t["top"]:
            continue
        top = t["top"]
        parts.append(f"<h3>{h.esc(cat)}: the {len(top)} most frequent of {t['distinct']:,}</h3>")
        parts.append(h.row(h.table(["tag", "samples"], top, id=f"tags-{cat.replace('/', '-')}"),
                           h.bar_chart([x for x, _ in top[:25]], [c for _, c in top[:25]],
                                       f"{cat}: top {min(25, len(top))}", horizontal=True)))
    return h.section("Tags", *parts, id="section-tags")


def _images(stats: dict) -> str:
    im = stats["images"]
    mp = im["megapixels"]
    summary = [["megapixels (min / 10 % / median / 90 % / max)", " / ".join(f"{mp[k]:.3g}" for k in mp)],
               ["width (min / median / max)", " / ".join(f"{v:g}" for v in im["width"].values())],
               ["height (min / median / max)", " / ".join(f"{v:g}" for v in im["height"].values())],
               ["landscape / portrait / square", f"{im['landscape']:,} / {im['portrait']:,} / {im['square']:,}"]]
    pixels, aspect = im["_pixels"], im["_aspect"]
    lo, hi = max(pixels.min(), 1), max(pixels.max(), 2)
    charts = h.row(
        h.histogram(pixels / 1e6, np.geomspace(lo, hi * 1.0001, 40) / 1e6, "stored image size",
                    "megapixels (log scale)", log_x=True),
        h.histogram(aspect, np.geomspace(max(aspect.min(), 1e-3), aspect.max() * 1.0001, 40),
                    "aspect ratio", "width / height (log scale)", log_x=True))
    table = h.table(["aspect ratio w/h", "samples", "share"],
                    [[k, v, _pct(v, stats["samples"])] for k, v in im["aspect_bins"]], id="aspect")
    return h.section("Stored images", h.table(["", ""], summary, id="image-sizes"), charts, table,
                     id="section-images")


def _buckets(stats: dict) -> str:
    b = stats.get("buckets")
    if b is None:
        return h.section("Training buckets", h.note(
            "The trainer adds the buckets a training run fills: python -m trainers.lokr report "
            "--dataset SHARDS --config NAME --gpus N."), id="section-buckets")
    rows = sorted(b["rows"], key=lambda r: -r[3])
    summary = h.table(["", ""], [
        ["trainer config", b["config"]], ["GPUs × batch size = global batch",
                                          f"{b['world_size']} × {b['batch_size']} = {b['global_batch']}"],
        ["gradient accumulation / images per optimizer step", f"{b['grad_accum']} / {b['images_per_step']:,}"],
        ["buckets defined / filled", f"{b['buckets_defined']} / {b['buckets_used']}"],
        ["full global batches per epoch", f"{b['batches_per_epoch']:,}"],
        ["optimizer steps per epoch", f"{b['steps_per_epoch']:,}"],
        ["samples sitting out each epoch (bucket remainders)", f"{b['sit_out']:,}"],
        ["samples in full batches past the last whole step", f"{b['sit_out_batches']:,}"],
    ], id="bucket-summary")
    table = h.table(["bucket w×h", "width", "height", "samples", "full batches", "sit out"],
                    rows, id="buckets")
    chart = h.bar_chart([r[0] for r in rows[:40]], [r[3] for r in rows[:40]],
                        "samples per bucket (largest 40)", horizontal=True)
    return h.section("Training buckets", summary, h.row(table, chart), id="section-buckets")


def _captions(stats: dict) -> str:
    c = stats.get("captions")
    if c is None:
        return h.section("Captions in training", h.note(
            "The trainer adds one sample's caption in three epochs, as its data loader builds them: "
            "python -m trainers.lokr report --dataset SHARDS --config NAME."), id="section-captions")
    note = h.note(f"Post {c['id']} as trainer config {c['config']} feeds it (shuffle scope "
                  f"{c.get('shuffle_scope')}, tag dropout {c.get('tag_dropout')}); every sample's: "
                  "python -m trainers.lokr captions --config NAME --shards SHARDS --epoch E.")
    return h.section("Captions in training", note,
                     h.table(["epoch", "caption"], c["rows"], id="caption-examples"), id="section-captions")


def _tokens(stats: dict) -> str:
    t = stats["tokens"]
    n = stats["samples"]
    rows = [[f"over {k} tokens", v, _pct(v, n)] for k, v in t["over"].items()]
    rows.append([f"cut (over {t['limit']} = {t['max_windows']} × {WINDOW})", t["cut_captions"],
                 _pct(t["cut_captions"], n)])
    pct = t["percentiles"]
    lengths = np.repeat(np.arange(len(t["histogram"])), t["histogram"])
    fig, ax = h.figure()
    ax.hist(lengths, bins=min(60, max(10, int(lengths.max()) // 4 + 1)), color="#4c72b0")
    for k in range(1, t["max_windows"] + 1):
        ax.axvline(k * WINDOW, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_title("caption length (CLIP tokens, SDXL tokenizer)", fontsize=10)
    ax.set_xlabel("tokens (dashed: window limits)")
    ax.set_ylabel("samples")
    chart = h.img(h.png_data_uri(fig), "caption length")
    cut = h.table(["group", "tags cut"], list(t["cut_tags"].items()), id="cut-tags")
    return h.section(
        "Caption length in CLIP tokens",
        h.note(f"Unaugmented captions as the trainer builds them from the record (keep, general, "
               f"quality, year, meta, rating; '{', '}' between tags); {t['cut_tokens']:,} tokens "
               f"are past the limit in all."),
        h.row(h.table(["captions", "samples", "share"], rows, id="tokens") + h.table(
            ["tokens", ""], [["median", pct["50"]], ["90 %", pct["90"]], ["99 %", pct["99"]],
                             ["max", pct["100"]], ["mean", round(t["mean"], 3)]], id="token-stats"),
              chart),
        "<h3>Tags past the limit, by group (unshuffled order)</h3>", cut, id="section-tokens")


def _skipped(stats: dict) -> str:
    s = stats["skipped"]
    rows = s["by_reason"] or [["(none)", 0]]
    return h.section("Skipped posts", h.note(f"selected {h.number(s['selected'])}, written "
                                             f"{h.number(s['written'])}"),
                     h.table(["reason", "posts"], rows, id="skipped"), id="section-skipped")


def _provenance(stats: dict) -> str:
    rows = []
    for k, v in stats["provenance"].items():
        rows.append([k, "—" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)])
    return h.section("Provenance (manifest.json)", h.table(["", ""], rows, id="provenance"),
                     id="section-provenance")


def render(stats: dict) -> str:
    """The report page (one self-contained HTML string)."""
    n = stats["samples"]
    overview = h.table(["", ""], [["samples", n], ["shards", stats["shards"]],
                                  ["dataset fingerprint", stats["provenance"]["fingerprint"] or "—"]],
                       id="overview")
    body = [
        h.section("Overview", overview, id="section-overview"),
        h.section("Ratings", _counts(stats, "rating", "rating"), id="section-rating"),
        h.section("Year tags", _counts(stats, "year", "year"), id="section-year"),
        h.section("Quality tags", _counts(stats, "quality", "quality"), id="section-quality"),
        _tags(stats), _images(stats), _buckets(stats), _captions(stats), _tokens(stats), _skipped(stats),
        _provenance(stats),
    ]
    return h.page(f"Dataset report: {stats['folder']}", "".join(body))
