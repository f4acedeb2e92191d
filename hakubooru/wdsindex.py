"""Index a webdataset folder written by any tool (img2dataset, webdataset.TarWriter, ...) so
the trainer reads it: ``index.parquet`` + ``manifest.json`` beside the tars, which are only read.

Samples are grouped as webdataset groups them: a member ``dir/name.ext.more`` has the key
``dir/name`` and the extension ``ext.more`` (lowercased). A sample needs one image member
(jpg, jpeg, png, webp, avif, bmp; the first in extension order if several); its ``txt`` and
``json`` members are indexed when present (offset and size -1 when absent). Samples without
an image, or whose image header cannot be read, are skipped, counted and listed in
``skipped.parquet``.

Ids: ``int(key)`` when every key is a number of at most 18 digits and no two are equal
(img2dataset's ``000000123``), else the sample's position in shard and member order; the key
itself is the ``key`` column. Only the top-level ``*.tar`` files are indexed (sorted by name);
compressed shards cannot be read by offset.
"""
from __future__ import annotations

import io
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from PIL import Image
from tqdm import tqdm

from .errors import HakubooruError
from .images import IMAGE_EXTS, BadImage, _webp_frame_size
from .manifest import (FORMAT, HASH_COLUMNS, INDEX_SCHEMA, MANIFEST_FILE, SKIPPED_FILE, dump_json, read_json,
                       write_atomic, write_parquet)
from .shardfolder import INDEX_FILE, shard_folder
from .shardwriter import CHECKSUM, file_checksum, member_hash
from .procs import ordered_map
from .tagcounts import add_counts, add_tags, caption_tags, json_tags, write_tag_counts

WDS_FORMAT = "hakubooru-webdataset-index/1"
WDS_INDEX_SCHEMA = INDEX_SCHEMA.append(pa.field("key", pa.string()))
WDS_SKIPPED_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()),
                                ("reason", pa.string())])
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_NUMBER = re.compile(r"^\d{1,18}$")
_HEAD = 1 << 16  # bytes tried first for an image's size
_INT_COLUMNS = ("image_offset", "image_size", "txt_offset", "txt_size", "json_offset",
                "json_size", "width", "height")


