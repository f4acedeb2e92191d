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

from ..captioner import Captioner
from ..db import fingerprint, open_db
from ..errors import HakubooruError
from ..selector import load_selection
from .caption_style import add_caption_arguments, make_captioner

SCHEMA = pa.schema([("id", pa.int64()), ("caption", pa.string()), ("record", pa.string())])
ROWS_PER_GROUP = 50_000


def add_arguments(parser) -> None:
    parser.add_argument("--db", required=True, help="danbooru2023.db (opened read-only)")
    parser.add_argument("--selection", required=True, help="selection.parquet from `python -m hakubooru select`")
    parser.add_argument("--out", default="captions.parquet", help="output Parquet file (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_caption_arguments(parser)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HakubooruError(f"{out} exists; pass --overwrite to replace it")
    db = open_db(args.db)
    selection = load_selection(args.selection)
    selection.check(db)
    captioner = make_captioner(db, args)
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
