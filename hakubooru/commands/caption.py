"""``python -m hakubooru caption``: caption a saved selection into a Parquet table.

Columns: ``id`` int64, ``caption`` string (the ``.txt``), ``record`` string (the ``.json``
record as compact JSON). The file's key-value metadata ``hakubooru`` (read it with
``pyarrow.parquet.read_metadata(path).metadata[b"hakubooru"]``) holds the database
fingerprint, the selection, the captioner settings and the counts. Loadable with ``datasets.Dataset.from_parquet``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..captioner import CAPTION_GROUPS, Captioner
from ..db import fingerprint, open_db
from ..errors import HakubooruError
from ..quality import NO_QUALITY_ABOVE_ID
from ..selector import load_selection

SCHEMA = pa.schema([("id", pa.int64()), ("caption", pa.string()), ("record", pa.string())])
ROWS_PER_GROUP = 50_000


def add_arguments(parser) -> None:
    parser.add_argument("--db", required=True, help="danbooru2023.db (opened read-only)")
    parser.add_argument("--selection", required=True, help="selection.parquet from `python -m hakubooru select`")
    parser.add_argument("--out", default="captions.parquet", help="output Parquet file (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--separator", default=", ", help="between tags (default: %(default)r)")
    parser.add_argument("--group-separator", default=None, help="between groups (default: --separator)")
    parser.add_argument("--escape-parentheses", action="store_true", help=r"write ( ) as \( \) for sd-webui prompts")
    parser.add_argument("--groups", default=",".join(CAPTION_GROUPS),
                        help="comma-separated groups to emit, in order (default: %(default)s)")
    parser.add_argument("--no-quality-above-id", default=str(NO_QUALITY_ABOVE_ID),
                        help="posts above this id get no quality tag and stay out of the statistics; "
                             "'none' for no limit (default: %(default)s)")
    parser.add_argument("--quality-table", default=None,
                        help="JSON file {rating: {percentile: threshold}} instead of percentiles from --db")


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HakubooruError(f"{out} exists; pass --overwrite to replace it")
    db = open_db(args.db)
    selection = load_selection(args.selection)
    selection.check(db)
    captioner = Captioner(
        db,
        quality=_read_quality_table(args.quality_table),
        separator=args.separator,
        group_separator=args.group_separator,
        escape_parentheses=args.escape_parentheses,
        groups=[g.strip() for g in args.groups.split(",") if g.strip()],
        no_quality_above_id=_parse_limit(args.no_quality_above_id),
    )
    write_parquet(captioner, selection.ids, out, {"db_fingerprint": fingerprint(db),
                                                  "selection": str(args.selection),
                                                  "selection_sha256": selection.digest})
    print(f"wrote {out}: {captioner.summary()}")
    return 0


def write_parquet(captioner: Captioner, ids, out, meta: dict) -> None:
    """Caption ``ids`` into ``out`` (written to a temporary name, then renamed), with
    ``meta`` plus the captioner's settings and counts as the ``hakubooru`` metadata."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    columns = ([], [], [])
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for post_id, caption, record in captioner.captions(ids, progress=True):
                columns[0].append(post_id)
                columns[1].append(caption)
                columns[2].append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
                if len(columns[0]) >= ROWS_PER_GROUP:
                    _flush(writer, columns)
            _flush(writer, columns)
            info = {**meta, "settings": captioner.settings(), "counts": dict(captioner.stats)}
            writer.add_key_value_metadata({"hakubooru": json.dumps(info, sort_keys=True)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _flush(writer, columns) -> None:
    if columns[0]:
        writer.write_table(pa.table(list(columns), schema=SCHEMA))
        for column in columns:
            column.clear()


def _parse_limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise HakubooruError(f"--no-quality-above-id must be an integer or 'none', got {text!r}") from None


def _read_quality_table(path) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise HakubooruError(f"cannot read quality table {path}: {e}") from None
