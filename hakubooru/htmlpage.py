"""Self-contained HTML pages: tables, and matplotlib charts embedded as base64 PNGs (nothing
is fetched when the page is viewed). Used by the dataset report and the training-curves report.

Charts are drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state) and
saved without a timestamp, so the same numbers give the same page bytes.
"""
from __future__ import annotations

import base64
import html
import io

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.note { color: #555; font-size: .9em; }
img.chart { max-width: 100%; }
img.sheet { max-width: 100%; min-width: 384px; image-rendering: pixelated; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def esc(text) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(text))


def number(value) -> str:
    """A count with thousands separators; a float with 4 significant digits; '—' for None."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4g}"


def table(headers, rows, *, id: str | None = None) -> str:
    """An HTML table; numeric cells are right-aligned and formatted by :func:`number`."""
    def cell(tag, v):
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
        return f"<{tag} class='n'>{number(v)}</{tag}>" if numeric else f"<{tag}>{esc(v)}</{tag}>"
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    ident = f" id='{esc(id)}'" if id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(width: float = 6.0, height: float = 3.2):
    """A new matplotlib Figure (Agg canvas) and its single Axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def png_data_uri(fig) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (no timestamp in the PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, alt: str, css: str = "chart") -> str:
    """An <img> tag for a data URI or a relative path."""
    return f"<img class='{css}' alt='{esc(alt)}' src='{esc(uri)}'>"


def bar_chart(labels, values, title: str, *, horizontal: bool = False, xlabel: str = "samples") -> str:
    """A bar chart as an <img> tag."""
    labels = [str(x) for x in labels]
    fig, ax = figure(5.6, max(2.4, 0.2 * len(labels) + 0.8) if horizontal else 2.8)
    if horizontal:
        ax.barh(range(len(labels)), values, color="#4c72b0")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
    else:
        ax.bar(range(len(labels)), values, color="#4c72b0")
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 6 else 0,
                      ha="right" if len(labels) > 6 else "center", fontsize=8)
        ax.set_ylabel(xlabel)
    ax.set_title(title, fontsize=10)
    return img(png_data_uri(fig), title)


def histogram(values, bins, title: str, xlabel: str, *, log_x: bool = False) -> str:
    """A histogram of ``values`` as an <img> tag."""
    fig, ax = figure(5.4, 3.0)
    ax.hist(values, bins=bins, color="#4c72b0")
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return img(png_data_uri(fig), title)


def section(title: str, *parts: str, id: str | None = None) -> str:
    """A titled section of the page."""
    ident = f" id='{esc(id)}'" if id else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def row(*parts: str) -> str:
    """Parts side by side (wrapping on narrow screens)."""
    return "<div class='row'>" + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def note(text: str) -> str:
    """A short explanatory paragraph (text is escaped)."""
    return f"<p class='note'>{esc(text)}</p>"


def page(title: str, body: str) -> str:
    """A whole HTML document."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n")