def index_webdataset(folder, progress: bool = True, workers: int = 1) -> dict:
    """Write ``index.parquet``, ``skipped.parquet`` and ``manifest.json`` for the webdataset
    shards ``folder/*.tar`` (read by ``workers`` processes, shard by shard; the files do not
    depend on their number); returns the manifest. Prints one line of counts."""
    started = time.perf_counter()
    if workers < 1:
        raise HakubooruError(f"--workers must be ≥ 1, got {workers}")
    root = shard_folder(folder, need_index=False)
    existing = read_json(root / MANIFEST_FILE)
    if existing is not None and existing.get("format") == FORMAT:
        raise HakubooruError(f"{root} was written by `python -m hakubooru build` and is indexed "
                             "already")
    for name in (MANIFEST_FILE, INDEX_FILE):
        if (root / name).exists() and (existing or {}).get("format") != WDS_FORMAT:
            raise HakubooruError(f"{root / name} exists and was not written by `python -m "
                                 "hakubooru index`; move it away to index this folder")
    tars = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if not tars:
        compressed = sorted(p.name for p in root.glob("*.tar.*"))
        hint = (f" ({compressed[0]} is compressed: samples cannot be read by offset; "
                "decompress the shards)") if compressed else ""
        raise HakubooruError(f"{root} holds no .tar shards{hint}")

    parts, skipped, shards, counts = [], [], [], {}
    bar = tqdm(total=len(tars), desc="indexing shards", unit="shard", disable=not progress)
    try:
        for found, lost in ordered_map(_scan, tars, workers):
            add_counts(counts, found.pop("tags"))
            parts.append(found)
            skipped.extend(lost)
            shards.append({"name": found["shard"], "samples": len(found["key"]),
                           "size": found.pop("size"), CHECKSUM: found.pop(CHECKSUM)})
            bar.update(1)
    finally:
        bar.close()
    columns = {name: np.concatenate([p[name] for p in parts]) for name in _INT_COLUMNS + HASH_COLUMNS}
    keys = pa.chunked_array([p["key"] for p in parts], pa.string()).combine_chunks()
    columns["ext"] = pa.chunked_array([p["ext"] for p in parts], pa.string()).combine_chunks()
    columns["shard"] = pa.DictionaryArray.from_arrays(
        np.repeat(np.arange(len(parts), dtype=np.int32), [len(p["key"]) for p in parts]),
        pa.array([p["shard"] for p in parts], pa.string())).cast(pa.string())
    numeric = pc.all(pc.match_substring_regex(keys, _NUMBER.pattern)).as_py() is not False  # None: no keys
    ids = keys.cast(pa.int64()).to_numpy() if numeric else None
    numeric = numeric and len(np.unique(ids)) == len(keys)
    if not numeric:
        ids = np.arange(len(keys), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    columns.update(id=ids, key=keys)
    table = pa.table({name: columns[name] for name in WDS_INDEX_SCHEMA.names})
    table = table.cast(WDS_INDEX_SCHEMA).take(pa.array(order))
    del columns, parts
    write_parquet(root / INDEX_FILE, table)
    write_parquet(root / SKIPPED_FILE, pa.table(
        {name: [s[i] for s in skipped] for i, name in enumerate(WDS_SKIPPED_SCHEMA.names)},
        schema=WDS_SKIPPED_SCHEMA))
    with_txt = int(pc.sum(pc.greater_equal(table.column("txt_size"), 0)).as_py() or 0)
    with_json = int(pc.sum(pc.greater_equal(table.column("json_size"), 0)).as_py() or 0)
    reasons: dict[str, int] = {}
    for _, _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    manifest = {
        "format": WDS_FORMAT,
        "ids": "keys" if numeric else "positions",
        "counts": {"written": table.num_rows, "skipped": len(skipped), "skipped_by_reason": reasons,
                   "with_txt": with_txt, "with_json": with_json},
        "shards": shards,
        "files": {"index": INDEX_FILE, "skipped": SKIPPED_FILE},
    }
    manifest["fingerprint"] = "xxh3_128:" + xxhash.xxh3_128(dump_json(manifest)).hexdigest()
    write_tag_counts(root, counts, manifest["fingerprint"])
    write_atomic(root / MANIFEST_FILE, dump_json(manifest))
    c = manifest["counts"]
    print(f"{root}: indexed {len(tars)} shards; {c['written']} samples ({c['with_txt']} with "
          f".txt, {c['with_json']} with .json), {c['skipped']} skipped"
          + (f" ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))})" if reasons else "")
          + f"; ids from {manifest['ids']}; in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return manifest


def _scan(path: Path) -> tuple[dict, list[tuple]]:
    """The samples of one tar (in member order) as columns — ``key``, ``ext`` (Arrow strings),
    ``shard``, NumPy int64 arrays for the rest, ``tags`` their tag counts, the tar's ``size`` and
    checksum — and the skipped ones (key, shard, reason)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise HakubooruError(f"{path}: cannot read as an uncompressed tar ({e})") from None
    with tar:
        try:
            for member in tar:
                match = _KEY.match(member.name)
                if member.isfile() and match:
                    groups.setdefault(match.group(1), {}).setdefault(match.group(2).lower(), member)
        except (tarfile.TarError, OSError):
            raise HakubooruError(f"{path}: the tar is damaged or cut short; repair or remove "
                                 "it") from None
    found = {"key": [], "ext": [], "shard": path.name, "tags": {}}
    ints = {name: [] for name in _INT_COLUMNS}
    hashes = {name: [] for name in HASH_COLUMNS}
    skipped = []
    with open(path, "rb") as f:
        for key, members in groups.items():
            image_exts = sorted(e for e in members if e in IMAGE_EXTS)
            if not image_exts:
                skipped.append((key, path.name, "no_image"))
                continue
            image = members[image_exts[0]]
            size = _image_size(f, image)
            if size is None:
                skipped.append((key, path.name, "corrupt"))
                continue
            found["key"].append(key)
            found["ext"].append(image_exts[0])
            values = {"image_offset": image.offset_data, "image_size": image.size,
                      "width": size[0], "height": size[1]}
            for name in ("txt", "json"):
                m = members.get(name)
                values[f"{name}_offset"] = m.offset_data if m else -1
                values[f"{name}_size"] = m.size if m else -1
            data = {}
            for name, m in (("image", image), ("txt", members.get("txt")), ("json", members.get("json"))):
                if m:  # the trainer checks each member it reads against this (0: no such member)
                    f.seek(m.offset_data)
                    data[name] = f.read(m.size)
                    hashes[f"{name}_xxh3"].append(member_hash(data[name]))
                else:
                    hashes[f"{name}_xxh3"].append(0)
            tags = json_tags(data.get("json"), f"sample {key} in {path.name}")
            if tags is None and "txt" in data:
                tags = caption_tags(data["txt"])
            add_tags(found["tags"], tags or ())
            for name in _INT_COLUMNS:
                ints[name].append(values[name])
    found.update({name: np.array(v, np.int64) for name, v in ints.items()})
    found.update({name: np.array(v, np.uint64) for name, v in hashes.items()})
    found.update(key=pa.array(found["key"], pa.string()), ext=pa.array(found["ext"], pa.string()),
                 size=path.stat().st_size, **{CHECKSUM: file_checksum(path)})
    return found, skipped


def _image_size(f, member: tarfile.TarInfo) -> tuple[int, int] | None:
    """(width, height) from the image's header: a WebP's first chunk header (Pillow would
    build a libwebp decoder on the whole file), else Pillow on the first 64 KiB, else on all."""
    f.seek(member.offset_data)
    head = f.read(min(30, member.size))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) == 30:
        try:
            return _webp_frame_size(head[12:16], head[20:30])
        except BadImage:
            return None
    for length in (min(_HEAD, member.size), member.size):
        f.seek(member.offset_data)
        try:
            with Image.open(io.BytesIO(f.read(length))) as im:
                return im.size
        except (OSError, SyntaxError, ValueError):
            if length == member.size:
                return None
    return None
